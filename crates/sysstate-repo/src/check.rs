//! `check`: the repository's structure (config, keys, index against packs, every tree of every
//! version reachable and every data blob indexed) and, with `read_data`, every blob decrypted,
//! decompressed and checked against its id. Damage is reported with the pack, and the files and
//! versions it breaks.

use crate::backend::FileKind;
use crate::error::Result;
use crate::id::Id;
use crate::index::Index;
use crate::pack::read_header;
use crate::repo::Repository;
use crate::tree::{at_path, too_deep, NodeKind, MAX_TREE_DEPTH};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

/// What check found.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    /// Damage: the repository does not hold what its versions need.
    pub errors: Vec<String>,
    /// Harmless leftovers (packs of an interrupted backup) and the like.
    pub warnings: Vec<String>,
    /// Packs found damaged.
    pub damaged_packs: Vec<String>,
    /// `version:/path` of each file that cannot be restored whole.
    pub damaged_files: Vec<String>,
    /// Versions that cannot be restored whole.
    pub damaged_versions: Vec<String>,
    /// The repairs to run, in order (`sysstate repair index`, …): empty when clean.
    pub repairs: Vec<String>,
    /// Counts.
    pub versions: usize,
    /// Packs.
    pub packs: usize,
    /// Blobs in the index.
    pub blobs: usize,
    /// Bytes of packs read with `read_data`.
    pub bytes_read: u64,
}

impl CheckReport {
    /// True when nothing is damaged.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

/// How much of the data a check reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadData {
    /// None: the structure only.
    None,
    /// Every pack.
    All,
    /// This percentage of the packs (1–100), chosen at random each time, so that scheduled
    /// checks come round to every pack.
    Sample(u8),
}

/// Checks `repo`, reading as much of its data as `read` says.
pub fn check(repo: &Repository, read: ReadData, progress: &dyn crate::Progress) -> Result<CheckReport> {
    let mut checker = Checker::read_indexes(repo)?;
    checker.compare_packs()?;
    match read {
        ReadData::None => {}
        ReadData::All => checker.read_packs(100, progress),
        ReadData::Sample(percent) => checker.read_packs(percent.clamp(1, 100), progress),
    }
    checker.check_versions()?;
    Ok(checker.into_report())
}

/// The versions (short ids) and files (`version:/path`) that cannot be restored whole when the
/// blobs `missing` are lost (besides those the index lacks).
pub(crate) fn versions_lacking(repo: &Repository, missing: HashSet<Id>) -> Result<(Vec<String>, Vec<String>)> {
    let mut checker = Checker::read_indexes(repo)?;
    checker.missing_blobs = missing;
    checker.check_versions()?;
    Ok((checker.report.damaged_versions, checker.report.damaged_files))
}

/// A check under way: what the index files say, what is stored, and what was found damaged.
struct Checker<'r> {
    repo: &'r Repository,
    report: CheckReport,
    index: Index,
    /// Every pack an index file lists, with the end of its furthest blob. Taken from the files,
    /// not from the blob map: concurrent backups may store one blob twice, and a pack that
    /// holds only such duplicates is indexed all the same.
    indexed_packs: HashMap<Id, u64>,
    /// Every pack stored, with its size.
    packs: HashMap<String, u64>,
    /// Blobs a restore cannot read.
    missing_blobs: HashSet<Id>,
    /// Stored packs that no index lists.
    unindexed: Vec<String>,
    /// Blobs versions need that no index lists.
    absent: usize,
    /// Trees walked clean (a damaged one is walked again for every version, to name them all).
    clean_trees: HashSet<Id>,
}

impl<'r> Checker<'r> {
    /// Reads every index file; an unreadable one is damage.
    fn read_indexes(repo: &'r Repository) -> Result<Checker<'r>> {
        let mut checker = Checker {
            repo,
            report: CheckReport::default(),
            index: Index::default(),
            indexed_packs: HashMap::new(),
            packs: HashMap::new(),
            missing_blobs: HashSet::new(),
            unindexed: Vec::new(),
            absent: 0,
            clean_trees: HashSet::new(),
        };
        for (name, _) in repo.backend().list(FileKind::Index)? {
            match repo.read_index_file(&name) {
                Ok(file) => {
                    for pack in &file.packs {
                        checker.index.add_pack(pack);
                        let end =
                            pack.blobs.iter().map(|b| u64::from(b.offset) + u64::from(b.length)).max().unwrap_or(0);
                        let furthest = checker.indexed_packs.entry(pack.pack).or_default();
                        *furthest = (*furthest).max(end);
                    }
                }
                Err(error) => {
                    checker.report.errors.push(format!("index/{name}: {error}"));
                    checker.repair("sysstate repair index");
                }
            }
        }
        checker.report.blobs = checker.index.len();
        Ok(checker)
    }

    /// Index entries must point into stored packs, within their size; a stored pack no index
    /// lists is a leftover.
    fn compare_packs(&mut self) -> Result<()> {
        self.packs = self.repo.backend().list(FileKind::Pack)?.into_iter().collect();
        self.report.packs = self.packs.len();
        for (pack, end) in &self.indexed_packs {
            match self.packs.get(&pack.to_hex()) {
                None => {
                    self.report.errors.push(format!("pack {} is in the index but missing from `data/`", pack.short()));
                    self.report.damaged_packs.push(pack.to_hex());
                }
                Some(size) if *size < *end => {
                    self.report
                        .errors
                        .push(format!("pack {} is truncated: {size} bytes, the index needs {end}", pack.short()));
                    self.report.damaged_packs.push(pack.to_hex());
                }
                Some(_) => {}
            }
        }
        for name in self.packs.keys() {
            if Id::from_hex(name).is_none_or(|id| !self.indexed_packs.contains_key(&id)) {
                self.unindexed.push(name.clone());
            }
        }
        self.unindexed.sort();
        let damaged = self.damaged();
        for (id, location) in self.index.iter() {
            if damaged.contains(&location.pack) {
                self.missing_blobs.insert(id);
            }
        }
        Ok(())
    }

    fn damaged(&self) -> HashSet<Id> {
        self.report.damaged_packs.iter().filter_map(|p| Id::from_hex(p)).collect()
    }

    /// Reads every indexed pack not already found damaged: its content against its name, its
    /// header, and every blob decrypted and checked against its id. Several packs are read at
    /// once (eight from a remote repository, one per core from a local one); what each shows
    /// is reported in the order of their names.
    fn read_packs(&mut self, percent: u8, progress: &dyn crate::Progress) {
        let damaged = self.damaged();
        let mut names: Vec<Id> = self.indexed_packs.keys().copied().filter(|p| !damaged.contains(p)).collect();
        names.sort();
        if percent < 100 {
            // A random sample: the packs in an order keyed by a fresh secret, the first part kept.
            let mut key = [0u8; 32];
            getrandom::getrandom(&mut key).expect("the kernel's random source is available");
            names.sort_by_key(|pack| *blake3::keyed_hash(&key, &pack.0).as_bytes());
            let keep = (names.len() * usize::from(percent)).div_ceil(100);
            names.truncate(keep);
            names.sort();
        }
        let total: u64 = names.iter().filter_map(|p| self.packs.get(&p.to_hex())).sum();
        let readers = if self.repo.backend().is_remote() {
            self.repo.connections()
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        };
        let queue = std::sync::Mutex::new(names.into_iter());
        let done = std::sync::Mutex::new((0u64, std::collections::BTreeMap::new()));
        let (repo, index) = (self.repo, &self.index);
        std::thread::scope(|scope| {
            for _ in 0..readers {
                scope.spawn(|| loop {
                    let Some(pack) = queue.lock().expect("queue lock").next() else { break };
                    let verdict = match repo.backend().read(FileKind::Pack, &pack.to_hex()) {
                        Ok(bytes) => inspect_pack(repo, index, &pack, &bytes),
                        Err(error) => Verdict {
                            errors: vec![format!("pack {}: {error}", pack.short())],
                            lost: index.iter().filter(|(_, l)| l.pack == pack).map(|(id, _)| id).collect(),
                            damaged: true,
                            bytes: 0,
                        },
                    };
                    let mut done = done.lock().expect("done lock");
                    done.0 += verdict.bytes;
                    progress.bytes(done.0, total);
                    done.1.insert(pack, verdict);
                });
            }
        });
        for (pack, verdict) in done.into_inner().expect("done lock").1 {
            self.report.bytes_read += verdict.bytes;
            self.report.errors.extend(verdict.errors);
            self.missing_blobs.extend(verdict.lost);
            if verdict.damaged {
                self.report.damaged_packs.push(pack.to_hex());
            }
        }
    }

    /// Every version: its manifest readable, every tree readable, every data blob indexed and
    /// undamaged; the files and versions that cannot be restored whole.
    fn check_versions(&mut self) -> Result<()> {
        let mut damaged_files = BTreeSet::new();
        for (name, _) in self.repo.backend().list(FileKind::Version)? {
            self.report.versions += 1;
            let Some(id) = Id::from_hex(&name) else {
                self.report.errors.push(format!("versions/{name}: not a version name"));
                self.repair("sysstate repair versions");
                continue;
            };
            let version = match self.repo.read_version(&id) {
                Ok(version) => version,
                Err(error) => {
                    self.report.errors.push(format!("version {}: {error}", id.short()));
                    self.report.damaged_versions.push(id.short());
                    self.repair("sysstate repair versions");
                    continue;
                }
            };
            let broken = self.walk(&version.tree);
            if !broken.is_empty() {
                self.report.damaged_versions.push(id.short());
                for path in broken {
                    damaged_files.insert(format!("{}:{}", id.short(), path.display()));
                }
            }
        }
        self.report.damaged_files = damaged_files.into_iter().collect();
        Ok(())
    }

    /// Walks one version's trees (with an explicit stack: a crafted repository cannot overflow
    /// it, and a tree nested deeper than [`MAX_TREE_DEPTH`] is damage) and returns the paths
    /// that cannot be restored whole.
    fn walk(&mut self, root: &Id) -> Vec<PathBuf> {
        enum Step {
            Enter(Id, PathBuf, usize),
            /// A tree's walk is over: clean when nothing was broken since `before`.
            Leave(Id, usize),
        }
        let mut broken = Vec::new();
        let mut stack = vec![Step::Enter(*root, PathBuf::from("/"), 0)];
        while let Some(step) = stack.pop() {
            let (tree_id, path, depth) = match step {
                Step::Leave(tree_id, before) => {
                    if broken.len() == before {
                        self.clean_trees.insert(tree_id);
                    }
                    continue;
                }
                Step::Enter(tree_id, _, _) if self.clean_trees.contains(&tree_id) => continue,
                Step::Enter(tree_id, path, depth) => (tree_id, path, depth),
            };
            if depth > MAX_TREE_DEPTH {
                self.report.errors.push(too_deep(self.repo, at_path(&path)).to_string());
                broken.push(path);
                continue;
            }
            if !self.index.contains(&tree_id) || self.missing_blobs.contains(&tree_id) {
                self.absent += usize::from(!self.index.contains(&tree_id));
                self.report.errors.push(format!(
                    "tree {} of `{}` is missing or damaged",
                    tree_id.short(),
                    path.display()
                ));
                broken.push(path);
                continue;
            }
            let tree = match self.repo.read_tree(&tree_id) {
                Ok(tree) => tree,
                Err(error) => {
                    self.report.errors.push(format!("tree of `{}`: {error}", path.display()));
                    broken.push(path);
                    continue;
                }
            };
            stack.push(Step::Leave(tree_id, broken.len()));
            for node in tree.nodes {
                let child = path.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&node.name));
                match node.kind {
                    NodeKind::Dir { subtree } => stack.push(Step::Enter(subtree, child, depth + 1)),
                    NodeKind::File(content) => {
                        let index = &self.index;
                        if let Some(bad) =
                            content.blobs.iter().find(|b| !index.contains(b) || self.missing_blobs.contains(b))
                        {
                            if !index.contains(bad) {
                                self.absent += 1;
                                self.report.errors.push(format!(
                                    "`{}` needs blob {} which is not in the index",
                                    child.display(),
                                    bad.short()
                                ));
                            }
                            broken.push(child);
                        }
                    }
                    _ => {}
                }
            }
        }
        broken
    }

    /// Adds a repair to the advice, once.
    fn repair(&mut self, command: &str) {
        if !self.report.repairs.iter().any(|r| r == command) {
            self.report.repairs.push(command.to_string());
        }
    }

    fn into_report(mut self) -> CheckReport {
        // A pack in no index is a leftover of an interrupted backup, unless versions need blobs
        // that no index lists: then it may be what a lost index file listed.
        let lost_index = self.absent > 0 && !self.unindexed.is_empty();
        for name in std::mem::take(&mut self.unindexed) {
            self.report.warnings.push(if lost_index {
                format!("pack {name} is not in any index, and versions need blobs no index lists: `sysstate repair index` finds them again (do not prune before)")
            } else {
                format!("pack {name} is not in any index (left by an interrupted backup; `sysstate prune` removes it)")
            });
        }
        if lost_index {
            self.repair("sysstate repair index");
        }
        if !self.report.damaged_packs.is_empty() {
            self.repair("sysstate repair blobs");
        }
        if !self.report.damaged_files.is_empty() {
            self.repair(
                "sysstate backup (stores the damaged files' content again where this machine still has it; a version that still lacks data after it can be dropped with `sysstate forget --version ID`)",
            );
        }
        // Index first (the other repairs read it), then manifests, then packs, then a backup.
        let order = ["sysstate repair index", "sysstate repair versions", "sysstate repair blobs"];
        self.report.repairs.sort_by_key(|r| order.iter().position(|o| o == r).unwrap_or(order.len()));
        self.report.damaged_packs.sort();
        self.report.damaged_packs.dedup();
        self.report
    }
}

/// What reading one pack showed.
struct Verdict {
    errors: Vec<String>,
    /// Blobs a restore cannot read from it (those the index names in this pack).
    lost: Vec<Id>,
    damaged: bool,
    bytes: u64,
}

/// Checks one pack's bytes: its content against its name, its header, every blob.
fn inspect_pack(repo: &Repository, index: &Index, pack: &Id, bytes: &[u8]) -> Verdict {
    let mut verdict = Verdict { errors: Vec::new(), lost: Vec::new(), damaged: false, bytes: bytes.len() as u64 };
    if Id::of_stored(bytes) != *pack {
        verdict
            .errors
            .push(format!("pack {}: its content does not match its name (the file was changed)", pack.short()));
        verdict.damaged = true;
    }
    // The pack's own header lists its blobs; fall back to the index if it is unreadable.
    let entries = match read_header(repo.key(), bytes) {
        Ok(entries) => entries,
        Err(error) => {
            verdict.errors.push(format!("pack {}: {error}", pack.short()));
            verdict.damaged = true;
            index.iter().filter(|(_, l)| l.pack == *pack).map(|(_, l)| l.entry).collect()
        }
    };
    for entry in &entries {
        let start = entry.offset as usize;
        let end = start + entry.length as usize;
        let sound = bytes.get(start..end).is_some_and(|sealed| repo.open_blob(pack, entry, sealed).is_ok());
        if !sound {
            verdict.errors.push(format!("pack {}: blob {} is damaged", pack.short(), entry.id.short()));
            verdict.damaged = true;
            // Restore reads a blob from the first pack the index names: only then is a file
            // broken by this damage.
            if index.get(&entry.id).is_some_and(|l| l.pack == *pack) {
                verdict.lost.push(entry.id);
            }
        }
    }
    verdict
}
