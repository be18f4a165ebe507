//! The archiver: a parallel pipeline that turns a set of paths into a version: the walker
//! ([`walker`]) on this thread, readers ([`reader`]) and sealers ([`sealer`]) on their own.
//!
//! ```text
//! walker (this thread) ──files──▶ readers ×N ──new chunks──▶ sealers ×N ──▶ packs ──▶ index
//!   lstat, xattrs,                 read, chunk,               compress, seal,
//!   parent comparison,             keyed hash, dedup          pack, write
//!   trees (post-order)
//! ```
//! Both channels are bounded, so memory stays within a few chunks per thread whatever the size of
//! the tree. Unchanged files (same size, mtime, ctime and inode as in the parent version) are
//! never opened. The version manifest is written only after every pack and the index are stored.

mod reader;
mod sealer;
mod walker;

pub(crate) use reader::chunk_file;

use crate::content::Helpers;
use crate::error::{RepoError, Result};
use crate::id::Id;
use crate::meta::Names;
use crate::progress::{Progress, Warning};
use crate::repo::Repository;
use crate::saver::BlobSaver;
use crate::source::Source;
use crate::version::{ComponentRecord, Version, VersionStats};
use crossbeam_channel::bounded;
use globset::GlobSet;
use reader::{reader, FileJob};
use sealer::{sealer, BlobJob};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, Ordering};
use std::sync::Mutex;
use walker::{prefetch_metadata, SelectionNode, Walker};

/// A path to back up, absolute as seen from the root, with its exclude patterns.
#[derive(Debug, Clone)]
pub struct Selection {
    /// `/etc`, `/var/lib/dpkg`, …
    pub path: PathBuf,
    /// Glob patterns matched against paths relative to the root (`etc/*.tmp`) and against
    /// file names (`*.tmp`).
    pub exclude: Option<GlobSet>,
    /// Where to read it, when not under the root (another folder the source reads it from).
    pub source: Option<PathBuf>,
}

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The root the version is of (`/`), recorded in the manifest; account names are read from
    /// its `/etc/passwd` and `/etc/group`.
    pub root: PathBuf,
    /// The paths.
    pub selections: Vec<Selection>,
    /// The components, recorded in the manifest.
    pub components: Vec<ComponentRecord>,
    /// The version to compare with, to skip unchanged files.
    pub parent: Option<Id>,
    /// The host name to record.
    pub host: String,
    /// Tags to record.
    pub tags: Vec<String>,
    /// Reader and sealer threads each (0: one per core).
    pub threads: usize,
    /// The shadow copy results to record.
    pub shadow: Option<serde_json::Value>,
    /// The system it is of, to record.
    pub system: Option<serde_json::Value>,
    /// The time to record as the version's point in time (ns); 0 means now.
    pub time_ns: i64,
    /// Set from outside (a signal) to stop the backup; it then fails without a version.
    pub cancel: Option<std::sync::Arc<AtomicBool>>,
    /// What a change journal says changed since the parent version was read: a directory with
    /// nothing at or below it named, and not in a path read whole, is the parent's subtree as it
    /// is, not walked. `None`: every entry is looked at.
    pub changed: Option<Journaled>,
    /// What a long-lived caller (the agent) keeps of the trees its backups met: their entry
    /// counts, and its last version's trees decoded (see [`KnownTrees`]).
    pub counts: Option<std::sync::Arc<KnownTrees>>,
}

/// What a change journal says changed since the parent version was read (absolute paths as
/// seen from the root).
#[derive(Debug, Clone, Default)]
pub struct Journaled {
    /// The directories where something changed, sorted.
    pub dirs: Vec<PathBuf>,
    /// Paths the journal does not cover (a volume copied by snapshot, or not watched): every
    /// entry below them is looked at.
    pub whole: Vec<PathBuf>,
    /// For directories of `dirs` whose every change named an entry in them: those entries'
    /// names, sorted. The other entries of such a directory are the parent version's, when it
    /// is the directory the parent version holds there; a directory of `dirs` not here is read
    /// whole.
    pub names: std::collections::HashMap<PathBuf, Vec<std::ffi::OsString>>,
    /// Files to read again whatever their metadata says, sorted: a shadow copy's commit copied
    /// them again for a change their times may not show (written through a shared mapping).
    pub reread: Vec<PathBuf>,
}

impl Journaled {
    /// True when the parent's subtree of directory `shown` may be taken as it is: nothing at or
    /// below it was named, and it is not in (nor holds) a path read whole.
    pub fn untouched(&self, shown: &Path) -> bool {
        // Paths at or below `shown` sort right after it.
        let from = self.dirs.partition_point(|p| p.as_path() < shown);
        !self.dirs.get(from).is_some_and(|p| p.starts_with(shown))
            && !self.whole.iter().any(|w| shown.starts_with(w) || w.starts_with(shown))
    }

    /// True when the file `shown` is to be read again whatever its metadata says.
    pub fn reread(&self, shown: &Path) -> bool {
        self.reread.binary_search_by(|p| p.as_path().cmp(shown)).is_ok()
    }
}

/// What a long-lived caller (the agent) keeps of the trees its backups met, by id — a tree never
/// changes, so what is kept of it stays true:
/// - the entries in each and all below it, counted as a backup stores it, or from the
///   repository's trees when a subtree taken from the parent was never counted (for the agent,
///   only in its first backup);
/// - the trees of its last version, decoded (up to [`KEPT_TREES_MAX`] bytes), so that the next
///   backup takes a folder's parent tree from memory, not from its pack (read, opened,
///   decompressed and decoded: a third of the walk of a 2%-changed backup).
#[derive(Debug, Default)]
pub struct KnownTrees {
    counts: Mutex<std::collections::HashMap<crate::Id, Counts>>,
    trees: Mutex<DecodedTrees>,
}

/// About how many bytes of decoded trees [`KnownTrees`] keeps (the 1 GB benchmark tree's take
/// about 20 MB); past it they are all dropped, and the next backups keep theirs again.
pub const KEPT_TREES_MAX: usize = 256 << 20;

#[derive(Debug, Default)]
struct DecodedTrees {
    trees: std::collections::HashMap<crate::Id, crate::tree::Tree>,
    bytes: usize,
}

/// About what a decoded tree takes in memory.
fn tree_bytes(tree: &crate::tree::Tree) -> usize {
    tree.nodes
        .iter()
        .map(|node| {
            let blobs = match &node.kind {
                crate::tree::NodeKind::File(content) => content.blobs.len() * std::mem::size_of::<crate::Id>(),
                crate::tree::NodeKind::Symlink { target } => target.len(),
                _ => 0,
            };
            std::mem::size_of::<crate::tree::Node>()
                + node.name.len()
                + node.xattrs.iter().map(|(name, value)| name.len() + value.len() + 48).sum::<usize>()
                + blobs
        })
        .sum::<usize>()
        + 64
}

/// What a tree holds, all levels down.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counts {
    pub(crate) files: u64,
    pub(crate) dirs: u64,
    pub(crate) others: u64,
    pub(crate) bytes: u64,
}

impl Counts {
    /// Adds a tree's node, `below` being its subtree's counts when it is a directory.
    fn add(&mut self, node: &crate::tree::Node, below: Option<Counts>) {
        match (&node.kind, below) {
            (crate::tree::NodeKind::Dir { .. }, Some(below)) => {
                self.dirs += 1 + below.dirs;
                self.files += below.files;
                self.others += below.others;
                self.bytes += below.bytes;
            }
            (crate::tree::NodeKind::File(_), _) => {
                self.files += 1;
                self.bytes += node.size;
            }
            _ => self.others += 1,
        }
    }
}

/// Counts kept at most: about 80 bytes each (a few times the trees of the largest system trees a
/// version holds). Past it they are dropped and counted again as they are met.
const MAX_COUNTS: usize = 500_000;

impl KnownTrees {
    /// The counts of tree `id`, read from the repository where not known.
    pub(crate) fn of(&self, repo: &Repository, id: &crate::Id) -> Result<Counts> {
        if let Some(counts) = self.counts.lock().expect("counts lock").get(id) {
            return Ok(*counts);
        }
        let tree = repo.read_tree(id)?;
        let mut counts = Counts::default();
        for node in &tree.nodes {
            let below = match &node.kind {
                crate::tree::NodeKind::Dir { subtree } => Some(self.of(repo, subtree)?),
                _ => None,
            };
            counts.add(node, below);
        }
        Self::count(&mut self.counts.lock().expect("counts lock"), *id, counts);
        Ok(counts)
    }

    /// Counts the tree a backup stores as `id`, from its nodes and the counts of its subtrees
    /// (stored or counted before it). Then a later backup that takes it from its parent does not
    /// read it and all below it again to count it. A subtree not counted leaves it uncounted.
    pub(crate) fn stored(&self, id: crate::Id, nodes: &[crate::tree::Node]) {
        let mut known = self.counts.lock().expect("counts lock");
        let mut counts = Counts::default();
        for node in nodes {
            let below = match &node.kind {
                crate::tree::NodeKind::Dir { subtree } => match known.get(subtree) {
                    Some(below) => Some(*below),
                    None => return,
                },
                _ => None,
            };
            counts.add(node, below);
        }
        Self::count(&mut known, id, counts);
    }

    fn count(known: &mut std::collections::HashMap<crate::Id, Counts>, id: crate::Id, counts: Counts) {
        if known.len() >= MAX_COUNTS {
            known.clear();
        }
        known.insert(id, counts);
    }

    /// Tree `id`, taken out of those kept (its taker makes the next version's tree of it, which
    /// it keeps in its place); read from the repository where not kept.
    pub(crate) fn take(&self, repo: &Repository, id: &crate::Id) -> Result<crate::tree::Tree> {
        let kept = {
            let mut decoded = self.trees.lock().expect("trees lock");
            let tree = decoded.trees.remove(id);
            decoded.bytes -= tree.as_ref().map_or(0, tree_bytes);
            tree
        };
        match kept {
            Some(tree) => Ok(tree),
            None => repo.read_tree(id),
        }
    }

    /// Keeps tree `id`, decoded, for the next backup; past [`KEPT_TREES_MAX`] every tree kept is
    /// dropped first (those of folders deleted since are never taken out).
    pub(crate) fn keep(&self, id: crate::Id, tree: crate::tree::Tree) {
        let bytes = tree_bytes(&tree);
        let mut decoded = self.trees.lock().expect("trees lock");
        if decoded.bytes + bytes > KEPT_TREES_MAX {
            *decoded = DecodedTrees::default();
        }
        if let Some(old) = decoded.trees.insert(id, tree) {
            decoded.bytes -= tree_bytes(&old);
        }
        decoded.bytes += bytes;
    }
}

/// The result of a backup.
#[derive(Debug)]
pub struct BackupOutcome {
    /// The new version's id.
    pub id: Id,
    /// Its manifest.
    pub version: Version,
    /// Files skipped or unreadable.
    pub warnings: Vec<Warning>,
}

pub(super) struct Shared<'a> {
    pub(super) repo: &'a Repository,
    pub(super) cancel: Option<std::sync::Arc<AtomicBool>>,
    pub(super) saver: BlobSaver<'a>,
    pub(super) progress: &'a dyn Progress,
    pub(super) warnings: Mutex<Vec<Warning>>,
    pub(super) failure: Mutex<Option<RepoError>>,
    pub(super) abort: AtomicBool,
    pub(super) files_read: AtomicU64,
    pub(super) bytes_read: AtomicU64,
    /// Segments of big files for idle readers to cut.
    pub(super) helpers: Helpers,
    /// Files done are told to `progress`: in a session's first pass only, which goes through
    /// the whole selection (a later one goes through it again, reading only what changed).
    pub(super) counting: AtomicBool,
}

impl Shared<'_> {
    pub(super) fn warn(&self, path: &Path, message: String) {
        let warning = Warning { path: path.display().to_string(), message };
        self.progress.warning(&warning);
        self.warnings.lock().expect("warnings lock").push(warning);
    }

    /// A file's content read or taken from the parent: told to `progress` while counting.
    pub(super) fn file_done(&self, bytes: u64) {
        if self.counting.load(Ordering::Relaxed) {
            self.progress.file_done(bytes);
        }
    }

    pub(super) fn fail(&self, error: RepoError) {
        self.abort.store(true, Ordering::SeqCst);
        self.failure.lock().expect("failure lock").get_or_insert(error);
    }

    /// True once the backup is to stop (a signal, or a failure elsewhere): a reader looks at it
    /// between chunks, so a large file does not hold the stop up.
    pub(super) fn stopping(&self) -> bool {
        if self.cancel.as_ref().is_some_and(|c| c.load(Ordering::SeqCst)) {
            self.abort.store(true, Ordering::SeqCst);
        }
        self.abort.load(Ordering::SeqCst)
    }

    pub(super) fn check_abort(&self) -> Result<()> {
        if self.cancel.as_ref().is_some_and(|c| c.load(Ordering::SeqCst)) {
            self.abort.store(true, Ordering::SeqCst);
        }
        if self.abort.load(Ordering::SeqCst) {
            Err(self.failure.lock().expect("failure lock").take().unwrap_or(RepoError::Interrupted))
        } else {
            Ok(())
        }
    }
}

/// Backs up `options.selections`, read from `source`, into `repo` (whose index must be loaded)
/// and saves a version.
pub fn backup<S: Source>(
    repo: &Repository,
    options: &BackupOptions,
    source: &S,
    progress: &dyn Progress,
) -> Result<BackupOutcome> {
    let mut session = Session::new(repo, options, progress);
    let parent = options.parent.map(|id| Pass::of_version(repo, &id)).transpose()?;
    let pass = session.pass(source, &options.selections, options.changed.as_ref(), parent)?;
    session.finish(options, pass)
}

/// What a walk made: a root tree, read from what its source showed from a point in time on.
/// A later pass may take it as its parent, as a backup takes its parent version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// The root tree.
    pub tree: Id,
    /// When its walk began (ns since the epoch): an entry whose ctime is not settled before it
    /// may have changed again unseen while it was read (see [`settled_before`]).
    ///
    /// [`settled_before`]: crate::meta::settled_before
    pub time_ns: i64,
}

impl Pass {
    /// Version `id`'s tree and point in time.
    pub fn of_version(repo: &Repository, id: &Id) -> Result<Pass> {
        let version = repo.read_version(id)?;
        Ok(Pass { tree: version.tree, time_ns: version.time_ns })
    }
}

/// A backup made in one pass or more over one saver, its version saved at the end: a pass walks
/// a source against a parent (the parent version's tree, or an earlier pass's) and stores the
/// trees and blobs it makes; [`Session::finish`] writes the last packs and the index, then the
/// version of the pass it is given. A pass that reads the live files before a freeze, then one
/// that reads again from the shadow copy only what changed since, read each changed file once
/// when nothing changes in between.
pub struct Session<'a> {
    shared: Shared<'a>,
    counts: std::sync::Arc<KnownTrees>,
    keep_trees: bool,
    names: Names,
    threads: usize,
    started: std::time::Instant,
    /// The figures of the last pass.
    stats: VersionStats,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("threads", &self.threads).field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl<'a> Session<'a> {
    /// A session for a backup with `options` (its root, threads, cancel flag and kept trees) into
    /// `repo` (whose index must be loaded).
    pub fn new(repo: &'a Repository, options: &BackupOptions, progress: &'a dyn Progress) -> Session<'a> {
        let threads = if options.threads == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
        } else {
            options.threads
        };
        Session {
            shared: Shared {
                repo,
                cancel: options.cancel.clone(),
                saver: BlobSaver::new(repo),
                progress,
                warnings: Mutex::new(Vec::new()),
                failure: Mutex::new(None),
                abort: AtomicBool::new(false),
                files_read: AtomicU64::new(0),
                bytes_read: AtomicU64::new(0),
                helpers: Helpers::new(),
                counting: AtomicBool::new(true),
            },
            counts: options.counts.clone().unwrap_or_default(),
            keep_trees: options.counts.is_some(),
            names: Names::load(&options.root),
            threads,
            started: std::time::Instant::now(),
            stats: VersionStats::default(),
        }
    }

    /// Walks `selections` as `source` shows them, against `parent`: with `changed` (what
    /// changed since the parent was read), only what it names. Returns the pass's root tree.
    pub fn pass<S: Source>(
        &mut self,
        source: &S,
        selections: &[Selection],
        changed: Option<&Journaled>,
        parent: Option<Pass>,
    ) -> Result<Pass> {
        let time_ns = crate::lock::now_ns();
        let (parent_tree, parent_time_ns) = match parent {
            Some(parent) => (Some(self.counts.take(self.shared.repo, &parent.tree)?), parent.time_ns),
            None => (None, 0),
        };
        let (shared, threads, progress) = (&self.shared, self.threads, self.shared.progress);
        let selection = SelectionNode::build(selections);
        let mut stats = VersionStats::default();
        let walk_done = AtomicBool::new(false);
        // One walker per core at most: the readers and sealers need theirs too.
        let spare_walkers = AtomicIsize::new(threads as isize - 1);
        let walked = std::thread::scope(|scope| {
            let (file_tx, file_rx) = bounded::<FileJob<S::Place>>(threads * 16);
            let (blob_tx, blob_rx) = bounded::<BlobJob>(threads);
            let mut readers = Vec::new();
            for _ in 0..threads {
                let (file_rx, blob_tx) = (file_rx.clone(), blob_tx.clone());
                readers.push(scope.spawn(move || reader(shared, source, file_rx, blob_tx)));
            }
            for _ in 0..threads {
                let blob_rx = blob_rx.clone();
                scope.spawn(move || sealer(shared, blob_rx));
            }
            drop(file_rx);
            drop(blob_rx);
            // Without a parent every entry is looked up: a second thread warms the cache from
            // the far end. With one, most are not (unchanged entries may be found elsewhere by
            // the source), and a prefetch would look every one up.
            if parent_tree.is_none() {
                let prefetched = source.prefetch_root();
                let walk_done = &walk_done;
                scope.spawn(move || prefetch_metadata(&prefetched, selections, walk_done, progress));
            }
            let mut walker = Walker {
                changed: changed.filter(|_| parent_tree.is_some()),
                counts: &self.counts,
                keep_trees: self.keep_trees,
                reused: 0,
                shared,
                source,
                names: &self.names,
                parent_time_ns,
                file_tx,
                blob_tx,
                stats: &mut stats,
                in_flight: 0,
                missed: Vec::new(),
                spare: &spare_walkers,
            };
            let tree = walker.walk(&selection, parent_tree, &walk_done);
            let missed = std::mem::take(&mut walker.missed);
            if walker.changed.is_some() {
                tracing::debug!(reused = walker.reused, "folders taken from the parent as the journal allowed");
            }
            drop(walker);
            for reader in readers {
                let _ = reader.join();
            }
            tree.map(|tree| (tree, missed))
        });
        self.shared.counting.store(false, Ordering::Relaxed);
        let (tree, missed) = walked?;
        self.shared.check_abort()?;
        // A version that silently lacks a selected path would lie: none is saved.
        if !missed.is_empty() {
            return Err(RepoError::Unread { paths: missed.iter().map(|p| p.display().to_string()).collect() });
        }
        self.stats = stats;
        Ok(Pass { tree, time_ns })
    }

    /// Writes what is still to write and saves the version of `pass` (the last), with
    /// `options`' parent, host, tags, components and records. Its figures are the last pass's;
    /// the files and bytes read, and the blobs added, those of every pass.
    pub fn finish(self, options: &BackupOptions, pass: Pass) -> Result<BackupOutcome> {
        let Session { shared, started, mut stats, .. } = self;
        shared.saver.finish()?;
        let warnings = shared.warnings.into_inner().expect("warnings lock");
        stats.files_read = shared.files_read.load(Ordering::Relaxed);
        stats.files_unchanged = stats.files.saturating_sub(stats.files_read);
        stats.bytes_read = shared.bytes_read.load(Ordering::Relaxed);
        stats.blobs_added = shared.saver.stats.blobs.load(Ordering::Relaxed);
        stats.bytes_added = shared.saver.stats.raw_bytes.load(Ordering::Relaxed);
        stats.bytes_stored = shared.saver.stats.stored_bytes.load(Ordering::Relaxed);
        stats.errors = warnings.len() as u64;
        stats.duration_ms = started.elapsed().as_millis() as u64;
        let version = Version {
            time_ns: if options.time_ns != 0 { options.time_ns } else { pass.time_ns },
            host: options.host.clone(),
            root_path: options.root.display().to_string(),
            tree: pass.tree,
            components: options.components.clone(),
            parent: options.parent,
            tags: options.tags.clone(),
            stats,
            program: format!("sysstate {}", env!("CARGO_PKG_VERSION")),
            shadow: options.shadow.clone(),
            system: options.system.clone(),
            extra: Default::default(),
        };
        let id = shared.repo.save_version(&version)?;
        Ok(BackupOutcome { id, version, warnings })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{FileKind, LocalBackend};
    use crate::keys::KdfParams;
    use std::sync::Arc;

    fn options(
        root: &Path,
        parent: Option<Id>,
        changed: Option<Journaled>,
        kept: Option<&Arc<KnownTrees>>,
    ) -> BackupOptions {
        BackupOptions {
            root: root.to_path_buf(),
            selections: vec![Selection { path: "/".into(), exclude: None, source: None }],
            components: Vec::new(),
            parent,
            host: "host".into(),
            tags: Vec::new(),
            threads: 1,
            shadow: None,
            system: None,
            time_ns: 0,
            cancel: None,
            changed,
            counts: kept.cloned(),
        }
    }

    /// A repository in `dir/repo`, its index loaded.
    fn new_repo(dir: &Path) -> Repository {
        let cheap = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };
        let repo = Repository::init(Arc::new(LocalBackend::new(dir.join("repo"))), b"p", cheap).unwrap();
        repo.load_index().unwrap();
        repo
    }

    /// A backup with kept trees takes its parent's trees of the folders the journal named from
    /// memory: with every pack of trees gone from the repository it still makes the version a
    /// full walk makes (the same trees, the same figures), where a backup without them fails to
    /// read its parent's root tree.
    #[test]
    fn kept_trees_stand_in_for_the_parents_trees_in_the_repository() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        for (path, data) in [("a/b/changed", "one"), ("a/b/same", "two"), ("a/c/file", "three"), ("d/e/file", "four")] {
            std::fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
            std::fs::write(root.join(path), data).unwrap();
        }
        // Reading a file or listing a folder would move its access time (relatime) where it is
        // not after its last change: the parent's nodes would then differ from the walk's.
        let later =
            std::fs::FileTimes::new().set_accessed(std::time::SystemTime::now() + std::time::Duration::from_secs(3600));
        for path in ["", "a", "a/b", "a/b/changed", "a/b/same", "a/c", "a/c/file", "d", "d/e", "d/e/file"] {
            std::fs::File::open(root.join(path)).unwrap().set_times(later).unwrap();
        }
        let repo = new_repo(dir.path());
        let source = crate::source::TreeSource::new(&root);
        let kept = Arc::new(KnownTrees::default());
        let first = backup(&repo, &options(&root, None, None, Some(&kept)), &source, &crate::NoProgress).unwrap();
        // The journal's word: one file changed, in /a/b.
        std::fs::write(root.join("a/b/changed"), "one, changed").unwrap();
        let changed = Journaled {
            dirs: vec!["/a/b".into()],
            whole: Vec::new(),
            names: [(PathBuf::from("/a/b"), vec!["changed".into()])].into(),
            reread: Vec::new(),
        };
        for pack in repo.index().tree_packs() {
            repo.backend().remove(FileKind::Pack, &pack.to_hex()).unwrap();
        }
        let without = backup(
            &repo,
            &options(&root, Some(first.id), Some(changed.clone()), Some(&Arc::default())),
            &source,
            &crate::NoProgress,
        );
        assert!(without.is_err(), "the parent's trees are still in the repository");
        let second =
            backup(&repo, &options(&root, Some(first.id), Some(changed), Some(&kept)), &source, &crate::NoProgress)
                .unwrap();
        let walked = backup(&repo, &options(&root, None, None, None), &source, &crate::NoProgress).unwrap();
        assert_eq!(second.version.tree, walked.version.tree);
        let figures = |v: &Version| (v.stats.files, v.stats.dirs, v.stats.others, v.stats.bytes_total);
        assert_eq!(figures(&second.version), figures(&walked.version));
        assert_eq!(second.version.stats.files, 4);
    }

    /// A backup in two passes — the first against the parent version by what changed since it,
    /// the second against the first by what changed since that began — makes the version a
    /// full walk of the tree as it stands after both makes, with the blobs of both passes in
    /// the index and a file changed between the passes as it is at the end.
    #[test]
    fn a_second_pass_by_what_changed_since_the_first_is_a_full_walk() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let files = ["a/b/changed", "a/b/same", "a/c/file", "d/e/file", "d/f/file"];
        for path in files {
            std::fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
            std::fs::write(root.join(path), path).unwrap();
        }
        // Reading a file or listing a folder would move its access time (relatime) where it is
        // not after its last change: the parent's nodes would then differ from the walk's.
        let settle = |paths: &[&str]| {
            let later = std::fs::FileTimes::new()
                .set_accessed(std::time::SystemTime::now() + std::time::Duration::from_secs(3600));
            for path in paths {
                std::fs::File::open(root.join(path)).unwrap().set_times(later).unwrap();
            }
        };
        settle(&["", "a", "a/b", "a/c", "d", "d/e", "d/f"]);
        settle(&files);
        let repo = new_repo(dir.path());
        let source = crate::source::TreeSource::new(&root);
        let kept = Arc::new(KnownTrees::default());
        let first = backup(&repo, &options(&root, None, None, Some(&kept)), &source, &crate::NoProgress).unwrap();
        let journal = |named: &[(&str, &[&str])]| Journaled {
            dirs: named.iter().map(|(dir, _)| PathBuf::from(dir)).collect(),
            whole: Vec::new(),
            names: named
                .iter()
                .map(|(dir, names)| (PathBuf::from(dir), names.iter().map(std::ffi::OsString::from).collect()))
                .collect(),
            reread: Vec::new(),
        };
        // Before the first pass: a file changed, one added.
        std::fs::write(root.join("a/b/changed"), "changed before the first pass").unwrap();
        std::fs::write(root.join("d/e/new"), "added before the first pass").unwrap();
        settle(&["a/b", "d/e", "a/b/changed", "d/e/new"]);
        let before_first = journal(&[("/a/b", &["changed"]), ("/d/e", &["new"])]);
        let last = options(&root, Some(first.id), None, Some(&kept));
        // Progress counts the first pass, which goes through the whole selection, and only it.
        struct Counted(std::sync::atomic::AtomicU64);
        impl crate::Progress for Counted {
            fn file_done(&self, bytes: u64) {
                self.0.fetch_add(bytes, Ordering::Relaxed);
            }
        }
        let counted = Counted(AtomicU64::new(0));
        let at_first: u64 =
            files.iter().chain(&["d/e/new"]).map(|path| std::fs::metadata(root.join(path)).unwrap().len()).sum();
        let mut session = Session::new(&repo, &last, &counted);
        let parent = Pass::of_version(&repo, &first.id).unwrap();
        let draft = session.pass(&source, &last.selections, Some(&before_first), Some(parent)).unwrap();
        assert_eq!(counted.0.load(Ordering::Relaxed), at_first, "the first pass's bytes");
        // Between the passes: the added file changed again, another changed, one removed.
        std::fs::write(root.join("d/e/new"), "added, then changed between the passes").unwrap();
        std::fs::write(root.join("a/c/file"), "changed between the passes").unwrap();
        std::fs::remove_file(root.join("a/b/same")).unwrap();
        settle(&["a/b", "a/c", "d/e", "d/e/new", "a/c/file"]);
        let between = journal(&[("/a/b", &["same"]), ("/a/c", &["file"]), ("/d/e", &["new"])]);
        let pass = session.pass(&source, &last.selections, Some(&between), Some(draft)).unwrap();
        assert_ne!(pass.tree, draft.tree);
        let second = session.finish(&last, pass).unwrap();
        assert_eq!(counted.0.load(Ordering::Relaxed), at_first, "the second pass counted too");
        assert_eq!(second.version.parent, Some(first.id));
        let walked = backup(&repo, &options(&root, None, None, None), &source, &crate::NoProgress).unwrap();
        assert_eq!(second.version.tree, walked.version.tree);
        let figures = |v: &Version| (v.stats.files, v.stats.dirs, v.stats.others, v.stats.bytes_total);
        assert_eq!(figures(&second.version), figures(&walked.version));
        assert_eq!(second.version.stats.files, 5);
        // Both passes' reads: the two files changed before the first, and the two after.
        assert!(second.version.stats.files_read >= 4, "{:?}", second.version.stats);
        // Every blob the version holds is in the index the session wrote.
        let report = crate::check::check(&repo, crate::check::ReadData::All, &crate::NoProgress).unwrap();
        assert!(report.errors.is_empty() && report.damaged_files.is_empty(), "{:?}", report.errors);
    }

    /// A journaled walk of a tree changed in many folders, its halves walked by several threads
    /// at once, makes the version a full walk makes: the same trees and figures.
    #[test]
    fn a_journaled_walk_in_several_threads_is_a_full_walk() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let mut all = vec![String::new()];
        for top in 0..8 {
            for sub in 0..4 {
                let folder = format!("t{top}/s{sub}");
                std::fs::create_dir_all(root.join(&folder)).unwrap();
                for file in 0..3 {
                    std::fs::write(root.join(format!("{folder}/f{file}")), format!("{folder} {file}")).unwrap();
                    all.push(format!("{folder}/f{file}"));
                }
                all.push(folder);
            }
            all.push(format!("t{top}"));
        }
        let settle = |paths: &[String]| {
            let later = std::fs::FileTimes::new()
                .set_accessed(std::time::SystemTime::now() + std::time::Duration::from_secs(3600));
            for path in paths {
                std::fs::File::open(root.join(path)).unwrap().set_times(later).unwrap();
            }
        };
        settle(&all);
        let repo = new_repo(dir.path());
        let source = crate::source::TreeSource::new(&root);
        let threads = |options: BackupOptions| BackupOptions { threads: 4, ..options };
        let kept = Arc::new(KnownTrees::default());
        let first =
            backup(&repo, &threads(options(&root, None, None, Some(&kept))), &source, &crate::NoProgress).unwrap();
        // A file changed in every folder but one, a file added in some (its access time set
        // past its change, as the others', which a read moves otherwise).
        let mut names = std::collections::HashMap::new();
        let mut added = Vec::new();
        for top in 0..8 {
            for sub in 0..4 {
                if (top, sub) == (3, 2) {
                    continue;
                }
                let folder = format!("t{top}/s{sub}");
                std::fs::write(root.join(format!("{folder}/f1")), format!("{folder} changed")).unwrap();
                let mut named = vec![std::ffi::OsString::from("f1")];
                if sub == top % 4 {
                    std::fs::write(root.join(format!("{folder}/new")), "new").unwrap();
                    added.push(format!("{folder}/new"));
                    named.push("new".into());
                }
                names.insert(PathBuf::from(format!("/{folder}")), named);
            }
        }
        settle(&added);
        let mut dirs: Vec<PathBuf> = names.keys().cloned().collect();
        dirs.sort();
        let changed = Journaled { dirs, whole: Vec::new(), names, reread: Vec::new() };
        let splits = walker::SPLITS.load(Ordering::SeqCst);
        let second = backup(
            &repo,
            &threads(options(&root, Some(first.id), Some(changed), Some(&kept))),
            &source,
            &crate::NoProgress,
        )
        .unwrap();
        let walked = backup(&repo, &options(&root, None, None, None), &source, &crate::NoProgress).unwrap();
        assert_eq!(second.version.tree, walked.version.tree);
        let figures = |v: &Version| (v.stats.files, v.stats.dirs, v.stats.others, v.stats.bytes_total);
        assert_eq!(figures(&second.version), figures(&walked.version));
        assert_eq!(second.version.stats.files, 8 * 4 * 3 + 8);
        assert_eq!(second.version.stats.files_read, 31 + 8, "{:?}", second.version.stats);
        // Only this test walks by a journal with walkers to spare.
        assert!(walker::SPLITS.load(Ordering::SeqCst) > splits, "no folder was split between walkers");
    }
}
