//! Linux file metadata helpers that both the archiver (`sysstate-repo`) and the providers
//! (`sysstate-shadow`) need, kept here so neither depends on the other: extended attributes
//! and the data extents of sparse files. Paths are never followed through a final symlink.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Every extended attribute of `path` (not following a final symlink), sorted by name. A
/// filesystem without xattr support gives none.
pub fn read_xattrs(path: &Path) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; 1024];
    let length = loop {
        match rustix::fs::llistxattr(path, &mut names) {
            Ok(length) => break length,
            Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(error) => return Err(error.into()),
        }
    };
    let mut out = Vec::new();
    for name in names[..length].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 256];
        loop {
            match rustix::fs::lgetxattr(path, OsStr::from_bytes(name), &mut value) {
                Ok(len) => {
                    value.truncate(len);
                    out.push((name.to_vec(), value));
                    break;
                }
                Err(rustix::io::Errno::RANGE) => value.resize(value.len() * 4, 0),
                // Removed between the list and the read.
                Err(rustix::io::Errno::NODATA) => break,
                Err(error) => return Err(error.into()),
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Sets the extended attributes on `path` (not following a final symlink). On a symlink,
/// attributes the kernel refuses to non-root users are skipped.
pub fn write_xattrs(path: &Path, xattrs: &[(Vec<u8>, Vec<u8>)], is_symlink: bool) -> std::io::Result<()> {
    for (name, value) in xattrs {
        match rustix::fs::lsetxattr(path, OsStr::from_bytes(name), value, rustix::fs::XattrFlags::empty()) {
            Ok(()) => {}
            Err(rustix::io::Errno::PERM) if is_symlink && !rustix::process::geteuid().is_root() => {}
            Err(error) => {
                return Err(std::io::Error::other(format!(
                    "cannot set extended attribute `{}`: {error}",
                    String::from_utf8_lossy(name)
                )))
            }
        }
    }
    Ok(())
}

/// The data extents `(offset, length)` of a file of `size` bytes, or `None` when it has no
/// holes.
pub fn data_extents(file: &File, size: u64) -> std::io::Result<Option<Vec<(u64, u64)>>> {
    let mut extents = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let start = match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(offset as i64)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => break,
            Err(error) => return Err(error.into()),
        };
        let end = rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(start as i64))?.min(size);
        if end > start {
            extents.push((start, end - start));
        }
        offset = end;
    }
    if extents.len() == 1 && extents[0] == (0, size) {
        return Ok(None);
    }
    Ok(Some(extents))
}
