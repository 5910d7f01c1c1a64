//! Reading one HAMi-core region file: bounded `pread`s, every field validated.

use crate::layout::{self, off, HEADER_LEN, MAX_DEVICES, MAX_PROCS, SLOT_SIZE, TAIL_LEN};
use crate::sem::SemState;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use vigil_region::ErrorReason;

/// Why a file cannot be read as a HAMi-core region. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum HamiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a regular file ({what}); never read")]
    NotRegularFile { path: PathBuf, what: &'static str },
    #[error(
        "{path}: not a HAMi-core region (initialized_flag {found}, expected {})",
        layout::MAGIC
    )]
    WrongMagic { path: PathBuf, found: i32 },
    #[error(
        "{path}: HAMi-core region version {major}.{minor} is not supported (supported: 1.1, 1.2)"
    )]
    UnsupportedVersion {
        path: PathBuf,
        major: u32,
        minor: u32,
    },
    #[error("{path}: {len} bytes, a HAMi-core region needs {expected}")]
    Truncated {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    #[error("{path}: impossible {field} {value} ({why})")]
    Corrupt {
        path: PathBuf,
        field: &'static str,
        value: i128,
        why: &'static str,
    },
}

impl HamiError {
    /// The reason this failure is counted under: the same list as Vigil's own regions.
    pub fn reason(&self) -> ErrorReason {
        match self {
            HamiError::Io { source, .. } => ErrorReason::of_io(source),
            HamiError::NotRegularFile { .. } => ErrorReason::NotRegular,
            HamiError::WrongMagic { .. } => ErrorReason::BadMagic,
            HamiError::UnsupportedVersion { .. } => ErrorReason::BadVersion,
            HamiError::Truncated { .. } => ErrorReason::Truncated,
            HamiError::Corrupt { .. } => ErrorReason::Corrupt,
        }
    }
}

/// One device of one process slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotDevice {
    /// What HAMi-core counts against the limit.
    pub total: u64,
    pub context: u64,
    pub module: u64,
    pub data: u64,
}

/// One used process slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HamiSlot {
    /// Index in the slot table.
    pub index: usize,
    /// The process's PID in its own namespace.
    pub pid: u32,
    /// The host PID HAMi-core detected; 0 = detection failed (or has not run yet).
    pub host_pid: u32,
    pub status: i32,
    /// Per device, `device_count()` entries.
    pub devices: Vec<SlotDevice>,
}

/// What one read of a region file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HamiRegion {
    pub major: u32,
    pub minor: u32,
    /// Devices the region describes: `device_num`, or when HAMi-core has not filled
    /// it in, the highest device with a limit or with usage.
    pub devices: usize,
    /// Per device: UUID as HAMi-core recorded it (may be empty).
    pub uuids: Vec<String>,
    /// Per device, bytes; 0 = no limit.
    pub limits: Vec<u64>,
    /// Per device, percent of SMs; 0 = no limit.
    pub sm_limits: Vec<u64>,
    /// Namespace PID recorded as holding `sem`, 0 = none.
    pub owner_pid: u64,
    pub sem: SemState,
    /// Only in 1.2.
    pub sem_postinit: Option<SemState>,
    pub priority: i32,
    pub slots: Vec<HamiSlot>,
    /// (device, inode) of the file read, to find the processes that map it.
    pub file_id: (u64, u64),
}

impl HamiRegion {
    /// Sum of the slots' `total` on device `d`.
    pub fn used(&self, d: usize) -> u64 {
        self.slots
            .iter()
            .filter_map(|s| s.devices.get(d))
            .fold(0u64, |a, x| a.saturating_add(x.total))
    }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn i32_at(b: &[u8], o: usize) -> i32 {
    i32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Reads `buf.len()` bytes at `at`, or says how long the file turned out to be.
fn read_exact_at(f: &File, path: &Path, buf: &mut [u8], at: u64) -> Result<(), HamiError> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], at + done as u64) {
            Ok(0) => {
                return Err(HamiError::Truncated {
                    path: path.to_path_buf(),
                    len: at + done as u64,
                    expected: layout::REGION_SIZE as u64,
                })
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(HamiError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Opens without following a symlink and without blocking on a FIFO, and checks that
/// what was opened is a regular file.
fn open_regular(path: &Path) -> Result<(File, std::fs::Metadata), HamiError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => HamiError::NotRegularFile {
                path: path.to_path_buf(),
                what: "a symlink",
            },
            _ => HamiError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let m = f.metadata().map_err(|source| HamiError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !m.file_type().is_file() {
        return Err(HamiError::NotRegularFile {
            path: path.to_path_buf(),
            what: "not a regular file",
        });
    }
    Ok((f, m))
}

/// True if the file starts like a HAMi-core region (magic only; versions are checked
/// by [`read_region`]). Reads 4 bytes.
pub fn looks_like_hami(path: &Path) -> bool {
    let Ok((f, _)) = open_regular(path) else {
        return false;
    };
    let mut b = [0u8; 4];
    read_exact_at(&f, path, &mut b, 0).is_ok() && i32::from_ne_bytes(b) == layout::MAGIC
}

/// Reads the region at `path`: the header, the used slots and the tail, about
/// 2 KiB plus 2 KiB per process (never the whole 2 MiB).
pub fn read_region(path: &Path) -> Result<HamiRegion, HamiError> {
    use std::os::unix::fs::MetadataExt;
    let (f, m) = open_regular(path)?;
    let corrupt = |field: &'static str, value: i128, why: &'static str| HamiError::Corrupt {
        path: path.to_path_buf(),
        field,
        value,
        why,
    };
    if m.len() < layout::REGION_SIZE as u64 {
        // Checked again by every read: the file may shrink under us.
        return Err(HamiError::Truncated {
            path: path.to_path_buf(),
            len: m.len(),
            expected: layout::REGION_SIZE as u64,
        });
    }
    let mut head = vec![0u8; HEADER_LEN];
    read_exact_at(&f, path, &mut head, 0)?;
    let magic = i32_at(&head, off::MAGIC);
    if magic != layout::MAGIC {
        return Err(HamiError::WrongMagic {
            path: path.to_path_buf(),
            found: magic,
        });
    }
    let (major, minor) = (u32_at(&head, off::MAJOR), u32_at(&head, off::MINOR));
    if !layout::SUPPORTED_VERSIONS.contains(&(major, minor)) {
        return Err(HamiError::UnsupportedVersion {
            path: path.to_path_buf(),
            major,
            minor,
        });
    }
    let mut tail = vec![0u8; TAIL_LEN];
    read_exact_at(&f, path, &mut tail, layout::TAIL_OFFSET as u64)?;
    let proc_num = i32_at(&tail, off::PROC_NUM);
    if !(0..=MAX_PROCS as i32).contains(&proc_num) {
        return Err(corrupt("proc_num", proc_num.into(), "must be 0 to 1024"));
    }
    let device_num = u64_at(&head, off::DEVICE_NUM);
    if device_num > MAX_DEVICES as u64 {
        return Err(corrupt("device_num", device_num.into(), "must be 0 to 16"));
    }
    let sem = SemState::from_word(u64_at(&head, off::SEM));
    let sem_postinit = (minor >= 2).then(|| SemState::from_word(u64_at(&tail, off::SEM_POSTINIT)));
    for (name, s) in [("sem", Some(sem)), ("sem_postinit", sem_postinit)] {
        if let Some(s) = s {
            // A binary lock; HAMi-core's timeout "force post" can push it to 2 or a
            // little more, but never past one per process.
            if s.value > MAX_PROCS as u32 + 1 || s.waiters > MAX_PROCS as u32 * 64 {
                return Err(corrupt(
                    name,
                    s.value.into(),
                    "not a binary semaphore's value",
                ));
            }
        }
    }
    let owner_pid = u64_at(&head, off::OWNER_PID);
    if owner_pid > i32::MAX as u64 {
        return Err(corrupt("owner_pid", owner_pid.into(), "not a PID"));
    }

    let mut table = vec![0u8; proc_num as usize * SLOT_SIZE];
    read_exact_at(&f, path, &mut table, layout::HEADER_LEN as u64)?;
    let mut slots = Vec::with_capacity(proc_num as usize);
    let mut devices = device_num as usize;
    for (index, s) in table.chunks_exact(SLOT_SIZE).enumerate() {
        let pid = i32_at(s, off::SLOT_PID);
        let host_pid = i32_at(s, off::SLOT_HOSTPID);
        if pid < 0 {
            return Err(corrupt("slot pid", pid.into(), "negative"));
        }
        if host_pid < 0 {
            return Err(corrupt("slot hostpid", host_pid.into(), "negative"));
        }
        let mut devs = Vec::with_capacity(MAX_DEVICES);
        for d in 0..MAX_DEVICES {
            let b = off::SLOT_USED + d * off::MEM_SIZE;
            let dev = SlotDevice {
                total: u64_at(s, b + off::MEM_TOTAL),
                context: u64_at(s, b + off::MEM_CONTEXT),
                module: u64_at(s, b + off::MEM_MODULE),
                data: u64_at(s, b + off::MEM_DATA),
            };
            // No device has 2^56 bytes; such a figure is garbage, not usage.
            if dev.total >= 1 << 56 {
                return Err(corrupt(
                    "slot used total",
                    dev.total.into(),
                    "larger than any device",
                ));
            }
            if dev.total != 0 && device_num == 0 {
                devices = devices.max(d + 1);
            }
            devs.push(dev);
        }
        slots.push(HamiSlot {
            index,
            pid: pid as u32,
            host_pid: host_pid as u32,
            status: i32_at(s, off::SLOT_STATUS),
            devices: devs,
        });
    }
    let limits: Vec<u64> = (0..MAX_DEVICES)
        .map(|d| u64_at(&head, off::LIMIT + 8 * d))
        .collect();
    let sm_limits: Vec<u64> = (0..MAX_DEVICES)
        .map(|d| u64_at(&head, off::SM_LIMIT + 8 * d))
        .collect();
    if device_num == 0 {
        if let Some(last) = limits.iter().rposition(|&l| l != 0) {
            devices = devices.max(last + 1);
        }
    }
    if let Some(&p) = sm_limits[..devices].iter().find(|&&p| p > 100) {
        return Err(corrupt("sm_limit", p.into(), "a percentage, 0 to 100"));
    }
    let mut uuids = Vec::with_capacity(devices);
    for d in 0..devices {
        let raw = &head[off::UUIDS + d * layout::UUID_LEN..][..layout::UUID_LEN];
        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        let text = &raw[..end];
        if end == raw.len() || !text.iter().all(|c| c.is_ascii_graphic()) {
            return Err(corrupt(
                "device uuid",
                d as i128,
                "not a NUL-terminated printable string",
            ));
        }
        uuids.push(String::from_utf8_lossy(text).into_owned());
    }
    for s in &mut slots {
        s.devices.truncate(devices);
    }
    Ok(HamiRegion {
        major,
        minor,
        devices,
        uuids,
        limits: limits[..devices].to_vec(),
        sm_limits: sm_limits[..devices].to_vec(),
        owner_pid,
        sem,
        sem_postinit,
        priority: i32_at(&tail, off::PRIORITY),
        slots,
        file_id: (m.dev(), m.ino()),
    })
}
