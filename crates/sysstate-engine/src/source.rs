//! The shadow-set source: what a backup reads. Every entry is read from the shadow set's copy,
//! and recorded with the identity of the live entry it was copied from; but where the live
//! entry is provably the one the copy holds, its metadata, names, extended attributes, link
//! target or content are read from it instead, whose inode is in the cache — the copy's (a fresh
//! btrfs snapshot's, new clones) are cold and cost a lookup each, and again to release.
//!
//! A live entry stands for the copy's (it is its **twin**) when, by the ctime, which moves with
//! every change of content, mode, owner, extended attribute, link or rename:
//! - it is the parent version's entry, untouched since (same device, inode, ctime, mtime, size
//!   and type): the copy, made in between, holds it as the parent does (every provider);
//! - its ctime is well before a btrfs snapshot was taken: the snapshot shares its inode, number
//!   and all, with the live one (a first backup, or an entry changed since the parent).
//!
//! What is read from a twin after it was found stands only if it is still that twin once read;
//! a file's content only if the live file has the snapshot's identity before and after the read.

use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use sysstate_repo::meta::{ctime_ns, read_xattrs, settled_before, untouched_metadata};
use sysstate_repo::source::{self, Identity, Source, Xattrs};
use sysstate_repo::tree::{FileContent, Node};
use sysstate_shadow::ShadowSet;

/// The live identity of a copied entry, by its path as seen from the root.
type IdentityFn = dyn Fn(&Path) -> Option<Identity> + Send + Sync;

/// A shadow set's copy of the live tree under `live_root`.
pub struct ShadowSource {
    copy_root: PathBuf,
    live_root: PathBuf,
    identity: Box<IdentityFn>,
    /// For a btrfs snapshot: when it was taken (see [`ShadowSet::taken_ns`]), and the live
    /// device its entries' identities are recorded with.
    snapshot: Option<(i64, u64)>,
}

impl std::fmt::Debug for ShadowSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowSource").field("copy_root", &self.copy_root).field("live_root", &self.live_root).finish()
    }
}

impl ShadowSource {
    /// What `set` copied of the live tree under `live_root`.
    pub fn new(set: &ShadowSet, live_root: &Path) -> ShadowSource {
        ShadowSource {
            copy_root: set.root().to_path_buf(),
            live_root: live_root.to_path_buf(),
            identity: Box::new(set.live_identity()),
            snapshot: set.taken_ns().zip(set.live_device()),
        }
    }

    /// The live entry at `live` when it is the copy's twin (see the module's documentation).
    fn twin(&self, live: &Path, parent: Option<&Node>) -> Option<Metadata> {
        if parent.is_none() && self.snapshot.is_none() {
            return None;
        }
        let meta = std::fs::symlink_metadata(live).ok()?;
        let twin = parent.is_some_and(|parent| untouched_metadata(parent, &meta))
            || self.snapshot.is_some_and(|(taken, _)| settled_before(ctime_ns(&meta), taken));
        twin.then_some(meta)
    }

    /// What the live file must be for a snapshot's file `meta` to be read from it: one whose
    /// ctime was settled before the snapshot, checked again before and after the read.
    fn live_file(&self, meta: &Metadata) -> Option<LiveFile> {
        let (taken, device) = self.snapshot?;
        (meta.is_file() && settled_before(ctime_ns(meta), taken)).then(|| LiveFile {
            device,
            inode: meta.ino(),
            ctime_ns: ctime_ns(meta),
            size: meta.size(),
        })
    }
}

/// Where one entry is read: in the copy, and perhaps from its live twin.
#[derive(Debug)]
pub struct ShadowPlace {
    /// The entry in the copy.
    path: PathBuf,
    /// The live entry it is a copy of (none for one read from elsewhere), and whether it stands
    /// for it.
    live: Option<LivePath>,
    /// For a file of a snapshot: what the live file must be to be read instead.
    file: Option<LiveFile>,
}

/// The live path of an entry of the copy, and — when it stands for the copy's entry — the
/// identity it had then.
#[derive(Debug)]
struct LivePath {
    path: PathBuf,
    twin: Option<Twin>,
}

/// A live entry's device, inode and ctime when it was found to stand for the copy's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Twin {
    device: u64,
    inode: u64,
    ctime_ns: i64,
}

impl Twin {
    fn of(meta: &Metadata) -> Twin {
        Twin { device: meta.dev(), inode: meta.ino(), ctime_ns: ctime_ns(meta) }
    }
}

impl LivePath {
    /// True when the live entry is still the twin it was: what was read from it after it was
    /// found to be one (its names, extended attributes or link target) is the copy's. An entry
    /// changed, removed or replaced in between has another ctime or inode.
    fn still_twin(&self) -> bool {
        self.twin.is_some_and(|twin| std::fs::symlink_metadata(&self.path).is_ok_and(|meta| Twin::of(&meta) == twin))
    }
}

impl ShadowPlace {
    /// `read` from the live twin if it is still one after, else from the copy.
    fn read<T>(&self, read: impl Fn(&Path) -> std::io::Result<T>) -> std::io::Result<T> {
        if let Some(live) = self.live.as_ref().filter(|live| live.twin.is_some()) {
            if let Ok(value) = read(&live.path) {
                if live.still_twin() {
                    return Ok(value);
                }
            }
        }
        read(&self.path)
    }
}

/// The identity a live file must have, before and after it is read, to stand for the
/// snapshot's.
#[derive(Debug)]
struct LiveFile {
    device: u64,
    inode: u64,
    ctime_ns: i64,
    size: u64,
}

impl LiveFile {
    fn matches(&self, meta: &Metadata) -> bool {
        meta.is_file()
            && meta.dev() == self.device
            && meta.ino() == self.inode
            && ctime_ns(meta) == self.ctime_ns
            && meta.size() == self.size
    }
}

impl Source for ShadowSource {
    type Place = ShadowPlace;

    fn root(&self) -> ShadowPlace {
        let live = (self.copy_root != self.live_root).then(|| LivePath { path: self.live_root.clone(), twin: None });
        ShadowPlace { path: self.copy_root.clone(), live, file: None }
    }

    fn entry(
        &self,
        dir: &ShadowPlace,
        name: &OsStr,
        at: Option<&Path>,
        parent: Option<&Node>,
    ) -> std::io::Result<Option<(Metadata, ShadowPlace)>> {
        let path = at.map_or_else(|| dir.path.join(name), Path::to_path_buf);
        // What is read from elsewhere has no live twin here.
        let live_path = dir.live.as_ref().filter(|_| at.is_none()).map(|live| live.path.join(name));
        if let Some(live) = live_path.as_deref() {
            if let Some(meta) = self.twin(live, parent) {
                let file = self.live_file(&meta);
                let live = LivePath { path: live.to_path_buf(), twin: Some(Twin::of(&meta)) };
                return Ok(Some((meta, ShadowPlace { path, live: Some(live), file })));
            }
        }
        let Some(meta) = source::metadata(&path)? else { return Ok(None) };
        let file = live_path.as_ref().and_then(|_| self.live_file(&meta));
        let live = live_path.map(|path| LivePath { path, twin: None });
        Ok(Some((meta, ShadowPlace { path, live, file })))
    }

    fn list(&self, dir: &ShadowPlace) -> std::io::Result<Vec<OsString>> {
        dir.read(source::list)
    }

    fn xattrs(&self, entry: &ShadowPlace) -> std::io::Result<Xattrs> {
        entry.read(read_xattrs)
    }

    fn read_link(&self, entry: &ShadowPlace) -> std::io::Result<PathBuf> {
        entry.read(|path| std::fs::read_link(path))
    }

    fn identity(&self, path: &Path) -> Option<Identity> {
        (self.identity)(path)
    }

    fn read(
        &self,
        file: &ShadowPlace,
        read: &mut dyn FnMut(&File) -> std::io::Result<(FileContent, u64)>,
    ) -> std::io::Result<(FileContent, u64)> {
        // The live file, if it is what the snapshot holds before and after the read; else the copy.
        if let (Some(live), Some(path)) = (&file.file, &file.live) {
            if let Ok(opened) = source::open_file(&path.path) {
                if opened.metadata().is_ok_and(|meta| live.matches(&meta)) {
                    let content = read(&opened);
                    if content.is_ok() && opened.metadata().is_ok_and(|meta| live.matches(&meta)) {
                        return content;
                    }
                }
            }
        }
        read(&source::open_file(&file.path)?)
    }

    fn prefetch_root(&self) -> PathBuf {
        // A snapshot's entries are looked up live first: warm the live tree.
        if self.snapshot.is_some() {
            self.live_root.clone()
        } else {
            self.copy_root.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is read from a live twin after it was found to be one stands only if the entry is
    /// still that twin: a name added or removed, an extended attribute set, a mode changed or the
    /// entry replaced in between each make it not one.
    #[test]
    fn a_live_twin_changed_after_it_was_found_is_no_longer_one() {
        let dir = tempfile::tempdir().unwrap();
        let live = |path: &Path| LivePath {
            path: path.to_path_buf(),
            twin: Some(Twin::of(&std::fs::symlink_metadata(path).unwrap())),
        };
        let tick = || std::thread::sleep(std::time::Duration::from_millis(20));
        let folder = dir.path().join("folder");
        std::fs::create_dir(&folder).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("before", &link).unwrap();
        let changes: [(&Path, &dyn Fn()); 5] = [
            (&folder, &|| std::fs::write(folder.join("new"), "").unwrap()),
            (&folder, &|| std::fs::remove_file(folder.join("new")).unwrap()),
            (&file, &|| rustix::fs::setxattr(&file, "user.sysstate", b"v", rustix::fs::XattrFlags::empty()).unwrap()),
            (&file, &|| std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap()),
            (&link, &|| {
                std::os::unix::fs::symlink("after", dir.path().join("link.new")).unwrap();
                std::fs::rename(dir.path().join("link.new"), &link).unwrap();
            }),
        ];
        for (path, change) in changes {
            let twin = live(path);
            assert!(twin.still_twin(), "{} changed by itself", path.display());
            tick();
            change();
            assert!(!twin.still_twin(), "a change to {} went unseen", path.display());
        }
        assert!(!LivePath { path: file.clone(), twin: None }.still_twin(), "not a twin to begin with");
    }
}
