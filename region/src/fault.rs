//! Named fault points for crash testing. With the `fault-injection` feature, a point
//! whose name is in `VIGIL_FAULT` (comma-separated) SIGKILLs the process when reached,
//! so tests can die at exactly the instant shared state is in flux. Without the
//! feature every point compiles to nothing: release builds carry none of this.

/// Dies here if `VIGIL_FAULT` names this point (fault-injection builds only).
#[inline(always)]
pub fn point(name: &'static str) {
    #[cfg(feature = "fault-injection")]
    armed::hit(name);
    #[cfg(not(feature = "fault-injection"))]
    let _ = name;
}

#[cfg(feature = "fault-injection")]
mod armed {
    use std::sync::OnceLock;

    fn armed() -> &'static [String] {
        static ARMED: OnceLock<Vec<String>> = OnceLock::new();
        ARMED.get_or_init(|| {
            std::env::var("VIGIL_FAULT")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
    }

    pub(super) fn hit(name: &str) {
        if armed().iter().any(|a| a == name) {
            crate::sys::kill_self();
        }
    }
}
