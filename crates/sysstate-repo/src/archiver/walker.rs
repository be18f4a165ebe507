//! The walker: goes through the selected trees in order, compares each entry with the parent
//! version, sends the files to read to the readers and stores each directory's tree.

use super::reader::{FileJob, LiveFile};
use super::sealer::BlobJob;
use super::{Origin, Selection, Shared};
use crate::error::{RepoError, Result};
use crate::id::Id;
use crate::meta::{ctime_ns, node_from_metadata, read_xattrs, unchanged, untouched, untouched_live, Names};
use crate::pack::BlobKind;
use crate::tree::{FileContent, Node, NodeKind, Tree};
use crate::version::VersionStats;
use crossbeam_channel::{bounded, Receiver, Sender};
use globset::GlobSet;
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// True when `ctime_ns` is far enough before a copy taken at `taken_ns` for any later change to
/// move it: a clock tick on filesystems with fine timestamps (50 ms is ample); two seconds where
/// whole seconds (or two) are kept, which a ctime with no fraction suggests.
fn settled_before(ctime_ns: i64, taken_ns: i64) -> bool {
    let margin = if ctime_ns % 1_000_000_000 == 0 { 2_000_000_000 } else { 50_000_000 };
    ctime_ns < taken_ns - margin
}

/// A selection tree: which children of a directory are selected, and whether a directory is
/// selected whole.
#[derive(Debug, Default)]
pub(super) struct SelectionNode {
    children: BTreeMap<Vec<u8>, SelectionNode>,
    whole: Option<Option<GlobSet>>,
    /// Where a whole selection is read from, when not under the root.
    source: Option<PathBuf>,
}

impl SelectionNode {
    pub(super) fn build(selections: &[Selection]) -> SelectionNode {
        let mut root = SelectionNode::default();
        for selection in selections {
            let mut node = &mut root;
            for component in selection.path.components() {
                if let std::path::Component::Normal(name) = component {
                    node = node.children.entry(name.as_bytes().to_vec()).or_default();
                }
            }
            node.whole = Some(selection.exclude.clone());
            node.source = selection.source.clone();
        }
        root
    }
}

pub(super) struct Walker<'a, 's> {
    pub(super) shared: &'s Shared<'a>,
    pub(super) names: &'s Names,
    pub(super) origin: Option<&'s Origin>,
    /// Reading a copy of the live files: `(copy root, live root)`.
    pub(super) live: Option<(&'s Path, &'s Path)>,
    /// See [`BackupOptions::live_reads_before_ns`].
    pub(super) live_reads_before_ns: Option<i64>,
    /// The parent version's point in time (see [`Walker::trusted`]).
    pub(super) parent_time_ns: i64,
    pub(super) file_tx: Sender<FileJob>,
    pub(super) blob_tx: Sender<BlobJob>,
    pub(super) stats: &'s mut VersionStats,
    /// Files sent to the readers whose results the walker has not taken yet.
    pub(super) in_flight: usize,
}

/// How many files may be read while the walker goes on to the next directories. The walker
/// needs a file's blob ids only to store its directory's tree; waiting for them at the end of
/// every directory stalled it once per directory holding a changed file, each time for the
/// whole read of that file (a fifth of a changed re-backup's time on the 1 GB benchmark tree).
const MAX_IN_FLIGHT: usize = 1024;

enum Pending {
    Ready(Node),
    File(Node, Receiver<std::io::Result<(FileContent, u64)>>, PathBuf),
    /// A directory whose tree waits for files being read.
    Dir(Node, Vec<Pending>),
}

/// An entry's metadata (the copy's, or its live twin's), and where it is live.
struct Stat {
    meta: std::fs::Metadata,
    live: Option<LivePath>,
}

/// The live path of an entry of the copy, and — when it stands for the copy's entry (see
/// [`Walker::live_twin`]) — the identity it had then.
struct LivePath {
    path: PathBuf,
    twin: Option<Twin>,
}

/// A live entry's device, inode and ctime when it was found to stand for the copy's.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Twin {
    device: u64,
    inode: u64,
    ctime_ns: i64,
}

impl Twin {
    fn of(meta: &std::fs::Metadata) -> Twin {
        Twin { device: meta.dev(), inode: meta.ino(), ctime_ns: ctime_ns(meta) }
    }
}

impl LivePath {
    /// The live path, when it stands for the copy's entry.
    fn twin_path(&self) -> Option<&Path> {
        self.twin.map(|_| self.path.as_path())
    }

    /// True when the live entry is still the twin it was: what was read from it after it was
    /// found to be one (its names, extended attributes or link target) is the copy's. An entry
    /// changed, removed or replaced in between has another ctime or inode.
    fn still_twin(&self) -> bool {
        self.twin.is_some_and(|twin| std::fs::symlink_metadata(&self.path).is_ok_and(|meta| Twin::of(&meta) == twin))
    }
}

/// A directory's tree: stored, or waiting for files being read.
enum Subtree {
    Stored(Id),
    Waiting(Vec<Pending>),
}

impl Subtree {
    /// The directory's entry, with its tree's id or waiting for it.
    fn entry(self, mut node: Node) -> Pending {
        match self {
            Subtree::Stored(id) => {
                node.kind = NodeKind::Dir { subtree: id };
                Pending::Ready(node)
            }
            Subtree::Waiting(entries) => Pending::Dir(node, entries),
        }
    }
}

impl Walker<'_, '_> {
    /// Walks the selection from the root and stores every tree; returns the root tree's id.
    pub(super) fn walk(
        &mut self,
        root: &Path,
        selection: &SelectionNode,
        parent: Option<&Tree>,
        done: &AtomicBool,
    ) -> Result<Id> {
        let subtree = self.selected_dir(root, Path::new("/"), selection, parent);
        done.store(true, Ordering::Relaxed);
        match subtree? {
            Subtree::Stored(id) => Ok(id),
            Subtree::Waiting(entries) => self.store_tree(entries),
        }
    }

    /// A directory on the way to the selected paths: only its selected children are kept.
    fn selected_dir(
        &mut self,
        dir: &Path,
        shown: &Path,
        selection: &SelectionNode,
        parent: Option<&Tree>,
    ) -> Result<Subtree> {
        if let Some(exclude) = &selection.whole {
            let live = self.live_of(dir);
            return self.whole_dir(dir, live, shown, exclude.as_ref(), parent, Some(selection));
        }
        let mut pending = Vec::new();
        for (name, child) in &selection.children {
            let name_os = std::ffi::OsStr::from_bytes(name);
            let path = child.source.clone().unwrap_or_else(|| dir.join(name_os));
            let shown_child = shown.join(name_os);
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => {
                    self.shared.warn(&shown_child, format!("cannot read its metadata: {error}"));
                    continue;
                }
            };
            let parent_node = parent.and_then(|tree| tree.get(name));
            if child.whole.is_none() && meta.is_dir() {
                let subtree = self.load_parent_subtree(parent_node);
                let xattrs = self.xattrs(&path, &shown_child);
                let subtree = self.selected_dir(&path, &shown_child, child, subtree.as_ref())?;
                self.stats.dirs += 1;
                let mut node = node_from_metadata(name, &meta, xattrs, self.names, NodeKind::Fifo);
                self.live_identity(&shown_child, &mut node);
                pending.push(subtree.entry(node));
            } else {
                if child.whole.is_none() {
                    self.shared.warn(
                        &shown_child,
                        "is not a directory: backed up as it is, without the paths selected under it".into(),
                    );
                }
                let exclude = child.whole.as_ref().and_then(|e| e.as_ref());
                let stat = Stat { meta, live: self.live_of(&path) };
                if let Some(entry) = self.entry(name, &path, &shown_child, stat, exclude, parent_node, Some(child))? {
                    pending.push(entry);
                }
            }
        }
        self.finish_dir(pending)
    }

    /// A directory selected whole. `selection` holds paths selected again inside it (another
    /// component's), which its excludes do not apply to.
    ///
    /// `live` is the live directory it is a copy of, if any (see [`Walker::live_twin`]).
    #[allow(clippy::too_many_arguments)]
    fn whole_dir(
        &mut self,
        dir: &Path,
        live: Option<LivePath>,
        shown: &Path,
        exclude: Option<&GlobSet>,
        parent: Option<&Tree>,
        selection: Option<&SelectionNode>,
    ) -> Result<Subtree> {
        self.shared.check_abort()?;
        // A live directory that stands for the copy's holds the names the copy holds, if it
        // still does once listed.
        let list = |dir: &Path| {
            std::fs::read_dir(dir)
                .map(|entries| entries.filter_map(|entry| entry.ok().map(|e| e.file_name())).collect())
        };
        let listed = match live.as_ref().and_then(|l| l.twin_path().map(|path| (l, list(path)))) {
            Some((live, Ok(names))) if live.still_twin() => Ok(names),
            _ => list(dir),
        };
        let mut entries: Vec<_> = listed.unwrap_or_else(|error| {
            self.shared.warn(shown, format!("cannot list the directory: {error}"));
            Vec::new()
        });
        // Selections read from another volume's copy are not in this copy's listing.
        if let Some(selection) = selection {
            for (name, child) in &selection.children {
                let name = std::ffi::OsStr::from_bytes(name).to_os_string();
                if child.source.is_some() && !entries.contains(&name) {
                    entries.push(name);
                }
            }
        }
        entries.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut pending = Vec::with_capacity(entries.len());
        for name in entries {
            let shown_child = shown.join(&name);
            let nested = selection.and_then(|s| s.children.get(name.as_bytes()));
            let path = nested.and_then(|n| n.source.clone()).unwrap_or_else(|| dir.join(&name));
            let exclude = match nested.and_then(|n| n.whole.as_ref()) {
                Some(own) => own.as_ref(),
                None => exclude,
            };
            if let (Some(exclude), None) = (exclude, nested) {
                let relative = shown_child.strip_prefix("/").unwrap_or(&shown_child);
                if exclude.is_match(relative) || exclude.is_match(Path::new(&name)) {
                    continue;
                }
            }
            let parent_node = parent.and_then(|tree| tree.get(name.as_bytes()));
            // A selection read from elsewhere has no live twin here.
            let live_path =
                live.as_ref().filter(|_| nested.is_none_or(|n| n.source.is_none())).map(|l| l.path.join(&name));
            let (meta, live) = match live_path.as_deref().and_then(|live| self.live_twin(live, parent_node)) {
                Some(meta) => {
                    let twin = Some(Twin::of(&meta));
                    (meta, live_path.map(|path| LivePath { path, twin }))
                }
                None => match std::fs::symlink_metadata(&path) {
                    Ok(meta) => (meta, live_path.map(|path| LivePath { path, twin: None })),
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(error) => {
                        self.shared.warn(&shown_child, format!("cannot read its metadata: {error}"));
                        continue;
                    }
                },
            };
            let stat = Stat { meta, live };
            if let Some(entry) = self.entry(name.as_bytes(), &path, &shown_child, stat, exclude, parent_node, nested)? {
                pending.push(entry);
            }
        }
        self.finish_dir(pending)
    }

    /// The live path of the copy's entry at `path` (not a twin: the copy's is listed), if
    /// it is in the copy (a selection read from elsewhere has no live twin here).
    fn live_of(&self, path: &Path) -> Option<LivePath> {
        let (copy_root, live_root) = self.live?;
        Some(LivePath { path: live_root.join(path.strip_prefix(copy_root).ok()?), twin: None })
    }

    /// The live entry that stands for the copy's entry at `path`, if it is the entry the copy
    /// holds, untouched since: its metadata (and, for a directory, its names) can be taken from
    /// the live entry, whose inode is in the cache, instead of from the copy, whose inodes (a
    /// fresh btrfs snapshot's, new clones) are cold and then cost a lookup each, and again to
    /// release. Two ways to know, both by the ctime, which moves with every change of content,
    /// mode, owner, extended attribute, link or rename:
    /// - it is the parent version's entry (same device, inode, ctime, mtime, size and type), so
    ///   nothing about it changed since the parent, and the copy — made in between — holds it
    ///   as the parent does (every provider);
    /// - its ctime is well before a btrfs snapshot was taken, so nothing about it changed since
    ///   the snapshot, which shares its inode (number and all) with the live one (a first
    ///   backup, or an entry changed since the parent).
    fn live_twin(&self, live: &Path, parent: Option<&Node>) -> Option<std::fs::Metadata> {
        let parent = parent.filter(|p| self.trusted(p));
        if parent.is_none() && self.live_reads_before_ns.is_none() {
            return None;
        }
        let meta = std::fs::symlink_metadata(live).ok()?;
        let twin = parent.is_some_and(|parent| untouched_live(parent, &meta))
            || self.live_reads_before_ns.is_some_and(|taken| settled_before(ctime_ns(&meta), taken));
        twin.then_some(meta)
    }

    /// True when the parent version's entry changed well before the parent's point in time, so
    /// that an entry with its ctime now is the entry the parent holds. Timestamps are coarse
    /// (a clock tick): an entry changed in the tick the parent was taken in could have changed
    /// again in that tick, after the copy, without its ctime moving; such an entry is read again.
    fn trusted(&self, parent: &Node) -> bool {
        settled_before(parent.ctime_ns, self.parent_time_ns)
    }

    /// Records the live file's identity instead of the shadow copy's.
    fn live_identity(&self, shown: &Path, node: &mut Node) {
        if let Some((device, inode, ctime_ns)) = self.origin.and_then(|origin| (origin.0)(shown)) {
            node.device = device;
            node.inode = inode.unwrap_or(node.inode);
            node.ctime_ns = ctime_ns.unwrap_or(node.ctime_ns);
        }
    }

    fn xattrs(&self, path: &Path, shown: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
        read_xattrs(path).unwrap_or_else(|error| {
            self.shared.warn(shown, format!("cannot read its extended attributes: {error}"));
            Vec::new()
        })
    }

    fn load_parent_subtree(&self, parent_node: Option<&Node>) -> Option<Tree> {
        match parent_node.map(|n| &n.kind) {
            Some(NodeKind::Dir { subtree }) => self.shared.repo.read_tree(subtree).ok(),
            _ => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        name: &[u8],
        path: &Path,
        shown: &Path,
        stat: Stat,
        exclude: Option<&GlobSet>,
        parent_node: Option<&Node>,
        selection: Option<&SelectionNode>,
    ) -> Result<Option<Pending>> {
        let Stat { meta, live } = stat;
        // What is not in the metadata is read from the live twin, if it still is one after.
        let twin = live.as_ref().filter(|l| l.twin.is_some());
        let file_type = meta.file_type();
        if file_type.is_socket() {
            self.shared
                .warn(shown, "is a socket: skipped (sockets are recreated by the programs that own them)".into());
            return Ok(None);
        }
        let mut node = node_from_metadata(name, &meta, Vec::new(), self.names, NodeKind::Fifo);
        self.live_identity(shown, &mut node);
        // A directory's parent subtree is compared entry by entry whatever its own ctime.
        let trusted_parent = parent_node.filter(|p| self.trusted(p));
        let untouched_parent = trusted_parent.filter(|p| untouched(p, &node, file_type));
        node.xattrs = match untouched_parent {
            Some(parent) => parent.xattrs.clone(),
            None => match twin.map(|live| (live, read_xattrs(&live.path))) {
                Some((live, Ok(xattrs))) if live.still_twin() => xattrs,
                _ => self.xattrs(path, shown),
            },
        };
        if file_type.is_dir() {
            let subtree = self.load_parent_subtree(parent_node);
            let subtree = self.whole_dir(path, live, shown, exclude, subtree.as_ref(), selection)?;
            self.stats.dirs += 1;
            return Ok(Some(subtree.entry(node)));
        }
        if file_type.is_file() {
            self.stats.files += 1;
            self.stats.bytes_total += meta.size();
            if let Some(parent) = trusted_parent.filter(|p| unchanged(p, &node)) {
                if let NodeKind::File(content) = &parent.kind {
                    if self.shared.repo.has_blobs(&content.blobs) {
                        node.kind = NodeKind::File(content.clone());
                        self.shared.progress.file_done(meta.size());
                        return Ok(Some(Pending::Ready(node)));
                    }
                }
            }
            let (reply, result) = bounded(1);
            let live = match (self.live_reads_before_ns, live) {
                (Some(taken), Some(live)) if settled_before(node.ctime_ns, taken) => Some(LiveFile {
                    path: live.path,
                    device: node.device,
                    inode: node.inode,
                    ctime_ns: node.ctime_ns,
                    size: meta.size(),
                }),
                _ => None,
            };
            let job = FileJob {
                path: path.to_path_buf(),
                live,
                size: meta.size(),
                maybe_sparse: meta.blocks() * 512 < meta.size(),
                reply,
            };
            if self.file_tx.send(job).is_err() {
                return Err(self.shared.failure.lock().expect("failure lock").take().unwrap_or(RepoError::Interrupted));
            }
            self.in_flight += 1;
            return Ok(Some(Pending::File(node, result, shown.to_path_buf())));
        }
        self.stats.others += 1;
        node.kind = if let Some(NodeKind::Symlink { target }) = untouched_parent.map(|p| &p.kind) {
            NodeKind::Symlink { target: target.clone() }
        } else if file_type.is_symlink() {
            let live_target = twin.map(|live| (live, std::fs::read_link(&live.path)));
            let target = match live_target {
                Some((live, Ok(target))) if live.still_twin() => Ok(target),
                _ => std::fs::read_link(path),
            };
            match target {
                Ok(target) => NodeKind::Symlink { target: target.as_os_str().as_bytes().to_vec() },
                Err(error) => {
                    self.shared.warn(shown, format!("cannot read the symlink: {error}"));
                    return Ok(None);
                }
            }
        } else if file_type.is_char_device() {
            NodeKind::CharDevice { rdev: meta.rdev() }
        } else if file_type.is_block_device() {
            NodeKind::BlockDevice { rdev: meta.rdev() }
        } else {
            NodeKind::Fifo
        };
        Ok(Some(Pending::Ready(node)))
    }

    /// Stores a directory's tree now if none of its entries waits for a file being read, or
    /// while too many files are in flight; else leaves it waiting.
    fn finish_dir(&mut self, pending: Vec<Pending>) -> Result<Subtree> {
        if pending.iter().all(|p| matches!(p, Pending::Ready(_))) || self.in_flight > MAX_IN_FLIGHT {
            self.store_tree(pending).map(Subtree::Stored)
        } else {
            Ok(Subtree::Waiting(pending))
        }
    }

    /// Waits for the files of a directory (and its waiting subdirectories) and stores its tree.
    fn store_tree(&mut self, pending: Vec<Pending>) -> Result<Id> {
        let mut tree = Tree { nodes: Vec::with_capacity(pending.len()) };
        for entry in pending {
            match entry {
                Pending::Ready(node) => tree.nodes.push(node),
                Pending::Dir(mut node, entries) => {
                    node.kind = NodeKind::Dir { subtree: self.store_tree(entries)? };
                    tree.nodes.push(node);
                }
                Pending::File(mut node, result, shown) => match result.recv() {
                    Ok(Ok((content, size))) => {
                        self.in_flight -= 1;
                        if size != node.size {
                            self.shared.warn(
                                &shown,
                                format!("changed while it was read ({} bytes before, {size} after)", node.size),
                            );
                            node.size = size;
                        }
                        node.kind = NodeKind::File(content);
                        tree.nodes.push(node);
                    }
                    Ok(Err(error)) => {
                        self.in_flight -= 1;
                        self.stats.files -= 1;
                        self.stats.bytes_total -= node.size;
                        self.shared.warn(&shown, format!("cannot read the file: {error}"));
                    }
                    Err(_) => {
                        return Err(self
                            .shared
                            .failure
                            .lock()
                            .expect("failure lock")
                            .take()
                            .unwrap_or(RepoError::Interrupted))
                    }
                },
            }
        }
        self.shared.check_abort()?;
        let bytes = tree.encode();
        let id = self.shared.repo.key().blob_id(&bytes);
        if self.shared.saver.reserve(id)
            && self.blob_tx.send(BlobJob { kind: BlobKind::Tree, id, data: bytes }).is_err()
        {
            return Err(self.shared.failure.lock().expect("failure lock").take().unwrap_or(RepoError::Interrupted));
        }
        Ok(id)
    }
}

/// Walks the selected trees from their far end, asking for every entry's metadata, until the
/// walker (which goes from the near end) is done. In a fresh shadow copy — a new btrfs snapshot,
/// new clones — every inode is cold and looking one up costs more than all the walker does
/// with it; this way the two threads each look up about half, and the walker finds the rest
/// already looked up.
pub(super) fn prefetch_metadata(root: &Path, selections: &[Selection], walked: &AtomicBool) {
    for selection in selections.iter().rev() {
        let start = match &selection.source {
            Some(source) => source.clone(),
            None => root.join(selection.path.strip_prefix("/").unwrap_or(&selection.path)),
        };
        if !prefetch_dir(&start, walked) {
            return;
        }
    }
}

/// Returns false once the walker is done.
fn prefetch_dir(dir: &Path, walked: &AtomicBool) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return true };
    let mut names: Vec<_> = entries.filter_map(|entry| entry.ok().map(|e| e.file_name())).collect();
    names.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
    for name in names {
        if walked.load(Ordering::Relaxed) {
            return false;
        }
        let path = dir.join(name);
        if std::fs::symlink_metadata(&path).is_ok_and(|meta| meta.is_dir()) && !prefetch_dir(&path, walked) {
            return false;
        }
    }
    true
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
