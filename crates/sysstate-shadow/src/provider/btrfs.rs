//! The `btrfs` provider: a read-only snapshot of the subvolume holding the paths.

use super::{Commit, CommitError, CommitRequest, Provider};
use crate::error::ShadowError;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Takes a read-only snapshot of the subvolume holding the paths: the root's, or — for a
/// volume of its own, such as a data volume on btrfs under a root on ext4 — the subvolume the
/// paths lie in. Its files keep their inodes and ctimes, and share their extents with the live
/// files: nothing is copied, in or before the freeze.
#[derive(Debug, Clone, Copy)]
pub struct BtrfsProvider;

impl Provider for BtrfsProvider {
    fn name(&self) -> &'static str {
        "btrfs"
    }

    fn snapshots(&self) -> bool {
        true
    }

    fn commit(&self, request: &CommitRequest<'_>) -> Result<Commit, CommitError> {
        snapshot(request.root, request.paths, request.dest, request.deadline)
    }
}

/// True when a snapshot of the subvolume holding `paths` (as seen from `root`) can be taken at
/// `dest`: one subvolume holds them, on the btrfs filesystem `dest` is on.
pub(super) fn snapshot_works(root: &Path, paths: &[PathBuf], dest: &Path) -> bool {
    let Ok(root) = std::fs::canonicalize(root) else { return false };
    subvolume_of(&root, paths).is_ok_and(|subvolume| {
        dest.ancestors().find(|p| p.exists()).is_some_and(|p| is_btrfs(p) && same_filesystem(&subvolume, p))
    })
}

/// The one btrfs subvolume that holds every existing path of `paths` (as seen from `root`,
/// which is canonical): the root's when none exists. An error says why there is none.
fn subvolume_of(root: &Path, paths: &[PathBuf]) -> Result<PathBuf, String> {
    let mut found: Vec<PathBuf> = Vec::new();
    for path in paths {
        let Ok(live) = std::fs::canonicalize(root.join(path.strip_prefix("/").unwrap_or(path))) else { continue };
        let subvolume =
            subvolume_root(&live).ok_or_else(|| format!("`{}` is not in a btrfs subvolume", live.display()))?;
        if !found.contains(&subvolume) {
            found.push(subvolume);
        }
    }
    if found.is_empty() {
        found.extend(subvolume_root(root));
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!("`{}` is not in a btrfs subvolume", root.display())),
        many => Err(format!(
            "the paths lie in {} btrfs subvolumes ({}): a snapshot holds one",
            many.len(),
            many.iter().map(|s| s.display().to_string()).collect::<Vec<_>>().join(", ")
        )),
    }
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

/// Deletes the snapshot in the tree of a copy, if there is one: at `tree` itself, or below it
/// where a volume's subvolume stands for its place under the root (`tree/srv/data`): the
/// folders down to it were made for it, each holding only the next. The rest of the tree is
/// the caller's to remove.
pub fn delete_snapshot_in(tree: &Path) -> std::io::Result<()> {
    let mut place = tree.to_path_buf();
    while !is_subvolume(&place) {
        let Ok(mut entries) = std::fs::read_dir(&place) else { return Ok(()) };
        match (entries.next(), entries.next()) {
            (Some(Ok(only)), None) if only.file_type().is_ok_and(|t| t.is_dir()) => place = only.path(),
            _ => return Ok(()),
        }
    }
    delete_subvolume(&place)
}

/// A read-only snapshot of the subvolume holding `paths` (as seen from `root`), made under
/// `dest` so that `dest` stands for the root: the root's subvolume at `dest` (the commit's root
/// then its place inside), a subvolume below the root at its place under `dest`.
fn snapshot(root: &Path, paths: &[PathBuf], dest: &Path, deadline: Instant) -> Result<Commit, CommitError> {
    let root = std::fs::canonicalize(root).map_err(|e| CommitError::Io(ShadowError::io(root, e)))?;
    let subvolume = subvolume_of(&root, paths).map_err(|why| CommitError::Unsupported(root.clone(), why))?;
    let live_device = std::fs::metadata(&subvolume).map_err(|e| CommitError::Io(ShadowError::io(&subvolume, e)))?.dev();
    // A base copy left by the copy provider (or a snapshot left by a process that died) gives
    // way to the snapshot.
    if std::fs::symlink_metadata(dest).is_ok() {
        delete_snapshot_in(dest)
            .and_then(|()| std::fs::remove_dir_all(dest))
            .map_err(|e| CommitError::Io(ShadowError::io(dest, e)))?;
    }
    let (at, commit_root) = if let Ok(inner) = root.strip_prefix(&subvolume) {
        (dest.to_path_buf(), dest.join(inner))
    } else if let Ok(below) = subvolume.strip_prefix(&root) {
        (dest.join(below), dest.to_path_buf())
    } else {
        return Err(CommitError::Unsupported(
            subvolume,
            format!("the subvolume is neither the root's nor below the root `{}`", root.display()),
        ));
    };
    if let Some(parent) = at.parent() {
        std::fs::create_dir_all(parent).map_err(|e| CommitError::Io(ShadowError::io(parent, e)))?;
    }
    let taken_ns = sysstate_types::time::now_ns();
    let output =
        sysstate_fs::command("btrfs").args(["subvolume", "snapshot", "-r"]).arg(&subvolume).arg(&at).output().map_err(
            |e| CommitError::Unsupported(subvolume.clone(), format!("cannot run `btrfs` (install btrfs-progs): {e}")),
        )?;
    if !output.status.success() {
        return Err(CommitError::Unsupported(subvolume, String::from_utf8_lossy(&output.stderr).trim().to_string()));
    }
    if Instant::now() > deadline {
        return Err(CommitError::Timeout);
    }
    Ok(Commit {
        root: commit_root,
        live_device: Some(live_device),
        taken_ns: Some(taken_ns),
        used: HashMap::from([(live_device, "btrfs")]),
        ..Commit::default()
    })
}

/// True when both paths are on one filesystem. On btrfs by the filesystem's UUID: `statfs`
/// gives each subvolume an fsid of its own.
fn same_filesystem(a: &Path, b: &Path) -> bool {
    match (btrfs_uuid(a), btrfs_uuid(b)) {
        (Some(a), Some(b)) => a == b,
        _ => match (rustix::fs::statfs(a), rustix::fs::statfs(b)) {
            (Ok(a), Ok(b)) => format!("{:?}", a.f_fsid) == format!("{:?}", b.f_fsid),
            _ => false,
        },
    }
}

/// `BTRFS_IOC_FS_INFO`: `_IOR(0x94, 31, struct btrfs_ioctl_fs_info_args)`, 1024 bytes.
const BTRFS_IOC_FS_INFO: u32 = 0x8400_941F;

/// The UUID of the btrfs filesystem `path` is on (`fsid` of `BTRFS_IOC_FS_INFO`, bytes 16 to
/// 32 of its answer); `None` elsewhere.
fn btrfs_uuid(path: &Path) -> Option<[u8; 16]> {
    use std::os::fd::AsRawFd;
    if !is_btrfs(path) {
        return None;
    }
    let dir = std::fs::File::open(path).ok()?;
    let mut args = [0u8; 1024];
    // SAFETY: the kernel writes at most the 1024 bytes the request's size names into `args`.
    let done = unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_FS_INFO as _, args.as_mut_ptr()) };
    (done == 0).then(|| args[16..32].try_into().expect("16 bytes"))
}
