//! Restore in place: make the live entries under a root equal to a version, staged so that no
//! file is ever half-written, and in steps the engine can journal and undo.
//!
//! 1. [`plan`] compares the version with the live tree and lists the differences (what
//!    `--dry-run` prints); [`plan_paths`] does the same for a list of paths only (undo).
//! 2. [`stage`] writes every new or replaced entry beside its live name as `.sysstate-TAG-N`
//!    (N: the difference's index), then syncs each filesystem. Nothing live has changed yet: a
//!    failure here is cleaned up with [`clean_staged`] and leaves the system as it was.
//! 3. [`commit`] renames each staged entry over its live name, removes what the version lacks,
//!    sets metadata-only changes, then puts back the times of the directories it changed.
//!
//! Writes go through directory handles opened with `openat2(RESOLVE_BENEATH | NO_SYMLINKS)`
//! from the root, as in the restorer: a hostile version cannot reach outside the root.

use crate::archiver::chunk_file;
use crate::error::{RepoError, Result};
use crate::id::Id;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::restorer::{self, apply_metadata, open_dir_beneath, RestoreOptions, Target};
use crate::source::open_file as open_source;
use crate::tree::{at_path, too_deep, Node, NodeKind, MAX_TREE_DEPTH};
use globset::GlobSet;
use rustix::fs::{AtFlags, Mode, OFlags};
use serde::Serialize;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What happens to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// The version has it, the live tree does not.
    Add,
    /// Both have it, with other content or metadata.
    Change,
    /// The live tree has it, the version does not.
    Remove,
}

/// One difference between the live tree and the version.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Difference {
    /// The path, absolute as seen from the root.
    pub path: String,
    /// Add, change or remove.
    pub change: Change,
    /// For a change, what differs: `type`, `content`, `target`, `device`, `mode`, `owner`,
    /// `xattrs`, `mtime`.
    pub what: Vec<&'static str>,
    /// Entries it stands for: an added or removed directory counts its whole subtree.
    pub entries: u64,
    /// The version's entry (none for a removal).
    #[serde(skip)]
    node: Option<Node>,
    /// The path relative to the root.
    #[serde(skip)]
    relative: PathBuf,
    /// Set up in place (a missing directory on the way to the scope), not staged and renamed.
    #[serde(skip)]
    on_the_way: bool,
}

impl Difference {
    /// True when the entry is written beside its live name and renamed over it; false for a
    /// removal or a change of metadata only.
    fn staged(&self) -> bool {
        self.node.is_some()
            && !self.on_the_way
            && (self.change == Change::Add
                || self.what.iter().any(|w| matches!(*w, "type" | "content" | "target" | "device")))
    }

    /// The paths to keep for undo: a removed or replaced entry whole, a metadata-only change as
    /// the entry alone. `None` for an addition (there is nothing to keep).
    pub fn keep(&self) -> Option<(PathBuf, bool)> {
        match self.change {
            Change::Add => None,
            Change::Remove => Some((PathBuf::from(&self.path), true)),
            Change::Change => Some((PathBuf::from(&self.path), self.staged())),
        }
    }
}

/// The differences, in path order, and the version's directories they lie in.
#[derive(Debug, Default)]
pub struct Plan {
    /// What differs.
    pub differences: Vec<Difference>,
    /// The version's directories by relative path, for their times after their entries change.
    dirs: BTreeMap<PathBuf, Node>,
}

/// Which part of the version to restore in place.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Absolute paths (a component's); must not be empty.
    pub include: Vec<PathBuf>,
    /// Absolute paths left alone (other components' paths nested in the included ones).
    pub exclude: Vec<PathBuf>,
    /// Live entries the version lacks on purpose (the components' exclude patterns, matched
    /// against the path relative to the root and the file name): kept, never removed.
    pub keep: Option<GlobSet>,
    /// Compare and set owners (root only).
    pub owners: bool,
}

/// The name an entry is staged under, beside its live name.
pub fn staged_name(tag: &str, index: usize) -> String {
    format!(".sysstate-{tag}-{index}")
}

fn io_error(path: &Path, source: std::io::Error) -> RepoError {
    RepoError::Io { path: Path::new("/").join(path).display().to_string(), source }
}

/// Compares the version's tree `tree` with the live tree under `root`, within `scope`.
pub fn plan(repo: &Repository, tree: &Id, root: &Path, scope: &Scope) -> Result<Plan> {
    if scope.include.is_empty() {
        return Err(RepoError::Invalid("an in-place restore needs the paths to restore".into()));
    }
    let mut planner = Planner { repo, root, scope, plan: Plan::default() };
    planner.dir(tree, Path::new(""), false)?;
    Ok(planner.plan)
}

/// Compares the entries at `paths` (absolute; each on its own, a directory without its
/// entries) in `tree` with the live ones under `root`.
pub fn plan_paths(repo: &Repository, tree: &Id, root: &Path, paths: &[PathBuf], owners: bool) -> Result<Plan> {
    let scope = Scope { include: vec![PathBuf::from("/")], owners, ..Scope::default() };
    let mut planner = Planner { repo, root, scope: &scope, plan: Plan::default() };
    for path in paths {
        let relative = path.strip_prefix("/").unwrap_or(path).to_path_buf();
        let node = planner.lookup(tree, &relative)?;
        let live = std::fs::symlink_metadata(root.join(&relative)).ok();
        match (node, live) {
            (None, None) => {}
            (None, Some(meta)) => {
                planner.push(&relative, Change::Remove, Vec::new(), live_entries(root, &relative, &meta), None)
            }
            (Some(node), live) => planner.compare(&relative, node, live, false)?,
        }
    }
    planner.plan.differences.sort_by(|a, b| a.relative.cmp(&b.relative));
    Ok(planner.plan)
}

struct Planner<'a> {
    repo: &'a Repository,
    root: &'a Path,
    scope: &'a Scope,
    plan: Plan,
}

impl Planner<'_> {
    /// (restore this entry, descend into it)
    fn included(&self, relative: &Path) -> (bool, bool) {
        let absolute = Path::new("/").join(relative);
        let inside = self.scope.include.iter().any(|p| absolute.starts_with(p))
            && !self.scope.exclude.iter().any(|p| absolute.starts_with(p));
        let above = self.scope.include.iter().any(|p| p.starts_with(&absolute));
        (inside, inside || above)
    }

    fn kept(&self, relative: &Path) -> bool {
        let name = relative.file_name().map(Path::new).unwrap_or(relative);
        self.scope.keep.as_ref().is_some_and(|keep| keep.is_match(relative) || keep.is_match(name))
    }

    fn push(&mut self, relative: &Path, change: Change, what: Vec<&'static str>, entries: u64, node: Option<Node>) {
        self.plan.differences.push(Difference {
            path: Path::new("/").join(relative).display().to_string(),
            change,
            what,
            entries,
            node,
            relative: relative.to_path_buf(),
            on_the_way: false,
        });
    }

    /// The version's entry at `relative`, recording the directories on the way.
    fn lookup(&mut self, tree: &Id, relative: &Path) -> Result<Option<Node>> {
        let mut tree = *tree;
        let mut at = PathBuf::new();
        let mut components = relative.components().peekable();
        while let Some(component) = components.next() {
            let name = component.as_os_str().as_bytes();
            let Some(node) = self.repo.read_tree(&tree)?.get(name).cloned() else { return Ok(None) };
            at.push(component);
            if components.peek().is_none() {
                return Ok(Some(node));
            }
            let NodeKind::Dir { subtree } = node.kind else { return Ok(None) };
            self.plan.dirs.insert(at.clone(), node);
            tree = subtree;
        }
        Ok(None)
    }

    fn dir(&mut self, tree: &Id, relative: &Path, in_scope: bool) -> Result<()> {
        if relative.components().count() > MAX_TREE_DEPTH {
            return Err(too_deep(self.repo, at_path(&Path::new("/").join(relative))));
        }
        let tree = self.repo.read_tree(tree)?;
        let live_dir = self.root.join(relative);
        let live_dev = std::fs::symlink_metadata(&live_dir).map(|m| m.dev()).ok();
        for node in &tree.nodes {
            let path = relative.join(OsStr::from_bytes(&node.name));
            let (restore_it, descend) = self.included(&path);
            if !descend {
                continue;
            }
            let live = std::fs::symlink_metadata(self.root.join(&path)).ok();
            if restore_it {
                self.compare(&path, node.clone(), live, true)?;
                continue;
            }
            // On the way to the scope: never changed, but created when missing.
            let NodeKind::Dir { subtree } = &node.kind else { continue };
            match live {
                Some(meta) if meta.is_dir() => {}
                Some(_) => continue,
                None => {
                    self.push(&path, Change::Add, Vec::new(), 1, Some(node.clone()));
                    self.plan.differences.last_mut().expect("just pushed").on_the_way = true;
                }
            }
            self.plan.dirs.insert(path.clone(), node.clone());
            self.dir(subtree, &path, false)?;
        }
        if !in_scope {
            return Ok(());
        }
        let Ok(entries) = std::fs::read_dir(&live_dir) else { return Ok(()) };
        let mut extra: Vec<_> = entries
            .filter_map(|e| e.ok())
            .filter(|e| tree.get(e.file_name().as_bytes()).is_none())
            .map(|e| e.file_name())
            .collect();
        extra.sort();
        for name in extra {
            let path = relative.join(&name);
            let Ok(meta) = std::fs::symlink_metadata(self.root.join(&path)) else { continue };
            // Left alone: other components' paths, what the component excludes, sockets (never
            // backed up) and other filesystems mounted here.
            if !self.included(&path).0
                || self.kept(&path)
                || meta.file_type().is_socket()
                || Some(meta.dev()) != live_dev
            {
                continue;
            }
            let entries = live_entries(self.root, &path, &meta);
            self.push(&path, Change::Remove, Vec::new(), entries, None);
        }
        Ok(())
    }

    /// Compares the version's `node` with the live entry at `relative`; with `recurse`, goes on
    /// into a directory both have.
    fn compare(&mut self, relative: &Path, node: Node, live: Option<std::fs::Metadata>, recurse: bool) -> Result<()> {
        let Some(meta) = live else {
            let entries = self.version_entries(&node)?;
            self.push(relative, Change::Add, Vec::new(), entries, Some(node));
            return Ok(());
        };
        let live_path = self.root.join(relative);
        let file_type = meta.file_type();
        let mut what = Vec::new();
        if !node.kind.is_type_of(file_type) {
            what.push("type");
            let entries = self.version_entries(&node)?;
            self.push(relative, Change::Change, what, entries, Some(node));
            return Ok(());
        }
        let differs = match &node.kind {
            NodeKind::File(content) => {
                let same = same_content(self.repo, &live_path, &meta, node.size, content);
                (!same.map_err(|e| io_error(relative, e))?).then_some("content")
            }
            NodeKind::Symlink { target } => {
                let live_target = std::fs::read_link(&live_path).map_err(|e| io_error(relative, e))?;
                (live_target.as_os_str().as_bytes() != target.as_slice()).then_some("target")
            }
            NodeKind::CharDevice { rdev } | NodeKind::BlockDevice { rdev } => {
                (*rdev != meta.rdev()).then_some("device")
            }
            NodeKind::Dir { .. } | NodeKind::Fifo => None,
        };
        what.extend(differs);
        let is_dir = matches!(node.kind, NodeKind::Dir { .. });
        if !matches!(node.kind, NodeKind::Symlink { .. }) && node.mode & 0o7777 != meta.mode() & 0o7777 {
            what.push("mode");
        }
        if self.scope.owners && (node.uid, node.gid) != (meta.uid(), meta.gid()) {
            what.push("owner");
        }
        let xattrs = sysstate_fs::read_xattrs(&live_path).map_err(|e| io_error(relative, e))?;
        if xattrs != node.xattrs {
            what.push("xattrs");
        }
        // A directory's time changes with its entries; it is put back after them, not compared.
        if !is_dir && node.mtime_ns != crate::meta::mtime_ns(&meta) {
            what.push("mtime");
        }
        let subtree = match &node.kind {
            NodeKind::Dir { subtree } => Some(*subtree),
            _ => None,
        };
        if subtree.is_some() {
            self.plan.dirs.insert(relative.to_path_buf(), node.clone());
        }
        if !what.is_empty() {
            self.push(relative, Change::Change, what, 1, Some(node));
        }
        if let (Some(subtree), true) = (subtree, recurse) {
            self.dir(&subtree, relative, true)?;
        }
        Ok(())
    }

    /// Entries of the version's `node`, itself included.
    fn version_entries(&self, node: &Node) -> Result<u64> {
        let NodeKind::Dir { subtree } = &node.kind else { return Ok(1) };
        let mut count = 1;
        let mut stack = vec![(*subtree, 1)];
        while let Some((tree, depth)) = stack.pop() {
            if depth > MAX_TREE_DEPTH {
                return Err(too_deep(self.repo, at_path(&Path::new("/").join(OsStr::from_bytes(&node.name)))));
            }
            for child in self.repo.read_tree(&tree)?.nodes {
                count += 1;
                if let NodeKind::Dir { subtree } = child.kind {
                    stack.push((subtree, depth + 1));
                }
            }
        }
        Ok(count)
    }
}

/// Live entries at `relative`, itself included, not crossing into other filesystems.
fn live_entries(root: &Path, relative: &Path, meta: &std::fs::Metadata) -> u64 {
    if !meta.is_dir() {
        return 1;
    }
    let mut count = 1;
    if let Ok(entries) = std::fs::read_dir(root.join(relative)) {
        for entry in entries.flatten() {
            if let Ok(child) = entry.metadata() {
                if child.dev() == meta.dev() {
                    count += live_entries(root, &relative.join(entry.file_name()), &child);
                }
            }
        }
    }
    count
}

/// True when the live file has exactly the version's content (and holes).
fn same_content(
    repo: &Repository,
    path: &Path,
    meta: &std::fs::Metadata,
    size: u64,
    content: &crate::tree::FileContent,
) -> std::io::Result<bool> {
    if meta.size() != size {
        return Ok(false);
    }
    let file = open_source(path)?;
    let mut expected = content.blobs.iter();
    let mut same = true;
    let (extents, _) = chunk_file(repo, &file, size, meta.blocks() * 512 < size, None, |id, _| {
        same = expected.next() == Some(&id);
        Ok(same)
    })?;
    Ok(same && expected.next().is_none() && extents == content.extents)
}

/// Writes every new and replaced entry of `plan` beside its live name, then syncs each
/// filesystem written to. Creates the missing directories on the way. On error, what was
/// staged stays for [`clean_staged`].
pub fn stage(
    repo: &Repository,
    plan: &Plan,
    root: &Path,
    tag: &str,
    owners: bool,
    progress: &dyn Progress,
) -> Result<()> {
    let root_fd = open_root(root)?;
    let mut synced = BTreeMap::new();
    for (index, difference) in plan.differences.iter().enumerate() {
        let (Some(node), parent) = (&difference.node, difference.relative.parent().unwrap_or(Path::new(""))) else {
            continue;
        };
        let fail = |e: std::io::Error| io_error(&difference.relative, e);
        if difference.on_the_way {
            let dir = open_dir_beneath(&root_fd, parent).map_err(fail)?;
            rustix::fs::mkdirat(&dir, OsStr::from_bytes(&node.name), Mode::from_raw_mode(0o700))
                .map_err(|e| fail(e.into()))?;
            continue;
        }
        if !difference.staged() {
            continue;
        }
        let dir = open_dir_beneath(&root_fd, parent).map_err(fail)?;
        let name = staged_name(tag, index);
        match &node.kind {
            NodeKind::File(_) => {
                let bytes =
                    restorer::write_file(repo as &dyn crate::fetcher::BlobSource, &dir, name.as_bytes(), node, owners)
                        .map_err(fail)?;
                progress.file_done(bytes);
            }
            NodeKind::Dir { subtree } => {
                restorer::clear(&dir, name.as_bytes()).map_err(fail)?;
                rustix::fs::mkdirat(&dir, name.as_str(), Mode::from_raw_mode(0o700)).map_err(|e| fail(e.into()))?;
                let options = RestoreOptions {
                    target: root.join(parent).join(&name),
                    include: Vec::new(),
                    exclude: Vec::new(),
                    threads: 0,
                    owners,
                };
                let outcome = restorer::restore_tree(repo, subtree, &options, Some(progress))?;
                if let Some(warning) = outcome.warnings.first() {
                    return Err(RepoError::Invalid(format!(
                        "cannot stage `{}`: `{}` {}",
                        difference.path, warning.path, warning.message
                    )));
                }
                let staged = open_dir_beneath(&dir, Path::new(&name)).map_err(fail)?;
                apply_metadata(owners, Target::Fd(staged.as_fd()), node).map_err(fail)?;
            }
            _ => restorer::make_special(owners, &dir, name.as_bytes(), node).map_err(fail)?,
        }
        let device = rustix::fs::fstat(&dir).map(|s| s.st_dev).unwrap_or(0);
        synced.entry(device).or_insert(dir);
    }
    // One syncfs per filesystem makes every staged byte durable before anything is renamed.
    for dir in synced.values() {
        rustix::fs::syncfs(dir).map_err(|e| RepoError::Io { path: root.display().to_string(), source: e.into() })?;
    }
    Ok(())
}

fn open_root(root: &Path) -> Result<OwnedFd> {
    rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| RepoError::Io { path: root.display().to_string(), source: e.into() })
}

/// Removes `name` in `dir`, a directory with everything in it.
fn remove_entry(dir: &OwnedFd, name: &OsStr) -> std::io::Result<()> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(error) => Err(error.into()),
        Ok(stat) if rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::Directory => {
            // std's remove_dir_all never follows a symlink inside the tree; the path reaches the
            // directory through its parent's handle.
            let path = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(dir))).join(name);
            std::fs::remove_dir_all(path)
        }
        Ok(_) => Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?),
    }
}

/// Removes every extended attribute of the entry the version's node does not have.
fn remove_other_xattrs(dir: &OwnedFd, name: &OsStr, node: &Node) -> std::io::Result<()> {
    let path = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(dir))).join(name);
    for (xattr, _) in sysstate_fs::read_xattrs(&path)? {
        if !node.xattrs.iter().any(|(n, _)| *n == xattr) {
            rustix::fs::lremovexattr(&path, OsStr::from_bytes(&xattr))?;
        }
    }
    Ok(())
}

/// Puts the staged entries in place, removes what the version lacks, sets metadata-only
/// changes, and puts back the times of the directories changed. `after_each` is told each
/// difference's index once it is done. Stops at the first error, which names the entry.
pub fn commit(plan: &Plan, root: &Path, tag: &str, owners: bool, after_each: &mut dyn FnMut(usize)) -> Result<()> {
    let root_fd = open_root(root)?;
    let mut touched_dirs = Vec::new();
    for (index, difference) in plan.differences.iter().enumerate() {
        let parent = difference.relative.parent().unwrap_or(Path::new(""));
        let name = difference.relative.file_name().unwrap_or_default();
        let fail = |e: std::io::Error| io_error(&difference.relative, e);
        let dir = open_dir_beneath(&root_fd, parent).map_err(fail)?;
        match &difference.node {
            None => remove_entry(&dir, name).map_err(fail)?,
            Some(node) if difference.on_the_way => {
                apply_metadata(owners, Target::ByName(dir.as_fd(), name), node).map_err(fail)?;
            }
            Some(node) if difference.staged() => {
                let staged = staged_name(tag, index);
                let live_is_dir = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .ok()
                    .map(|s| rustix::fs::FileType::from_raw_mode(s.st_mode) == rustix::fs::FileType::Directory);
                let staged_is_dir = matches!(node.kind, NodeKind::Dir { .. });
                // rename(2) replaces a file by a file atomically; a directory by a file or the
                // other way round needs the old entry gone first (it is kept for undo).
                if live_is_dir.is_some_and(|d| d || staged_is_dir) {
                    remove_entry(&dir, name).map_err(fail)?;
                }
                rustix::fs::renameat(&dir, staged.as_str(), &dir, name).map_err(|e| fail(e.into()))?;
            }
            Some(node) => {
                remove_other_xattrs(&dir, name, node).map_err(fail)?;
                apply_metadata(owners, Target::ByName(dir.as_fd(), name), node).map_err(fail)?;
            }
        }
        touched_dirs.push(parent.to_path_buf());
        after_each(index);
    }
    put_back_dir_times(plan, root, touched_dirs)
}

/// Gives the directories `dirs` (relative to the root) the times the plan's version has for
/// them, deepest first, and makes each durable: their entries changed, so their times did.
pub fn put_back_dir_times(plan: &Plan, root: &Path, dirs: impl IntoIterator<Item = PathBuf>) -> Result<()> {
    let root_fd = open_root(root)?;
    let dirs: std::collections::BTreeSet<PathBuf> = dirs.into_iter().collect();
    for relative in dirs.iter().rev() {
        let fail = |e: std::io::Error| io_error(relative, e);
        let dir = match open_dir_beneath(&root_fd, relative) {
            Ok(dir) => dir,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(fail(error)),
        };
        if let Some(node) = plan.dirs.get(relative) {
            let times = [node.atime_ns, node.mtime_ns].map(|ns| rustix::fs::Timespec {
                tv_sec: ns.div_euclid(1_000_000_000),
                tv_nsec: ns.rem_euclid(1_000_000_000),
            });
            let times = rustix::fs::Timestamps { last_access: times[0], last_modification: times[1] };
            rustix::fs::futimens(&dir, &times).map_err(|e| fail(e.into()))?;
        }
        rustix::fs::fsync(&dir).map_err(|e| fail(e.into()))?;
    }
    Ok(())
}

/// Removes what [`stage`] left beside the live names of `paths` (absolute, in the order the
/// staging plan had them) under `tag`.
pub fn clean_staged(root: &Path, paths: &[PathBuf], tag: &str) -> Result<()> {
    let root_fd = open_root(root)?;
    for (index, path) in paths.iter().enumerate() {
        let relative = path.strip_prefix("/").unwrap_or(path);
        let parent = relative.parent().unwrap_or(Path::new(""));
        if let Ok(dir) = open_dir_beneath(&root_fd, parent) {
            remove_entry(&dir, OsStr::new(&staged_name(tag, index))).map_err(|e| io_error(relative, e))?;
        }
    }
    Ok(())
}

impl Plan {
    /// The differences' paths, absolute, in plan order (the order [`clean_staged`] needs).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.differences.iter().map(|d| PathBuf::from(&d.path)).collect()
    }
}
