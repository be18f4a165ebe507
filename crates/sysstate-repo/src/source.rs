//! Where the archiver reads what a version holds: a [`Source`]. The archiver walks the tree the
//! source shows it, as seen from the root the version is of, and never asks where the bytes
//! really are: a plain folder ([`TreeSource`]), or a point-in-time copy that may read an entry
//! from elsewhere when that is the same entry (the engine's shadow-set source; restic hides
//! VSS the same way behind its `fs.FS`).

use crate::tree::Node;
use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Extended attributes: names and values.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// The identity a version records for an entry in place of its metadata's own: device, and
/// inode, ctime (ns) and link count when they differ too (`None`: the metadata's stand).
pub type Identity = (u64, Option<u64>, Option<i64>, Option<u64>);

/// A tree to back up.
pub trait Source: Sync {
    /// Where the source reads one entry (its own business; the archiver only hands it back).
    type Place: Send + Sync;

    /// The root (`/`).
    fn root(&self) -> Self::Place;

    /// Entry `name` of directory `dir`, with its metadata; `None` when there is none. `at`, when
    /// given, is where to read it instead (a selection read from elsewhere). `parent` is the
    /// parent version's entry when the archiver trusts it as the entry it had then: a source may
    /// then take the metadata from wherever that is cheapest, as long as it is the same entry.
    fn entry(
        &self,
        dir: &Self::Place,
        name: &OsStr,
        at: Option<&Path>,
        parent: Option<&Node>,
    ) -> std::io::Result<Option<(Metadata, Self::Place)>>;

    /// The names in a directory, in no order.
    fn list(&self, dir: &Self::Place) -> std::io::Result<Vec<OsString>>;

    /// An entry's extended attributes.
    fn xattrs(&self, entry: &Self::Place) -> std::io::Result<Xattrs>;

    /// A symlink's target.
    fn read_link(&self, entry: &Self::Place) -> std::io::Result<PathBuf>;

    /// The identity to record for the entry at `path` (absolute as seen from the root), when it
    /// is not its metadata's (a copy's files have new inodes).
    fn identity(&self, path: &Path) -> Option<Identity> {
        let _ = path;
        None
    }

    /// Reads a file's content with `read`, from the file the source opens for it.
    fn read(
        &self,
        file: &Self::Place,
        read: &mut dyn FnMut(&File) -> std::io::Result<(crate::tree::FileContent, u64)>,
    ) -> std::io::Result<(crate::tree::FileContent, u64)>;

    /// Where the archiver may look every entry up ahead of its walk, to warm the cache.
    fn prefetch_root(&self) -> PathBuf;
}

/// A plain folder standing for the root.
#[derive(Debug, Clone)]
pub struct TreeSource {
    root: PathBuf,
    /// Paths it does not show (absolute, under `root`).
    hidden: Vec<PathBuf>,
    /// Sockets are not shown either.
    no_sockets: bool,
}

impl TreeSource {
    /// The tree under `root`.
    pub fn new(root: impl Into<PathBuf>) -> TreeSource {
        TreeSource { root: root.into(), hidden: Vec::new(), no_sockets: false }
    }

    /// The live system under `root`, read beside a shadow copy of it: the entries at `hidden`
    /// (absolute paths under it, the shadow storage) are not shown, nor sockets (the shadow set
    /// reports those it leaves out).
    pub fn live(root: impl Into<PathBuf>, hidden: Vec<PathBuf>) -> TreeSource {
        TreeSource { root: root.into(), hidden, no_sockets: true }
    }

    fn shows(&self, path: &Path) -> bool {
        !self.hidden.iter().any(|hidden| hidden == path)
    }
}

impl Source for TreeSource {
    type Place = PathBuf;

    fn root(&self) -> PathBuf {
        self.root.clone()
    }

    fn entry(
        &self,
        dir: &PathBuf,
        name: &OsStr,
        at: Option<&Path>,
        _parent: Option<&Node>,
    ) -> std::io::Result<Option<(Metadata, PathBuf)>> {
        let path = at.map_or_else(|| dir.join(name), Path::to_path_buf);
        if !self.shows(&path) {
            return Ok(None);
        }
        let meta = metadata(&path)?.filter(|meta| !(self.no_sockets && meta.file_type().is_socket()));
        Ok(meta.map(|meta| (meta, path)))
    }

    fn list(&self, dir: &PathBuf) -> std::io::Result<Vec<OsString>> {
        let mut names = list(dir)?;
        if !self.hidden.is_empty() {
            names.retain(|name| self.shows(&dir.join(name)));
        }
        Ok(names)
    }

    fn xattrs(&self, entry: &PathBuf) -> std::io::Result<Xattrs> {
        crate::meta::read_xattrs(entry)
    }

    fn read_link(&self, entry: &PathBuf) -> std::io::Result<PathBuf> {
        std::fs::read_link(entry)
    }

    fn read(
        &self,
        file: &PathBuf,
        read: &mut dyn FnMut(&File) -> std::io::Result<(crate::tree::FileContent, u64)>,
    ) -> std::io::Result<(crate::tree::FileContent, u64)> {
        read(&open_file(file)?)
    }

    fn prefetch_root(&self) -> PathBuf {
        self.root.clone()
    }
}

/// An entry's metadata, not following a final symlink; `None` when there is none.
pub fn metadata(path: &Path) -> std::io::Result<Option<Metadata>> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => Ok(Some(meta)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// The names in a directory.
pub fn list(dir: &Path) -> std::io::Result<Vec<OsString>> {
    std::fs::read_dir(dir).map(|entries| entries.filter_map(|entry| entry.ok().map(|e| e.file_name())).collect())
}

/// Opens a file to back up: not through a final symlink, and without moving its access time
/// where the kernel allows it (`O_NOATIME` needs ownership or `CAP_FOWNER`).
pub fn open_file(path: &Path) -> std::io::Result<File> {
    let flags = (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NOATIME).bits() as i32;
    match std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Err(error) if error.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) => {
            std::fs::OpenOptions::new().read(true).custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32).open(path)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The live system beside its shadow copy shows neither the shadow storage in it nor its
    /// sockets; a plain tree shows both.
    #[test]
    fn the_live_source_hides_shadow_storage_and_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::write(root.join("file"), "kept").unwrap();
        std::fs::create_dir(root.join("shadow")).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(root.join("socket")).unwrap();
        let names = |source: &TreeSource| {
            let mut names = source.list(&root).unwrap();
            names.sort();
            names
        };
        let found =
            |source: &TreeSource, name: &str| source.entry(&root, OsStr::new(name), None, None).unwrap().is_some();
        let live = TreeSource::live(&root, vec![root.join("shadow")]);
        assert_eq!(names(&live), ["file", "socket"]);
        assert!(found(&live, "file") && !found(&live, "shadow") && !found(&live, "socket"));
        let plain = TreeSource::new(&root);
        assert_eq!(names(&plain), ["file", "shadow", "socket"]);
        assert!(found(&plain, "shadow") && found(&plain, "socket"));
    }
}
