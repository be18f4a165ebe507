//! The walker: goes through the selected trees in order, as its [`Source`] shows them, compares
//! each entry with the parent version, sends the files to read to the readers and stores each
//! directory's tree.

use super::reader::FileJob;
use super::sealer::BlobJob;
use super::{Selection, Shared};
use crate::error::{RepoError, Result};
use crate::id::Id;
use crate::meta::{node_from_metadata, settled_before, unchanged, untouched, Names};
use crate::pack::BlobKind;
use crate::source::{Source, Xattrs};
use crate::tree::{FileContent, Node, NodeKind, Tree};
use crate::version::VersionStats;
use crossbeam_channel::{bounded, Receiver, Sender};
use globset::GlobSet;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

/// A selection tree: which children of a directory are selected, and whether a directory is
/// selected whole.
#[derive(Debug, Default)]
pub(super) struct SelectionNode {
    children: BTreeMap<Vec<u8>, SelectionNode>,
    whole: Option<Option<GlobSet>>,
    /// Where a whole selection is read from, when not under the root.
    source: Option<PathBuf>,
    /// For a directory on the way to a selection read from elsewhere: where that elsewhere holds
    /// this directory, for when the root does not (another volume's copy holds the folders
    /// above the paths it copied; the root's copy may hold none of them).
    above: Option<PathBuf>,
}

impl SelectionNode {
    /// The paths selected whole at or below this node, shown as `shown`.
    fn selected_under(&self, shown: &Path, out: &mut Vec<PathBuf>) {
        if self.whole.is_some() {
            out.push(shown.to_path_buf());
        }
        for (name, child) in &self.children {
            child.selected_under(&shown.join(OsStr::from_bytes(name)), out);
        }
    }

    pub(super) fn build(selections: &[Selection]) -> SelectionNode {
        let mut root = SelectionNode::default();
        for selection in selections {
            let names: Vec<&OsStr> = selection
                .path
                .components()
                .filter_map(|component| match component {
                    std::path::Component::Normal(name) => Some(name),
                    _ => None,
                })
                .collect();
            let mut node = &mut root;
            for (depth, name) in names.iter().enumerate() {
                node = node.children.entry(name.as_bytes().to_vec()).or_default();
                if depth + 1 < names.len() && node.above.is_none() {
                    // `source` holds the selection; its ancestors are as many levels up.
                    let up = names.len() - depth - 1;
                    node.above = selection
                        .source
                        .as_deref()
                        .and_then(|source| source.ancestors().nth(up))
                        .map(Path::to_path_buf);
                }
            }
            node.whole = Some(selection.exclude.clone());
            node.source = selection.source.clone();
        }
        root
    }
}

pub(super) struct Walker<'a, 's, S: Source> {
    /// What changed since the parent version, sorted (see [`BackupOptions::changed`]).
    ///
    /// [`BackupOptions::changed`]: super::BackupOptions::changed
    pub(super) changed: Option<&'s super::Journaled>,
    /// Counts of the subtrees taken from the parent, and the parent's trees decoded.
    pub(super) counts: &'s super::KnownTrees,
    /// Keep the trees stored in `counts`, decoded (it is kept across backups).
    pub(super) keep_trees: bool,
    /// Folders taken from the parent version whole.
    pub(super) reused: u64,
    pub(super) shared: &'s Shared<'a>,
    pub(super) source: &'s S,
    pub(super) names: &'s Names,
    /// The parent version's point in time (see [`Walker::trusted`]).
    pub(super) parent_time_ns: i64,
    pub(super) file_tx: Sender<FileJob<S::Place>>,
    pub(super) blob_tx: Sender<BlobJob>,
    pub(super) stats: &'s mut VersionStats,
    /// Files sent to the readers whose results the walker has not taken yet.
    pub(super) in_flight: usize,
    /// Selected paths the source does not hold.
    pub(super) missed: Vec<PathBuf>,
    /// Walkers that may still start beside those walking now (see [`Walker::entries_in`]); below
    /// zero while a thread that waited for another half walks again.
    pub(super) spare: &'s AtomicIsize,
}

/// How many folders were split between two walkers (for the tests: that they were).
#[cfg(test)]
pub(super) static SPLITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// What a directory's entries are looked at with.
struct InDir<'d, P> {
    dir: &'d P,
    shown: &'d Path,
    exclude: Option<&'d GlobSet>,
    selection: Option<&'d SelectionNode>,
    named: Option<&'d Vec<std::ffi::OsString>>,
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

impl<S: Source> Walker<'_, '_, S> {
    /// Walks the selection from the root and stores every tree; returns the root tree's id.
    pub(super) fn walk(&mut self, selection: &SelectionNode, parent: Option<Tree>, done: &AtomicBool) -> Result<Id> {
        let subtree = self.selected_dir(self.source.root(), Path::new("/"), selection, parent);
        done.store(true, Ordering::Relaxed);
        match subtree? {
            Subtree::Stored(id) => Ok(id),
            Subtree::Waiting(entries) => self.store_tree(entries),
        }
    }

    /// Entry `name` of `dir` as the source finds it (read at `at` when given); `None`, with a
    /// warning when it cannot be looked up, when there is none to back up.
    fn find(
        &self,
        dir: &S::Place,
        name: &OsStr,
        shown: &Path,
        at: Option<&Path>,
        parent: Option<&Node>,
    ) -> Option<(Metadata, S::Place)> {
        match self.source.entry(dir, name, at, parent) {
            Ok(found) => found,
            Err(error) => {
                self.shared.warn(shown, format!("cannot read its metadata: {error}"));
                None
            }
        }
    }

    /// A directory on the way to the selected paths: only its selected children are kept.
    fn selected_dir(
        &mut self,
        dir: S::Place,
        shown: &Path,
        selection: &SelectionNode,
        parent: Option<Tree>,
    ) -> Result<Subtree> {
        if let Some(exclude) = &selection.whole {
            return self.whole_dir(&dir, shown, exclude.as_ref(), parent, Some(selection), false);
        }
        let mut pending = Vec::new();
        for (name, child) in &selection.children {
            let name_os = OsStr::from_bytes(name);
            let shown_child = shown.join(name_os);
            let found = self.find(&dir, name_os, &shown_child, child.source.as_deref(), None).or_else(|| {
                let above = child.above.as_deref()?;
                self.find(&dir, name_os, &shown_child, Some(above), None)
            });
            let Some((meta, place)) = found else {
                child.selected_under(&shown_child, &mut self.missed);
                continue;
            };
            let parent_node = parent.as_ref().and_then(|tree| tree.get(name));
            if child.whole.is_none() && meta.is_dir() {
                let subtree = self.load_parent_subtree(parent_node);
                let xattrs = self.xattrs(&place, &shown_child);
                let subtree = self.selected_dir(place, &shown_child, child, subtree)?;
                self.stats.dirs += 1;
                let mut node = node_from_metadata(name, &meta, xattrs, self.names, NodeKind::Fifo);
                self.identity(&shown_child, &mut node);
                pending.push(subtree.entry(node));
            } else {
                if child.whole.is_none() {
                    self.shared.warn(
                        &shown_child,
                        "is not a directory: backed up as it is, without the paths selected under it".into(),
                    );
                }
                let exclude = child.whole.as_ref().and_then(|e| e.as_ref());
                if let Some(entry) = self.entry(name, place, &shown_child, meta, exclude, parent_node, Some(child))? {
                    pending.push(entry);
                }
            }
        }
        self.finish_dir(pending)
    }

    /// A directory selected whole. `selection` holds paths selected again inside it (another
    /// component's), which its excludes do not apply to. `same` says that `parent` is this
    /// directory's tree in the parent version (the same device and inode): then, where the
    /// change journal named the entries that changed in it, the others are taken from `parent`
    /// without looking at them.
    fn whole_dir(
        &mut self,
        dir: &S::Place,
        shown: &Path,
        exclude: Option<&GlobSet>,
        parent: Option<Tree>,
        selection: Option<&SelectionNode>,
        same: bool,
    ) -> Result<Subtree> {
        self.shared.check_abort()?;
        let named = self.changed.filter(|_| same).and_then(|changed| changed.names.get(shown));
        let mut pending = Vec::new();
        let mut parent = parent;
        let mut entries = match (named, &mut parent) {
            // The journal named every entry added, removed, replaced or changed here since the
            // parent version: the others are the parent's, and the folder is not listed. An
            // entry not named (nor selected again inside) is the parent's entry as it is — its
            // path is not even made, nor matched against the excludes (the parent version was
            // made with the same selection, so it holds no entry they leave out). The others
            // are looked at below.
            (Some(named), Some(tree)) => {
                let mut looked_at = Vec::new();
                for node in std::mem::take(&mut tree.nodes) {
                    let name = OsStr::from_bytes(&node.name);
                    let nested = selection.is_some_and(|s| s.children.contains_key(node.name.as_slice()));
                    if !nested
                        && named.binary_search_by(|n| n.as_os_str().cmp(name)).is_err()
                        && self.not_named(shown, &node)?
                    {
                        pending.push(Pending::Ready(node));
                    } else {
                        looked_at.push(node);
                    }
                }
                tree.nodes = looked_at;
                tree.nodes
                    .iter()
                    .map(|node| OsStr::from_bytes(&node.name).to_os_string())
                    .chain(named.iter().cloned())
                    .collect()
            }
            _ => self.source.list(dir).unwrap_or_else(|error| {
                self.shared.warn(shown, format!("cannot list the directory: {error}"));
                Vec::new()
            }),
        };
        // Selections read from elsewhere are not in this directory's listing.
        if let Some(selection) = selection {
            for (name, child) in &selection.children {
                let name = OsStr::from_bytes(name).to_os_string();
                if child.source.is_some() && !entries.contains(&name) {
                    entries.push(name);
                }
            }
        }
        entries.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        entries.dedup();
        let in_dir = InDir { dir, shown, exclude, selection, named };
        let parent_nodes = parent.map(|tree| tree.nodes).unwrap_or_default();
        let (looked_at, found_nested) = self.entries_in(&in_dir, entries, parent_nodes)?;
        pending.extend(looked_at);
        // Paths selected again inside this one that it does not hold.
        for (name, child) in selection.iter().flat_map(|s| &s.children) {
            if !found_nested.contains(name) {
                child.selected_under(&shown.join(OsStr::from_bytes(name)), &mut self.missed);
            }
        }
        self.finish_dir(pending)
    }

    /// The entries `names` (sorted) of a directory, with the parent's nodes among them
    /// (sorted): each looked up and walked. Two halves are walked at once, on this thread and a
    /// new one, when a walker is spare and each half holds a folder the journal named
    /// something below (a journaled walk is most of the read of a backup that changed little,
    /// and a thread went through it alone while the other core mostly waited). Returns the
    /// entries and the names of the paths selected again inside that it found.
    fn entries_in(
        &mut self,
        in_dir: &InDir<'_, S::Place>,
        mut names: Vec<std::ffi::OsString>,
        mut parent_nodes: Vec<Node>,
    ) -> Result<(Vec<Pending>, std::collections::HashSet<Vec<u8>>)> {
        let Some(split) = self.split_at(in_dir.shown, &names, &parent_nodes) else {
            return self.look_at_entries(in_dir, names, parent_nodes);
        };
        let second_names = names.split_off(split);
        let second_nodes =
            parent_nodes.split_off(parent_nodes.partition_point(|n| n.name.as_slice() < second_names[0].as_bytes()));
        let mut stats = VersionStats::default();
        let (first, second) = std::thread::scope(|scope| {
            let mut other = Walker {
                changed: self.changed,
                counts: self.counts,
                keep_trees: self.keep_trees,
                reused: 0,
                shared: self.shared,
                source: self.source,
                names: self.names,
                parent_time_ns: self.parent_time_ns,
                file_tx: self.file_tx.clone(),
                blob_tx: self.blob_tx.clone(),
                stats: &mut stats,
                in_flight: 0,
                missed: Vec::new(),
                spare: self.spare,
            };
            let second = scope.spawn(move || {
                let looked = other.look_at_entries(in_dir, second_names, second_nodes);
                other.spare.fetch_add(1, Ordering::SeqCst);
                (looked, other.in_flight, other.reused, other.missed)
            });
            let first = self.look_at_entries(in_dir, names, parent_nodes);
            // Waiting for the other half, this thread walks nothing: another may start.
            self.spare.fetch_add(1, Ordering::SeqCst);
            let second = second.join();
            self.spare.fetch_sub(1, Ordering::SeqCst);
            (first, second)
        });
        let (second, in_flight, reused, missed) = second.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // Its files in flight are waited for here, with this directory's.
        self.in_flight += in_flight;
        self.reused += reused;
        self.missed.extend(missed);
        self.stats.files += stats.files;
        self.stats.dirs += stats.dirs;
        self.stats.others += stats.others;
        self.stats.bytes_total += stats.bytes_total;
        let (mut pending, mut found) = first?;
        let (more, found_more) = second?;
        pending.extend(more);
        found.extend(found_more);
        Ok((pending, found))
    }

    /// Where to split `names` into two halves to walk at once (see [`Walker::entries_in`]),
    /// taking a spare walker for the second; `None` to walk them here.
    fn split_at(&self, shown: &Path, names: &[std::ffi::OsString], parent_nodes: &[Node]) -> Option<usize> {
        let changed = self.changed?;
        // Most folders are met with no walker spare: their entries are not looked through.
        if self.spare.load(Ordering::Relaxed) <= 0 {
            return None;
        }
        // The folders of the parent that the journal named something at or below.
        let busy: Vec<usize> = parent_nodes
            .iter()
            .filter(|node| matches!(node.kind, NodeKind::Dir { .. }))
            .filter(|node| !changed.untouched(&shown.join(OsStr::from_bytes(&node.name))))
            .filter_map(|node| names.binary_search_by(|n| n.as_bytes().cmp(&node.name)).ok())
            .collect();
        if busy.len() < 2 {
            return None;
        }
        self.spare.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |spare| (spare > 0).then(|| spare - 1)).ok()?;
        #[cfg(test)]
        SPLITS.fetch_add(1, Ordering::SeqCst);
        Some(busy[busy.len() / 2])
    }

    /// [`Walker::entries_in`] on this thread.
    fn look_at_entries(
        &mut self,
        in_dir: &InDir<'_, S::Place>,
        names: Vec<std::ffi::OsString>,
        parent_nodes: Vec<Node>,
    ) -> Result<(Vec<Pending>, std::collections::HashSet<Vec<u8>>)> {
        let InDir { dir, shown, exclude, selection, named } = *in_dir;
        // The parent's nodes, taken out as their names come (both are sorted by name).
        let mut parent_nodes = parent_nodes.into_iter().peekable();
        let mut pending = Vec::with_capacity(names.len());
        let mut found_nested = std::collections::HashSet::new();
        for name in names {
            let nested = selection.and_then(|s| s.children.get(name.as_bytes()));
            while parent_nodes.next_if(|node| node.name.as_slice() < name.as_bytes()).is_some() {}
            let parent_node = parent_nodes.next_if(|node| node.name.as_slice() == name.as_bytes());
            // Named here by the journal (or looked at again by the copy).
            let named_here = named.is_some_and(|named| named.binary_search(&name).is_ok());
            let shown_child = shown.join(&name);
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
            let parent_node = parent_node.as_ref();
            let at = nested.and_then(|n| n.source.as_deref());
            // An entry named here most likely changed since the parent version, so its live entry
            // is no twin of the parent's: it is looked up in the copy at once.
            let trusted = parent_node.filter(|p| !named_here && self.trusted(p, &shown_child));
            let Some((meta, place)) = self.find(dir, &name, &shown_child, at, trusted) else { continue };
            if nested.is_some() {
                found_nested.insert(name.as_bytes().to_vec());
            }
            if let Some(entry) = self.entry(name.as_bytes(), place, &shown_child, meta, exclude, parent_node, nested)? {
                pending.push(entry);
            }
        }
        Ok((pending, found_nested))
    }

    /// The parent version's subtree of directory `shown`, when the change journal says nothing
    /// changed at or below it since the parent was read, the parent's entry is the same
    /// directory (device and inode), and no other selection starts inside it. Its entries are
    /// counted into the version's figures.
    fn unchanged_subtree(
        &mut self,
        shown: &Path,
        node: &Node,
        parent: Option<&Node>,
        selection: Option<&SelectionNode>,
    ) -> Result<Option<Id>> {
        let Some(changed) = self.changed else { return Ok(None) };
        let Some(NodeKind::Dir { subtree }) = parent.map(|p| &p.kind) else { return Ok(None) };
        let parent = parent.expect("matched above");
        if (parent.device, parent.inode) != (node.device, node.inode)
            || selection.is_some_and(|s| !s.children.is_empty())
        {
            return Ok(None);
        }
        if !changed.untouched(shown) {
            return Ok(None);
        }
        let counts = self.counts.of(self.shared.repo, subtree)?;
        self.stats.dirs += counts.dirs;
        self.stats.files += counts.files;
        self.stats.others += counts.others;
        self.stats.bytes_total += counts.bytes;
        self.shared.file_done(counts.bytes);
        self.reused += 1;
        Ok(Some(*subtree))
    }

    /// An entry of directory `dir` (as shown) the journal named by entries, not named itself:
    /// unchanged since the parent version was read, which holds it as it is (true; counted). A
    /// folder is taken so only when nothing at or below it was named either (false: it is
    /// looked at).
    fn not_named(&mut self, dir: &Path, parent: &Node) -> Result<bool> {
        match &parent.kind {
            NodeKind::Dir { subtree } => {
                let shown = dir.join(OsStr::from_bytes(&parent.name));
                if !self.changed.is_some_and(|changed| changed.untouched(&shown)) {
                    return Ok(false);
                }
                let counts = self.counts.of(self.shared.repo, subtree)?;
                self.stats.dirs += counts.dirs + 1;
                self.stats.files += counts.files;
                self.stats.others += counts.others;
                self.stats.bytes_total += counts.bytes;
                self.shared.file_done(counts.bytes);
                self.reused += 1;
            }
            NodeKind::File(_) => {
                self.stats.files += 1;
                self.stats.bytes_total += parent.size;
                self.shared.file_done(parent.size);
            }
            _ => self.stats.others += 1,
        }
        Ok(true)
    }

    /// True when the parent version's entry changed well before the parent's point in time, so
    /// that an entry with its ctime now is the entry the parent holds. Timestamps are coarse
    /// (a clock tick): an entry changed in the tick the parent was taken in could have changed
    /// again in that tick, after the copy, without its ctime moving; such an entry is read again,
    /// as is one the journal says to read again (`shown`, see [`Journaled::reread`]).
    ///
    /// [`Journaled::reread`]: super::Journaled::reread
    fn trusted(&self, parent: &Node, shown: &Path) -> bool {
        settled_before(parent.ctime_ns, self.parent_time_ns) && !self.changed.is_some_and(|c| c.reread(shown))
    }

    /// Records the identity the source gives the entry instead of its metadata's own.
    fn identity(&self, shown: &Path, node: &mut Node) {
        if let Some((device, inode, ctime_ns, links)) = self.source.identity(shown) {
            node.device = device;
            node.inode = inode.unwrap_or(node.inode);
            node.ctime_ns = ctime_ns.unwrap_or(node.ctime_ns);
            node.links = links.unwrap_or(node.links);
        }
    }

    fn xattrs(&self, place: &S::Place, shown: &Path) -> Xattrs {
        self.source.xattrs(place).unwrap_or_else(|error| {
            self.shared.warn(shown, format!("cannot read its extended attributes: {error}"));
            Vec::new()
        })
    }

    fn load_parent_subtree(&self, parent_node: Option<&Node>) -> Option<Tree> {
        match parent_node.map(|n| &n.kind) {
            Some(NodeKind::Dir { subtree }) => self.counts.take(self.shared.repo, subtree).ok(),
            _ => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        name: &[u8],
        place: S::Place,
        shown: &Path,
        meta: Metadata,
        exclude: Option<&GlobSet>,
        parent_node: Option<&Node>,
        selection: Option<&SelectionNode>,
    ) -> Result<Option<Pending>> {
        let file_type = meta.file_type();
        if file_type.is_socket() {
            self.shared
                .warn(shown, "is a socket: skipped (sockets are recreated by the programs that own them)".into());
            return Ok(None);
        }
        let mut node = node_from_metadata(name, &meta, Vec::new(), self.names, NodeKind::Fifo);
        self.identity(shown, &mut node);
        // A directory's parent subtree is compared entry by entry whatever its own ctime.
        let trusted_parent = parent_node.filter(|p| self.trusted(p, shown));
        let untouched_parent = trusted_parent.filter(|p| untouched(p, &node, file_type));
        node.xattrs = match untouched_parent {
            Some(parent) => parent.xattrs.clone(),
            None => self.xattrs(&place, shown),
        };
        if file_type.is_dir() {
            if let Some(subtree) = self.unchanged_subtree(shown, &node, parent_node, selection)? {
                node.kind = NodeKind::Dir { subtree };
                self.stats.dirs += 1;
                return Ok(Some(Pending::Ready(node)));
            }
            let same = parent_node.is_some_and(|p| (p.device, p.inode) == (node.device, node.inode));
            let subtree = self.load_parent_subtree(parent_node);
            let subtree = self.whole_dir(&place, shown, exclude, subtree, selection, same)?;
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
                        self.shared.file_done(meta.size());
                        return Ok(Some(Pending::Ready(node)));
                    }
                }
            }
            let (reply, result) = bounded(1);
            let job = FileJob { place, size: meta.size(), maybe_sparse: meta.blocks() * 512 < meta.size(), reply };
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
            match self.source.read_link(&place) {
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
        self.counts.stored(id, &tree.nodes);
        if self.keep_trees {
            self.counts.keep(id, tree);
        }
        if self.shared.saver.reserve(id)
            && self.blob_tx.send(BlobJob { kind: BlobKind::Tree, id, data: bytes }).is_err()
        {
            return Err(self.shared.failure.lock().expect("failure lock").take().unwrap_or(RepoError::Interrupted));
        }
        Ok(id)
    }
}

/// Walks the selected trees from their far end, asking for every entry's metadata, until the
/// walker (which goes from the near end) is done. In a tree whose inodes are all cold (a fresh
/// point-in-time copy) looking one up costs more than all the walker does with it; this way the
/// two threads each look up about half, and the walker finds the rest already looked up.
/// Counts the selection as it goes: when it gets through before the walker, `progress` is told
/// the total (a first backup has no parent to take it from).
pub(super) fn prefetch_metadata(
    root: &Path,
    selections: &[Selection],
    walked: &AtomicBool,
    progress: &dyn crate::Progress,
) {
    let mut counted = (0u64, 0u64);
    for selection in selections.iter().rev() {
        let start = match &selection.source {
            Some(source) => source.clone(),
            None => root.join(selection.path.strip_prefix("/").unwrap_or(&selection.path)),
        };
        if !prefetch_dir(&start, walked, &mut counted) {
            return;
        }
    }
    progress.total(counted.0);
    progress.total_files(counted.1);
}

/// Returns false once the walker is done; counts (bytes, files) on the way.
fn prefetch_dir(dir: &Path, walked: &AtomicBool, counted: &mut (u64, u64)) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return true };
    let mut names: Vec<_> = entries.filter_map(|entry| entry.ok().map(|e| e.file_name())).collect();
    names.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
    for name in names {
        if walked.load(Ordering::Relaxed) {
            return false;
        }
        let path = dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() && !prefetch_dir(&path, walked, counted) => return false,
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.is_file() => {
                counted.0 += meta.len();
                counted.1 += 1;
            }
            _ => {}
        }
    }
    true
}
