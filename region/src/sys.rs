//! The only place in this crate that talks to the kernel: mmap, open-file-description
//! locks, futexes and clocks. Everything above it is safe Rust over atomics.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::time::Duration;

/// A shared file mapping. Unmapped on drop.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access through it goes through
// atomics (see `layout`), so sharing the pointer between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` shared, read-write or read-only.
    pub(crate) fn new(file: &File, len: usize, writable: bool) -> io::Result<Mapping> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping at a kernel-chosen address; the fd is valid for the
        // duration of the call, and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?,
            len,
        })
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and are unmapped exactly once;
        // no references into the mapping outlive `self` (they borrow it).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

fn ofd_flock(kind: libc::c_short, offset: u64) -> libc::flock {
    // SAFETY: flock is a plain C struct for which all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = offset as libc::off_t;
    fl.l_len = 1;
    fl.l_pid = 0; // required to be 0 for OFD locks
    fl
}

/// Tries to take an exclusive open-file-description lock on one byte.
/// Returns Ok(false) if another open file description holds it.
pub(crate) fn ofd_try_lock(file: &File, offset: u64) -> io::Result<bool> {
    let fl = ofd_flock(libc::F_WRLCK as libc::c_short, offset);
    // SAFETY: valid fd and a pointer to an initialized flock for the call's duration.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(err),
    }
}

/// Releases a byte lock taken with [`ofd_try_lock`].
pub(crate) fn ofd_unlock(file: &File, offset: u64) -> io::Result<()> {
    let fl = ofd_flock(libc::F_UNLCK as libc::c_short, offset);
    // SAFETY: valid fd and a pointer to an initialized flock for the call's duration.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// True if some *other* open file description holds a lock on the byte. Locks held
/// through `file` itself never conflict, so never ask about your own token. Probes
/// with a read lock, which conflicts with the tokens' write locks and works on a
/// read-only descriptor too.
pub(crate) fn ofd_is_locked(file: &File, offset: u64) -> io::Result<bool> {
    let mut fl = ofd_flock(libc::F_RDLCK as libc::c_short, offset);
    // SAFETY: valid fd; the kernel writes the result into `fl`, which we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Gives the first `len` bytes of `file` real blocks (growing the file to `len` if it
/// is shorter), so that no page of a mapping of it can fault for lack of space later:
/// a sparse file on a full tmpfs kills whoever first touches a hole with SIGBUS.
/// Idempotent for blocks already allocated, and leaves the data alone. Ok(false) if
/// the filesystem cannot reserve blocks (no `fallocate` support).
pub(crate) fn allocate(file: &File, len: u64) -> io::Result<bool> {
    loop {
        // SAFETY: valid fd; mode 0 only allocates (and extends), never changes data.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => return Ok(false),
            _ => return Err(err),
        }
    }
}

/// Some other open file description's lock (read or write) overlapping
/// `[start, start + len)`, as (start, len) with len 0 meaning "to the end of the file";
/// None if there is none. Our own description's locks never conflict with us.
pub(crate) fn ofd_lock_in(file: &File, start: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    let mut fl = ofd_flock(libc::F_WRLCK as libc::c_short, start);
    fl.l_len = len as libc::off_t;
    // SAFETY: valid fd; the kernel writes the result into `fl`, which we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((fl.l_type != libc::F_UNLCK as libc::c_short)
        .then(|| (fl.l_start.max(0) as u64, fl.l_len.max(0) as u64)))
}

/// Outcome of one futex wait slice.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    Woken,
    TimedOut,
}

/// Waits while the 32-bit word at `addr` equals `expected`, for at most `timeout`.
/// Shared (not private) futex: the word lives in a MAP_SHARED file mapping.
pub(crate) fn futex_wait(addr: *const u32, expected: u32, timeout: Duration) -> Wait {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: addr points into a live mapping (the caller borrows it) and is 4-aligned;
    // FUTEX_WAIT only reads it. The timespec outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            addr,
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
    if rc == 0 {
        return Wait::Woken;
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::ETIMEDOUT) => Wait::TimedOut,
        // EAGAIN: the word already changed; EINTR: a signal. Both mean "look again".
        _ => Wait::Woken,
    }
}

/// Wakes up to `n` waiters on the word at `addr`.
pub(crate) fn futex_wake(addr: *const u32, n: i32) {
    // SAFETY: addr points into a live mapping; FUTEX_WAKE does not dereference it
    // beyond using it as a key.
    unsafe {
        libc::syscall(libc::SYS_futex, addr, libc::FUTEX_WAKE, n);
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; clock ids used here always exist on Linux.
    unsafe {
        libc::clock_gettime(clock, &mut ts);
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// CLOCK_MONOTONIC in ns: one timeline shared by every process on the host.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Wall-clock time in ns since the Unix epoch.
pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

/// The calling process's PID as it sees it (its own namespace).
pub fn getpid() -> u32 {
    std::process::id()
}

/// SIGKILLs the calling process (fault injection).
#[cfg(feature = "fault-injection")]
pub(crate) fn kill_self() -> ! {
    // SAFETY: raise has no memory-safety preconditions; SIGKILL cannot be caught.
    unsafe {
        libc::raise(libc::SIGKILL);
    }
    std::process::abort()
}

static FORK_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static FORK_TRACKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_fork_child() {
    FORK_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Counts forks this process image has been through, without a syscall (getpid is a
/// real syscall in current glibc, too slow for a lock's fast path). None if the fork
/// handler could not be registered; callers then compare PIDs instead.
pub(crate) fn fork_generation() -> Option<u64> {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers a handler that only touches an atomic; it is safe to run
        // in a freshly forked child.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(on_fork_child)) };
        FORK_TRACKED.store(rc == 0, std::sync::atomic::Ordering::Release);
    });
    FORK_TRACKED
        .load(std::sync::atomic::Ordering::Acquire)
        .then(|| FORK_GENERATION.load(std::sync::atomic::Ordering::Relaxed))
}

/// Mappings of region files that a SIGBUS may hit: a file truncated while mapped (any
/// process of the container can do that) makes every access past the new end fault,
/// and so does a page that cannot be allocated on a full filesystem. The guard answers
/// such a fault by mapping anonymous zeros over the *whole* registered mapping (with
/// the mapping's own protection) and marking it poisoned; the faulting access then
/// retries on the zeros. The owner sees an all-zero region, which validation and the
/// integrity checks refuse, and `poisoned` says why, instead of the process dying.
/// The whole range is replaced, not just the faulting page, so that a writer never
/// works on a mix of the file's pages and private ones. Faults anywhere else go to the
/// previous handler, or to the default action, which kills as before.
///
/// Everything the handler touches is a static atomic or a syscall (mmap, sigaction,
/// raise): async-signal-safe, no allocation, no lock.
pub(crate) mod sigbus {
    use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::*};
    use std::sync::OnceLock;

    const SLOTS: usize = 4096;
    static START: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
    static LEN: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
    static WRITABLE: [AtomicBool; SLOTS] = [const { AtomicBool::new(false) }; SLOTS];
    /// CLEAN, then REPLACING while one handler maps zeros over the range, then POISONED.
    static STATE: [AtomicU8; SLOTS] = [const { AtomicU8::new(CLEAN) }; SLOTS];
    static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

    const CLEAN: u8 = 0;
    const REPLACING: u8 = 1;
    const POISONED: u8 = 2;

    /// Installs the handler (once per process), keeping the action it replaces to
    /// chain to. For processes whose region mappings must survive a damaged file: the
    /// exporter and tools (readers) and the interposer (writers), which installs it
    /// just before it maps its region.
    pub fn install() {
        PREVIOUS.get_or_init(|| {
            // SAFETY: sigaction is a plain C struct; all-zero is valid. We install a
            // handler that only uses async-signal-safe calls (mmap, sigaction, raise)
            // and atomics, and keep the previous action to chain to.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_sigbus as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_ONSTACK;
                libc::sigemptyset(&mut sa.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(libc::SIGBUS, &sa, &mut old);
                old
            }
        });
    }

    /// Registers a mapping; returns its guard slot (None if the table is full, in
    /// which case the mapping is simply unguarded).
    pub fn register(start: usize, len: usize, writable: bool) -> Option<usize> {
        for i in 0..SLOTS {
            if START[i].load(Relaxed) == 0
                && LEN[i].compare_exchange(0, len, AcqRel, Relaxed).is_ok()
            {
                STATE[i].store(CLEAN, Release);
                WRITABLE[i].store(writable, Release);
                START[i].store(start, Release);
                return Some(i);
            }
        }
        None
    }

    /// Unregisters before the mapping goes away.
    pub fn unregister(slot: usize) {
        START[slot].store(0, Release);
        STATE[slot].store(CLEAN, Release);
        LEN[slot].store(0, Release);
    }

    pub fn poisoned(slot: usize) -> bool {
        STATE[slot].load(Acquire) != CLEAN
    }

    /// Replaces registration `i`'s whole range with anonymous zeros. Returns false if
    /// the kernel refused (the caller then lets the fault take its course).
    fn replace(i: usize, start: usize, len: usize) -> bool {
        let prot = if WRITABLE[i].load(Acquire) {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: the range is a mapping we registered and still own (it is
        // unregistered before it is unmapped), so MAP_FIXED replaces nothing but it.
        // mmap is async-signal-safe on Linux (a plain syscall).
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        p != libc::MAP_FAILED
    }

    extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
        let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
        // Only a fault raised by the kernel carries a faulting address (si_code > 0);
        // a SIGBUS sent with kill() is never ours.
        if code > 0 {
            for i in 0..SLOTS {
                let start = START[i].load(Acquire);
                let len = LEN[i].load(Acquire);
                if start == 0 || addr < start || addr >= start.saturating_add(len) {
                    continue;
                }
                match STATE[i].compare_exchange(CLEAN, REPLACING, AcqRel, Acquire) {
                    Ok(_) => {
                        if replace(i, start, len) {
                            STATE[i].store(POISONED, Release);
                            return;
                        }
                        STATE[i].store(CLEAN, Release);
                    }
                    // Another thread is replacing it, or has: retry the access (it
                    // faults again until the zeros are in place, then succeeds).
                    Err(_) => return,
                }
            }
        }
        // Not one of ours: what would have happened without us.
        let prev = PREVIOUS.get().copied();
        match prev {
            Some(old)
                if old.sa_flags & libc::SA_SIGINFO != 0
                    && old.sa_sigaction != libc::SIG_DFL
                    && old.sa_sigaction != libc::SIG_IGN =>
            {
                // SAFETY: the previous SA_SIGINFO handler, called as the kernel would.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig, info, ctx)
            }
            Some(old) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
                // SAFETY: the previous plain handler.
                let f: extern "C" fn(libc::c_int) =
                    unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig)
            }
            _ => {
                // SAFETY: restores the default action. Returning re-runs a faulting
                // access, which now terminates the process as it would have; a signal
                // sent with kill() is raised again (SA_NODEFER: not blocked here).
                unsafe {
                    let mut sa: libc::sigaction = std::mem::zeroed();
                    sa.sa_sigaction = libc::SIG_DFL;
                    libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
                    if code <= 0 {
                        libc::raise(libc::SIGBUS);
                    }
                }
            }
        }
    }
}
