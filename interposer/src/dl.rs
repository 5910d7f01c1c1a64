//! The dynamic linker's ways around the preload.
//!
//! **`RTLD_DEEPBIND`.** A library dlopened with it looks symbols up in its own
//! dependencies (libcuda, libc's `dlsym`) before the global scope, where LD_PRELOAD's
//! libvigil.so lives: its linked `cuMemAlloc_v2`, its `dlsym` and its
//! `cuGetProcAddress` all reach the driver directly. Vigil's `dlopen` and `dlmopen`
//! (into the base namespace) drop the flag when this process's environment asks for a
//! memory limit, and say so once per library: the library then binds through the
//! global scope, where Vigil's exports win. Without a limit the flag is left alone:
//! DEEPBIND exists to keep a library's own copies of symbols apart from the program's,
//! dropping it can break such a library, and without a limit an escape costs only
//! accounting (which the exporter's NVML check sees).
//!
//! The exported `dlopen`/`dlmopen` are naked trampolines that end in a *tail jump* to
//! the real function: glibc takes the caller from the return address (the caller's
//! RUNPATH for a bare name, `$ORIGIN`, the namespace), so an ordinary Rust function
//! in between would make libvigil.so the caller of every dlopen in the process. They
//! exist on x86_64 only (elsewhere DEEPBIND remains a way around the limit).
//!
//! **A private copy of the driver.** `dlopen` of a copy of libcuda.so.1 at another path
//! loads a second driver whose functions are not ours. `interposed_instead` finds such
//! an answer of the real `dlsym` (the defining object is not the driver Vigil
//! interposes, yet exports the driver's entry points itself) and gives the name's
//! address in the interposed driver, which the `dlsym` hook then turns into a hook
//! where it has one. The caller uses one driver, ours, throughout.
//!
//! **`dlmopen` into a new namespace** loads a separate copy of everything, preload
//! excluded: nothing there is counted. It is only said, once per library.

use crate::log::{vlog, INFO, WARN};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Mutex;

/// What Vigil passes to the real `dlopen` for `mode`: without `RTLD_DEEPBIND` when a
/// limit is to be enforced.
pub fn dlopen_mode(mode: c_int, enforce: bool) -> c_int {
    if enforce {
        mode & !libc::RTLD_DEEPBIND
    } else {
        mode
    }
}

/// True the first time `key` is seen (a bounded memory: past 256 keys, never again),
/// so a library opened in a loop is logged once.
fn first_time(seen: &Mutex<Vec<String>>, key: &str) -> bool {
    let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
    if s.len() >= 256 || s.iter().any(|k| k == key) {
        return false;
    }
    s.push(key.to_string());
    true
}

/// `file` for the log.
///
/// # Safety
/// `file` is null or a NUL-terminated string (`dlopen`'s contract).
unsafe fn shown(file: *const c_char) -> String {
    if file.is_null() {
        return "NULL".into();
    }
    // SAFETY: non-null, and dlopen's contract makes it a NUL-terminated string.
    format!("{:?}", unsafe { CStr::from_ptr(file) }.to_string_lossy())
}

/// Vigil's part of a `dlopen`/`dlmopen` (into the base namespace): the mode to pass on.
///
/// # Safety
/// As [`shown`].
unsafe fn base_mode(what: &str, file: *const c_char, mode: c_int) -> c_int {
    let cfg = crate::config();
    if cfg.secure {
        return mode;
    }
    let new = dlopen_mode(mode, cfg.limit_requested);
    if new != mode {
        static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
        // SAFETY: our caller's contract.
        let f = unsafe { shown(file) };
        if first_time(&SEEN, &f) {
            vlog!(
                WARN,
                "{what}({f}, RTLD_DEEPBIND): opened without RTLD_DEEPBIND, because under it the library would bind libcuda and dlsym ahead of Vigil and allocate outside CUDA_DEVICE_MEMORY_LIMIT"
            );
        }
    }
    new
}

/// A `dlmopen` into a namespace other than the base one: LD_PRELOAD does not reach it.
///
/// # Safety
/// As [`shown`].
unsafe fn other_namespace(file: *const c_char) {
    let cfg = crate::config();
    if cfg.secure {
        return;
    }
    static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
    // SAFETY: our caller's contract.
    let f = unsafe { shown(file) };
    if first_time(&SEEN, &f) {
        let level = if cfg.limit_requested { WARN } else { INFO };
        vlog!(
            level,
            "dlmopen({f}) into a new link-map namespace: LD_PRELOAD does not reach there, so CUDA memory allocated from it is not counted against CUDA_DEVICE_MEMORY_LIMIT (the exporter's NVML check still sees it on the device)"
        );
    }
}

/// Called by the `dlopen` trampoline: stores the real dlopen in `*real` (0 if it
/// cannot be found) and returns the mode to call it with.
#[cfg(all(not(test), target_arch = "x86_64"))]
/// # Safety
/// Called only by the `dlopen` trampoline, with `dlopen`'s own arguments and a valid
/// out-pointer.
unsafe extern "C" fn dlopen_prepare(file: *const c_char, mode: c_int, real: *mut usize) -> c_int {
    // SAFETY: `real` is the trampoline's own stack slot.
    unsafe { *real = crate::real::dlopen_addr() };
    if mode & libc::RTLD_DEEPBIND == 0 {
        return mode; // The common case: nothing to do, nothing read.
    }
    // SAFETY: `file` is dlopen's argument.
    crate::hooks::guarded("dlopen", || unsafe { base_mode("dlopen", file, mode) }).unwrap_or(mode)
}

/// Called by the `dlmopen` trampoline, as `dlopen_prepare`.
#[cfg(all(not(test), target_arch = "x86_64"))]
/// # Safety
/// Called only by the `dlmopen` trampoline, with `dlmopen`'s own arguments and a valid
/// out-pointer.
unsafe extern "C" fn dlmopen_prepare(
    lmid: std::ffi::c_long,
    file: *const c_char,
    mode: c_int,
    real: *mut usize,
) -> c_int {
    // SAFETY: `real` is the trampoline's own stack slot.
    unsafe { *real = crate::real::dlmopen_addr() };
    if lmid != libc::LM_ID_BASE {
        // SAFETY: `file` is dlmopen's argument.
        crate::hooks::guarded("dlmopen", || unsafe { other_namespace(file) });
        return mode;
    }
    if mode & libc::RTLD_DEEPBIND == 0 {
        return mode;
    }
    // SAFETY: `file` is dlmopen's argument.
    crate::hooks::guarded("dlmopen", || unsafe { base_mode("dlmopen", file, mode) }).unwrap_or(mode)
}

/// `dlopen`: `dlopen_prepare`, then a tail jump to the real dlopen with the caller's
/// return address still on the stack, so glibc sees the real caller. The stack is
/// 16-byte aligned at the call (8 at entry, two pushes and an 8-byte slot).
///
/// # Safety
/// Same contract as libc's `dlopen`.
#[cfg(all(not(test), target_arch = "x86_64"))]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlopen(_file: *const c_char, _mode: c_int) -> *mut c_void {
    trampoline!(
        prepare = dlopen_prepare,
        save = ["rdi", "rsi"],
        restore = ["rsi", "rdi"],
        slot = 8 in "rdx",
        // The mode dlopen_prepare chose.
        after = ["mov esi, eax"],
        on_null = ["xor eax, eax"],
    )
}

/// `dlmopen`: as `dlopen`, with the mode in the third argument. Three pushes and a
/// 16-byte slot keep the call aligned.
///
/// # Safety
/// Same contract as libc's `dlmopen`.
#[cfg(all(not(test), target_arch = "x86_64"))]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlmopen(
    _lmid: std::ffi::c_long,
    _file: *const c_char,
    _mode: c_int,
) -> *mut c_void {
    trampoline!(
        prepare = dlmopen_prepare,
        save = ["rdi", "rsi", "rdx"],
        restore = ["rdx", "rsi", "rdi"],
        slot = 16 in "rcx",
        // The mode dlmopen_prepare chose.
        after = ["mov edx, eax"],
        on_null = ["xor eax, eax"],
    )
}

/// A loaded object: its load address, its link map (a handle glibc's dlsym accepts)
/// and its file name.
struct Object {
    base: usize,
    map: *mut c_void,
    name: String,
}

/// glibc's `RTLD_DL_LINKMAP` for `dladdr1`.
const RTLD_DL_LINKMAP: c_int = 2;

/// The object whose code or data is at `addr`.
fn object_of(addr: usize) -> Option<Object> {
    // SAFETY: Dl_info is plain data; all-zero is a valid value.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let mut map: *mut c_void = std::ptr::null_mut();
    // SAFETY: dladdr1 only reads the loader's tables; both out-pointers are valid, and
    // RTLD_DL_LINKMAP makes it store a `struct link_map *` in `map`.
    let ok = unsafe { libc::dladdr1(addr as *const c_void, &mut info, &mut map, RTLD_DL_LINKMAP) };
    if ok == 0 || info.dli_fbase.is_null() || map.is_null() {
        return None;
    }
    let name = if info.dli_fname.is_null() {
        String::new()
    } else {
        // SAFETY: non-null, a NUL-terminated name owned by the loader.
        unsafe { CStr::from_ptr(info.dli_fname) }
            .to_string_lossy()
            .into_owned()
    };
    Some(Object {
        base: info.dli_fbase as usize,
        map,
        name,
    })
}

/// Load addresses of the objects whose answers are ours: the driver and NVML Vigil
/// interposes, and libvigil.so itself.
fn ours() -> &'static [usize] {
    static OURS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    OURS.get_or_init(|| {
        let me = ours as fn() -> &'static [usize] as usize;
        let driver = crate::real::cuda_sym(c"cuInit");
        let nvml = crate::real::nvml_sym(c"nvmlInit_v2");
        [Some(me), driver, nvml]
            .into_iter()
            .flatten()
            .filter_map(|a| object_of(a).map(|o| o.base))
            .collect()
    })
}

/// `p` is the real dlsym's answer for `name` (a `cu*` or `nvml*` name). If it comes
/// from a CUDA driver (or NVML) other than the one Vigil interposes, a private copy:
/// `Some(the interposed one's address for name)`, `Some(None)` if it has none.
/// `None` when `p` is fine as it is (ours, or not from a driver).
pub fn interposed_instead(name: &CStr, p: usize) -> Option<Option<usize>> {
    if crate::config().secure {
        return None;
    }
    let obj = object_of(p)?;
    if ours().contains(&obj.base) {
        return None;
    }
    let nvml = name.to_bytes().starts_with(b"nvml");
    let (marker, mine) = if nvml {
        (c"nvmlInit_v2", crate::real::nvml_sym(name))
    } else {
        (c"cuGetProcAddress", crate::real::cuda_sym(name))
    };
    // A driver exports its entry points itself; a library that merely depends on one
    // (or wraps a few of its functions) is left alone.
    let own = crate::real::dlsym(obj.map, marker).and_then(object_of)?;
    if own.base != obj.base {
        return None;
    }
    static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
    if first_time(&SEEN, &obj.name) {
        let interposed = mine
            .and_then(object_of)
            .map_or_else(|| "none loaded".to_string(), |o| o.name);
        vlog!(
            WARN,
            "dlsym({:?}) from {}, a second copy of the {} beside the one Vigil interposes ({interposed}): {}",
            name.to_string_lossy(),
            obj.name,
            if nvml { "NVML library" } else { "CUDA driver" },
            if mine.is_some() {
                "answering from the interposed one, so that what the caller allocates is counted"
            } else {
                "the interposed one lacks this entry point"
            }
        );
    }
    Some(mine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepbind_is_dropped_only_when_enforcing() {
        let m = libc::RTLD_NOW | libc::RTLD_DEEPBIND | libc::RTLD_GLOBAL;
        assert_eq!(dlopen_mode(m, true), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        assert_eq!(dlopen_mode(m, false), m);
        assert_eq!(dlopen_mode(libc::RTLD_LAZY, true), libc::RTLD_LAZY);
    }

    #[test]
    fn each_key_is_logged_once_and_memory_is_bounded() {
        let seen = Mutex::new(Vec::new());
        assert!(first_time(&seen, "a"));
        assert!(!first_time(&seen, "a"));
        assert!(first_time(&seen, "b"));
        for i in 0..300 {
            first_time(&seen, &i.to_string());
        }
        assert_eq!(seen.lock().unwrap().len(), 256);
        assert!(!first_time(&seen, "new"));
    }

    #[test]
    fn an_address_is_placed_in_its_object() {
        let o =
            object_of(an_address_is_placed_in_its_object as fn() as *const () as usize).unwrap();
        assert!(o.base != 0 && !o.map.is_null());
        let libc_obj = object_of(libc::malloc as *const () as usize).unwrap();
        assert_ne!(o.base, libc_obj.base);
        assert!(libc_obj.name.contains("libc"), "{}", libc_obj.name);
    }
}
