//! What a process-shared glibc semaphore's bytes say.
//!
//! On LP64 glibc (x86_64, aarch64) a `sem_t` starts with one 64-bit word: the value in
//! its low 32 bits and the number of blocked waiters in its high 32 bits. HAMi-core
//! uses its semaphores as binary locks initialized to 1, so a value of 0 means held.

/// A semaphore as read from a region file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SemState {
    pub value: u32,
    /// Processes blocked in `sem_wait`/`sem_timedwait` on it right now.
    pub waiters: u32,
}

impl SemState {
    pub fn from_word(word: u64) -> SemState {
        SemState {
            value: word as u32,
            waiters: (word >> 32) as u32,
        }
    }

    /// A binary lock at 0 is held by someone.
    pub fn held(self) -> bool {
        self.value == 0
    }

    /// A binary lock never goes above 1; a larger value means the bytes are not a
    /// semaphore of this layout (or someone posted twice: HAMi-core's own "force
    /// post" after a timeout can do that, which lets two processes in).
    pub fn plausible(self) -> bool {
        self.value <= 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_is_the_low_half_and_waiters_the_high_half() {
        let s = SemState::from_word(3u64 << 32);
        assert!(s.held());
        assert_eq!(s.waiters, 3);
        let f = SemState::from_word(1);
        assert!(!f.held() && f.plausible());
        assert!(!SemState::from_word(2).plausible());
    }
}
