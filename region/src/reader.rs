//! The read-only handle the exporter and tools use, and the read methods both handles
//! share.

use crate::error::{io_err, RegionError};
use crate::file::file_len;
use crate::layout::*;
use crate::region::{layout_of, Region};
use crate::ring::Event;
use crate::snapshot::{KnownLiveness, Snapshot};
use crate::sys::{self, Mapping};
use crate::validate::validate;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::*;

mod sealed {
    /// Lets the shared read methods reach the mapping without exposing it: a caller
    /// holding `&RegionLayout` of a read-only mapping could try to store into it.
    pub trait Mapped {
        fn mapped_layout(&self) -> &crate::layout::RegionLayout;
    }
}

impl sealed::Mapped for Region {
    fn mapped_layout(&self) -> &RegionLayout {
        self.layout()
    }
}

impl sealed::Mapped for RegionReader {
    fn mapped_layout(&self) -> &RegionLayout {
        self.layout()
    }
}

/// Reading the event ring, from either handle.
pub trait RegionRead: sealed::Mapped {
    /// A consumer starting at the oldest event still in the ring.
    fn ring_consumer(&self) -> crate::ring::RingConsumer {
        crate::ring::RingConsumer::new(self.mapped_layout())
    }

    /// A consumer that sees only events written from now on.
    fn ring_consumer_from_now(&self) -> crate::ring::RingConsumer {
        crate::ring::RingConsumer::from_now(self.mapped_layout())
    }

    /// (limit, used) of device `dev`, without a full snapshot; `None` if the region
    /// has no such device.
    fn device_usage(&self, dev: usize) -> Option<(u64, u64)> {
        let l = self.mapped_layout();
        let n = (l.header.device_count.load(Relaxed) as usize).min(MAX_DEVICES);
        (dev < n).then(|| {
            let d = &l.devices[dev];
            (d.limit.load(Relaxed), d.used.load(Acquire))
        })
    }

    /// Events ever started in the ring (its head position).
    fn ring_head(&self) -> u64 {
        self.mapped_layout().ring.head.load(Acquire)
    }

    /// Delivers up to `max` events to `f` and accounts for every position passed.
    fn drain(
        &self,
        consumer: &mut crate::ring::RingConsumer,
        max: usize,
        f: impl FnMut(Event),
    ) -> crate::ring::DrainStats {
        consumer.drain(self.mapped_layout(), max, f)
    }
}

impl RegionRead for Region {}
impl RegionRead for RegionReader {}

/// A read-only handle for the exporter: `PROT_READ` mapping, every field validated,
/// and no way to write. It holds no tokens and takes no locks.
pub struct RegionReader {
    path: PathBuf,
    map: Mapping,
    _file: File,
    /// Our entry in the SIGBUS guard, if it had room.
    guard: Option<usize>,
}

impl Drop for RegionReader {
    fn drop(&mut self) {
        // Before the mapping goes: the guard must never touch an address that is no
        // longer ours.
        if let Some(g) = self.guard {
            sys::sigbus::unregister(g);
        }
    }
}

impl RegionReader {
    /// Opens and validates the region at `path` read-only. Never creates, follows a
    /// symlink, blocks on a FIFO, or maps a file shorter than the layout. Install the
    /// SIGBUS guard first ([`install_sigbus_guard`](crate::install_sigbus_guard)) so
    /// that a file truncated later cannot kill the reader.
    pub fn open(path: impl AsRef<Path>) -> Result<RegionReader, RegionError> {
        let path = path.as_ref();
        // Never follow a symlink, never block on a FIFO: the path is in a directory
        // tenants can write.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(io_err(path, "open read-only"))?;
        let meta = file.metadata().map_err(io_err(path, "stat"))?;
        if !meta.file_type().is_file() {
            return Err(RegionError::NotRegularFile {
                path: path.to_path_buf(),
                what: "not a regular file".into(),
            });
        }
        let len = meta.len();
        if len < std::mem::size_of::<Header>() as u64 {
            return Err(RegionError::Truncated {
                path: path.to_path_buf(),
                len,
                expected: REGION_SIZE as u64,
            });
        }
        // Check the header by plain reads before mapping the whole layout, so a short
        // file with a valid-looking header is reported, not mapped past its end.
        let mut head = [0u8; 16];
        (&file)
            .read_exact(&mut head)
            .map_err(io_err(path, "read header"))?;
        let magic = u64::from_le_bytes(head[0..8].try_into().unwrap_or_default());
        let version = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default());
        if magic != MAGIC {
            return Err(RegionError::WrongMagic {
                path: path.to_path_buf(),
                found: magic,
            });
        }
        if version != LAYOUT_VERSION {
            return Err(RegionError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: LAYOUT_VERSION,
            });
        }
        if len < REGION_SIZE as u64 {
            return Err(RegionError::Truncated {
                path: path.to_path_buf(),
                len,
                expected: REGION_SIZE as u64,
            });
        }
        let map =
            Mapping::new(&file, REGION_SIZE, false).map_err(io_err(path, "mmap read-only"))?;
        let guard = sys::sigbus::register(map.as_ptr() as usize, REGION_SIZE, false);
        let reader = RegionReader {
            path: path.to_path_buf(),
            map,
            _file: file,
            guard,
        };
        validate(reader.layout(), path, len)?;
        reader.check_poison()?;
        Ok(reader)
    }

    /// True once a read of this mapping faulted because the file was truncated (with
    /// the SIGBUS guard installed): everything read since may be zeros. Drop it.
    pub fn is_poisoned(&self) -> bool {
        self.guard.is_some_and(sys::sigbus::poisoned)
    }

    fn check_poison(&self) -> Result<(), RegionError> {
        if self.is_poisoned() {
            return Err(RegionError::Truncated {
                path: self.path.clone(),
                len: file_len(&self._file, &self.path).unwrap_or(0),
                expected: REGION_SIZE as u64,
            });
        }
        Ok(())
    }

    /// The path this reader was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-checks the header (it may have been re-created or damaged since open).
    pub fn revalidate(&self) -> Result<(), RegionError> {
        self.check_poison()?;
        // The length first: reading a header past a new end of file would fault.
        let len = file_len(&self._file, &self.path)?;
        if len < REGION_SIZE as u64 {
            return Err(RegionError::Truncated {
                path: self.path.clone(),
                len,
                expected: REGION_SIZE as u64,
            });
        }
        validate(self.layout(), &self.path, len)?;
        self.check_poison()
    }

    pub(crate) fn layout(&self) -> &RegionLayout {
        layout_of(&self.map)
    }

    /// A plain copy of everything the region holds, for export (see [`Snapshot`]).
    /// Check [`revalidate`](Self::revalidate) first: a copy of a damaged region is
    /// garbage, if harmless garbage.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::read(self.layout(), &self._file, &|_| None)
    }

    /// [`snapshot`](Self::snapshot), taking each slot's liveness from `known` where
    /// it has an answer: probing a token is a syscall per slot, and an exporter that
    /// probes in the background need not pay for it in every scrape.
    pub fn snapshot_with(&self, known: KnownLiveness) -> Snapshot {
        Snapshot::read(self.layout(), &self._file, known)
    }
}
