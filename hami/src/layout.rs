//! HAMi-core's `shared_region_t`, as its `libvgpu.so` lays it out on x86_64 and
//! aarch64 Linux (LP64, glibc).
//!
//! These structs are never mapped or cast to: they exist so that the offsets the
//! reader uses come from one declaration, checked below against the figures measured
//! with `offsetof` on HAMi-core's own header (`tests/fixtures/hami/layout-*.json`).
//!
//! Versions (`major_version.minor_version` in the header):
//! - **1.1** (HAMi-core from 2024-08 until 2026-01): the layout below, where
//!   `ProcSlot::seqlock` and `SharedRegion::sem_postinit` were still unused padding
//!   (`unused[3]` and `unused[4]`).
//! - **1.2** (HAMi-core `b69b1ea`, 2026-04, and later): the same offsets, with those
//!   two fields in use. HAMi-core chose the placement so that 1.1 files stay readable.
//!
//! Not supported: files written before versioning (early 2024: no version fields, so
//! `major_version` reads `sm_init_flag`), and main-branch builds between `1988c5d`
//! and `b69b1ea`, which still said 1.1 but had moved `seqlock` (and, from `e200da2`,
//! `sem_postinit`) to other offsets. Such a file fails validation instead of being
//! misread (see [`crate::read`]).

#![allow(dead_code)] // fields are read through `offset_of!`, never by name

use std::mem::{offset_of, size_of};

/// `initialized_flag` of an initialized region (`MULTIPROCESS_SHARED_REGION_MAGIC_FLAG`).
pub const MAGIC: i32 = 19920718;
/// `CUDA_DEVICE_MAX_COUNT`.
pub const MAX_DEVICES: usize = 16;
/// `SHARED_REGION_MAX_PROCESS_NUM`.
pub const MAX_PROCS: usize = 1024;
/// Length of one `uuid` (`typedef char uuid[96]`).
pub const UUID_LEN: usize = 96;
/// Versions this reader understands: `(major, minor)`.
pub const SUPPORTED_VERSIONS: [(u32, u32); 2] = [(1, 1), (1, 2)];

/// `device_memory_t`: one process's usage on one device, by kind.
#[repr(C)]
pub struct DeviceMemory {
    pub context_size: u64,
    pub module_size: u64,
    pub data_size: u64,
    pub offset: u64,
    /// What HAMi-core counts against the limit.
    pub total: u64,
    pub unused: [u64; 3],
}

/// `device_util_t`.
#[repr(C)]
pub struct DeviceUtil {
    pub dec_util: u64,
    pub enc_util: u64,
    pub sm_util: u64,
    pub unused: [u64; 3],
}

/// `shrreg_proc_slot_t`: one process. Slots `0..proc_num` are in use; HAMi-core keeps
/// them packed by moving the last one into a freed place.
#[repr(C)]
pub struct ProcSlot {
    /// `getpid()` of the process: its PID in its own namespace.
    pub pid: i32,
    /// The host PID HAMi-core detected, 0 when detection failed or has not run.
    pub hostpid: i32,
    pub used: [DeviceMemory; MAX_DEVICES],
    pub monitorused: [u64; MAX_DEVICES],
    pub device_util: [DeviceUtil; MAX_DEVICES],
    pub status: i32,
    /// 1.2 only (unused in 1.1).
    pub seqlock: u64,
    pub unused: [u64; 2],
}

/// glibc's `sem_t` on LP64: 32 bytes; its first 8 bytes are the value (low 32 bits)
/// and the number of waiters (high 32 bits). See [`crate::sem`].
#[repr(C)]
pub struct Sem {
    pub data: u64,
    pub rest: [u64; 3],
}

/// `shared_region_t`.
#[repr(C)]
pub struct SharedRegion {
    pub initialized_flag: i32,
    pub major_version: u32,
    pub minor_version: u32,
    pub sm_init_flag: i32,
    /// `getpid()` (namespace PID) of whoever holds `sem`, 0 when none.
    pub owner_pid: u64,
    /// Held while a process adds or removes its slot.
    pub sem: Sem,
    pub device_num: u64,
    pub uuids: [[u8; UUID_LEN]; MAX_DEVICES],
    /// Bytes; 0 means no limit.
    pub limit: [u64; MAX_DEVICES],
    /// Percent of the SMs; 0 means no limit.
    pub sm_limit: [u64; MAX_DEVICES],
    pub procs: [ProcSlot; MAX_PROCS],
    pub proc_num: i32,
    pub utilization_switch: i32,
    pub recent_kernel: i32,
    pub priority: i32,
    pub last_kernel_time: u64,
    /// 1.2 only: serializes host-PID detection. It records no owner.
    pub sem_postinit: Sem,
}

/// Bytes of the struct; HAMi-core's file is one byte longer (it writes a byte at
/// this offset to size the file).
pub const REGION_SIZE: usize = size_of::<SharedRegion>();
pub const SLOT_SIZE: usize = size_of::<ProcSlot>();
/// Everything before the slot table.
pub const HEADER_LEN: usize = offset_of!(SharedRegion, procs);
/// Offset and length of what follows the slot table.
pub const TAIL_OFFSET: usize = offset_of!(SharedRegion, proc_num);
pub const TAIL_LEN: usize = REGION_SIZE - TAIL_OFFSET;

// Measured with `offsetof` on HAMi-core's header (8f3a89c, version 1.2; the 1.1
// header gives the same figures): tests/fixtures/hami/layout-*.json.
const _: () = {
    assert!(size_of::<DeviceMemory>() == 64);
    assert!(size_of::<DeviceUtil>() == 48);
    assert!(size_of::<Sem>() == 32);
    assert!(size_of::<ProcSlot>() == 1960);
    assert!(offset_of!(ProcSlot, pid) == 0);
    assert!(offset_of!(ProcSlot, hostpid) == 4);
    assert!(offset_of!(ProcSlot, used) == 8);
    assert!(offset_of!(ProcSlot, monitorused) == 1032);
    assert!(offset_of!(ProcSlot, device_util) == 1160);
    assert!(offset_of!(ProcSlot, status) == 1928);
    assert!(offset_of!(ProcSlot, seqlock) == 1936);
    assert!(offset_of!(DeviceMemory, total) == 32);
    assert!(offset_of!(SharedRegion, major_version) == 4);
    assert!(offset_of!(SharedRegion, minor_version) == 8);
    assert!(offset_of!(SharedRegion, owner_pid) == 16);
    assert!(offset_of!(SharedRegion, sem) == 24);
    assert!(offset_of!(SharedRegion, device_num) == 56);
    assert!(offset_of!(SharedRegion, uuids) == 64);
    assert!(offset_of!(SharedRegion, limit) == 1600);
    assert!(offset_of!(SharedRegion, sm_limit) == 1728);
    assert!(offset_of!(SharedRegion, procs) == 1856);
    assert!(offset_of!(SharedRegion, proc_num) == 2008896);
    assert!(offset_of!(SharedRegion, priority) == 2008908);
    assert!(offset_of!(SharedRegion, last_kernel_time) == 2008912);
    assert!(offset_of!(SharedRegion, sem_postinit) == 2008920);
    assert!(size_of::<SharedRegion>() == 2008952);
};

/// Offsets used by the reader, relative to the start of the part they are read from.
pub mod off {
    use super::*;
    pub const MAGIC: usize = offset_of!(SharedRegion, initialized_flag);
    pub const MAJOR: usize = offset_of!(SharedRegion, major_version);
    pub const MINOR: usize = offset_of!(SharedRegion, minor_version);
    pub const OWNER_PID: usize = offset_of!(SharedRegion, owner_pid);
    pub const SEM: usize = offset_of!(SharedRegion, sem);
    pub const DEVICE_NUM: usize = offset_of!(SharedRegion, device_num);
    pub const UUIDS: usize = offset_of!(SharedRegion, uuids);
    pub const LIMIT: usize = offset_of!(SharedRegion, limit);
    pub const SM_LIMIT: usize = offset_of!(SharedRegion, sm_limit);
    /// In the tail (from [`TAIL_OFFSET`]).
    pub const PROC_NUM: usize = offset_of!(SharedRegion, proc_num) - TAIL_OFFSET;
    pub const PRIORITY: usize = offset_of!(SharedRegion, priority) - TAIL_OFFSET;
    pub const SEM_POSTINIT: usize = offset_of!(SharedRegion, sem_postinit) - TAIL_OFFSET;
    /// In one slot.
    pub const SLOT_PID: usize = offset_of!(ProcSlot, pid);
    pub const SLOT_HOSTPID: usize = offset_of!(ProcSlot, hostpid);
    pub const SLOT_USED: usize = offset_of!(ProcSlot, used);
    pub const SLOT_STATUS: usize = offset_of!(ProcSlot, status);
    /// In one `DeviceMemory`.
    pub const MEM_SIZE: usize = size_of::<DeviceMemory>();
    pub const MEM_CONTEXT: usize = offset_of!(DeviceMemory, context_size);
    pub const MEM_MODULE: usize = offset_of!(DeviceMemory, module_size);
    pub const MEM_DATA: usize = offset_of!(DeviceMemory, data_size);
    pub const MEM_TOTAL: usize = offset_of!(DeviceMemory, total);
}
