//! Raw-pointer helpers for the exported functions. Each checks for null first; the
//! caller's pointer must otherwise be valid as the CUDA/NVML contract requires, which
//! is why every helper that touches one is an `unsafe fn`: the export calling it
//! passes the contract on (in its own `# Safety` section).

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs an export's body; a panic becomes `on_panic` (and a log line), never an unwind.
pub fn guard(name: &str, on_panic: u32, f: impl FnOnce() -> u32) -> u32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => {
            crate::client::log_warn(&format!(
                "{name}: internal panic, returning error {on_panic}"
            ));
            on_panic
        }
    }
}

/// Writes `v` through `p`; false if `p` is null.
///
/// # Safety
/// `p` is null or valid for a write of one aligned `T`.
pub unsafe fn out<T>(p: *mut T, v: T) -> bool {
    if p.is_null() {
        return false;
    }
    // SAFETY: non-null, and our caller guarantees a valid, aligned out-parameter.
    unsafe { p.write(v) };
    true
}

/// [`out`] for an export's result: `Err(null)` if `p` is null.
///
/// # Safety
/// `p` is null or valid for a write of one aligned `T`.
pub unsafe fn put<T, E>(p: *mut T, v: T, null: E) -> Result<(), E> {
    // SAFETY: our caller's guarantee, passed on.
    if unsafe { out(p, v) } {
        Ok(())
    } else {
        Err(null)
    }
}

/// Reads through `p`; None if null.
///
/// # Safety
/// `p` is null or valid for a read of one aligned, initialized `T`.
pub unsafe fn read<T: Copy>(p: *const T) -> Option<T> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null, and our caller guarantees it is valid and aligned.
    Some(unsafe { p.read() })
}

/// Reads `T` at a byte offset inside a caller's struct (for fields we need from
/// structs we do not otherwise model, e.g. CUmemAllocationProp.location.id).
///
/// # Safety
/// `base` is null or valid for reads of `offset + size_of::<T>()` bytes, and those
/// bytes at `offset` hold an initialized `T` (at any alignment).
pub unsafe fn read_field<T: Copy>(base: *const u8, offset: usize) -> Option<T> {
    if base.is_null() {
        return None;
    }
    // SAFETY: our caller guarantees a struct at least `offset + size_of::<T>()` long
    // (the API's definition); read_unaligned avoids assuming alignment.
    Some(unsafe { (base.add(offset) as *const T).read_unaligned() })
}

/// A C string argument, if non-null and UTF-8.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that stays valid and unchanged
/// for `'a` (which the caller picks: keep it within the export's call).
pub unsafe fn cstr<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null; our caller guarantees a NUL-terminated string that outlives
    // 'a.
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}

/// Copies `s` plus NUL into a caller buffer of `len` bytes, truncating if needed.
/// Returns false if the buffer is null or too small for the whole string.
///
/// # Safety
/// `buf` is null or valid for writes of `len` bytes.
pub unsafe fn write_str(buf: *mut c_char, len: usize, s: &str) -> bool {
    if buf.is_null() || len == 0 {
        return false;
    }
    let n = s.len().min(len - 1);
    // SAFETY: buf is non-null and our caller guarantees `len` writable bytes; we write
    // n + 1 <= len bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), n);
        *buf.add(n) = 0;
    }
    n == s.len()
}

/// Copies a caller's host buffer into our shadow bytes.
///
/// # Safety
/// `src` is null or valid for reads of `dst.len()` bytes.
pub unsafe fn copy_from_host(src: *const u8, dst: &mut [u8]) -> bool {
    if src.is_null() {
        return false;
    }
    // SAFETY: our caller guarantees `dst.len()` readable bytes at src (the byte count it
    // passed); the regions cannot overlap (ours is a private Vec).
    unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
    true
}

/// Copies our shadow bytes into a caller's host buffer.
///
/// # Safety
/// `dst` is null or valid for writes of `src.len()` bytes.
pub unsafe fn copy_to_host(src: &[u8], dst: *mut u8) -> bool {
    if dst.is_null() {
        return false;
    }
    // SAFETY: our caller guarantees `src.len()` writable bytes at dst.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
    true
}

/// Fills `n` bytes at a caller's host pointer (used for zeroing DtoH copies).
///
/// # Safety
/// `dst` is null or valid for writes of `n` bytes.
pub unsafe fn fill_host(dst: *mut u8, n: usize, v: u8) -> bool {
    if dst.is_null() {
        return false;
    }
    // SAFETY: our caller guarantees `n` writable bytes at dst.
    unsafe { std::ptr::write_bytes(dst, v, n) };
    true
}
