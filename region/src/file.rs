//! The region file itself: opened or created safely in a directory tenants can write,
//! and given its full size with every block allocated before anyone maps it.

use crate::error::{io_err, RegionError};
use crate::layout::REGION_SIZE;
use crate::sys;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub(crate) fn file_len(file: &File, path: &Path) -> Result<u64, RegionError> {
    Ok(file.metadata().map_err(io_err(path, "stat"))?.len())
}

/// Opens (or creates, with exactly `mode`) the region file for writing. The path is
/// usually in a directory others can write (/tmp, a shared volume): never follow a
/// symlink, never open anything but a regular file with one name (a hard link to some
/// other file would make us write into it).
pub(crate) fn open_region_file(path: &Path, mode: u32) -> Result<File, RegionError> {
    let flags = libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let created = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(flags)
        .open(path);
    let file = match created {
        Ok(f) => {
            // The umask must not decide who can join (0644 would lock out other UIDs
            // of the container, which would then run without limits).
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(io_err(path, "chmod"))?;
            f
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
            .map_err(io_err(path, "open"))?,
        Err(e) => return Err(io_err(path, "create")(e)),
    };
    let meta = file.metadata().map_err(io_err(path, "stat"))?;
    use std::os::unix::fs::MetadataExt;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err(RegionError::NotRegularFile {
            path: path.to_path_buf(),
            what: format!(
                "not a regular file with a single name (links: {})",
                meta.nlink()
            ),
        });
    }
    Ok(file)
}

/// Extends an empty or all-zero file to the layout size; refuses a short file with data.
pub(crate) fn grow_if_blank(file: &File, path: &Path) -> Result<(), RegionError> {
    let len = file_len(file, path)?;
    if len >= REGION_SIZE as u64 {
        return Ok(());
    }
    let mut buf = Vec::with_capacity(len as usize);
    (&*file)
        .read_to_end(&mut buf)
        .map_err(io_err(path, "read"))?;
    if buf.iter().any(|&b| b != 0) {
        return Err(RegionError::Truncated {
            path: path.to_path_buf(),
            len,
            expected: REGION_SIZE as u64,
        });
    }
    reserve_blocks(file, path)
}

/// Grows the file to the layout size with every block allocated (see
/// `sys::allocate`). On a filesystem without `fallocate` it is grown sparse, as before.
pub(crate) fn reserve_blocks(file: &File, path: &Path) -> Result<(), RegionError> {
    match sys::allocate(file, REGION_SIZE as u64) {
        Ok(true) => Ok(()),
        Ok(false) => {
            if file_len(file, path)? < REGION_SIZE as u64 {
                file.set_len(REGION_SIZE as u64)
                    .map_err(io_err(path, "grow"))?;
            }
            Ok(())
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) => {
            Err(RegionError::NoSpace {
                path: path.to_path_buf(),
                needed: REGION_SIZE as u64,
            })
        }
        Err(e) => Err(io_err(path, "allocate the file's blocks (fallocate)")(e)),
    }
}
