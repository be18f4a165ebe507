//! The `btrfs` provider: a read-only snapshot of the subvolume holding the root.

use super::{Commit, CommitError, CommitRequest, Provider};
use crate::error::ShadowError;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Takes a read-only snapshot of the subvolume holding the root. Its files keep their inodes
/// and ctimes, and share their extents with the live files: nothing is copied, in or before the
/// freeze.
#[derive(Debug, Clone, Copy)]
pub struct BtrfsProvider;

impl Provider for BtrfsProvider {
    fn name(&self) -> &'static str {
        "btrfs"
    }

    fn commit(&self, request: &CommitRequest<'_>) -> Result<Commit, CommitError> {
        snapshot(request.root, request.dest, request.deadline)
    }
}

/// True when a snapshot of the subvolume holding `root` can be taken at `dest`: both on one
/// btrfs filesystem.
pub(super) fn snapshot_works(root: &Path, dest: &Path) -> bool {
    is_btrfs(root) && dest.ancestors().find(|p| p.exists()).is_some_and(|p| is_btrfs(p) && same_filesystem(root, p))
}

/// `statfs` magic of btrfs.
const BTRFS_MAGIC: i64 = 0x9123_683E;
/// The inode number of every btrfs subvolume's root directory.
const BTRFS_SUBVOLUME_ROOT_INODE: u64 = 256;

/// True when `path` is on btrfs.
pub fn is_btrfs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type == BTRFS_MAGIC)
}

/// The root of the btrfs subvolume holding `path`.
fn subvolume_root(path: &Path) -> Option<PathBuf> {
    let device = std::fs::metadata(path).ok()?.dev();
    path.ancestors()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.dev() == device && m.ino() == BTRFS_SUBVOLUME_ROOT_INODE))
        .map(Path::to_path_buf)
}

/// True when `dir` is a btrfs subvolume (a snapshot), which only `btrfs subvolume delete` removes.
pub fn is_subvolume(dir: &Path) -> bool {
    is_btrfs(dir) && std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir() && m.ino() == BTRFS_SUBVOLUME_ROOT_INODE)
}

/// Deletes a snapshot made by the btrfs provider.
pub fn delete_subvolume(dir: &Path) -> std::io::Result<()> {
    let output = sysstate_fs::command("btrfs").args(["subvolume", "delete"]).arg(dir).output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "btrfs subvolume delete: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// A read-only snapshot of the subvolume holding `root`, at `dest`.
fn snapshot(root: &Path, dest: &Path, deadline: Instant) -> Result<Commit, CommitError> {
    let root = std::fs::canonicalize(root).map_err(|e| CommitError::Io(ShadowError::io(root, e)))?;
    let subvolume = subvolume_root(&root)
        .ok_or_else(|| CommitError::Unsupported(root.clone(), "not in a btrfs subvolume".into()))?;
    let live_device = std::fs::metadata(&root).map_err(|e| CommitError::Io(ShadowError::io(&root, e)))?.dev();
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| CommitError::Io(ShadowError::io(parent, e)))?;
    }
    // A base copy left by the copy provider gives way to the snapshot.
    if std::fs::symlink_metadata(dest).is_ok() {
        let removed = if is_subvolume(dest) { delete_subvolume(dest) } else { std::fs::remove_dir_all(dest) };
        removed.map_err(|e| CommitError::Io(ShadowError::io(dest, e)))?;
    }
    let taken_ns = sysstate_types::time::now_ns();
    let output = sysstate_fs::command("btrfs")
        .args(["subvolume", "snapshot", "-r"])
        .arg(&subvolume)
        .arg(dest)
        .output()
        .map_err(|e| {
            CommitError::Unsupported(subvolume.clone(), format!("cannot run `btrfs` (install btrfs-progs): {e}"))
        })?;
    if !output.status.success() {
        return Err(CommitError::Unsupported(subvolume, String::from_utf8_lossy(&output.stderr).trim().to_string()));
    }
    if Instant::now() > deadline {
        return Err(CommitError::Timeout);
    }
    let inner = root.strip_prefix(&subvolume).unwrap_or(Path::new(""));
    Ok(Commit {
        root: dest.join(inner),
        live_device: Some(live_device),
        taken_ns: Some(taken_ns),
        used: HashMap::from([(live_device, "btrfs")]),
        ..Commit::default()
    })
}

/// True when both paths are on one filesystem (`statfs` fsid).
fn same_filesystem(a: &Path, b: &Path) -> bool {
    match (rustix::fs::statfs(a), rustix::fs::statfs(b)) {
        (Ok(a), Ok(b)) => format!("{:?}", a.f_fsid) == format!("{:?}", b.f_fsid),
        _ => false,
    }
}
