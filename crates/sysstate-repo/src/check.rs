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
use crate::tree::NodeKind;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

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

/// Checks `repo`; with `read_data`, reads every pack.
pub fn check(repo: &Repository, read_data: bool, progress: &dyn crate::Progress) -> Result<CheckReport> {
    let mut checker = Checker::read_indexes(repo)?;
    checker.compare_packs()?;
    if read_data {
        checker.read_packs(progress);
    }
    checker.check_versions()?;
    Ok(checker.into_report())
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
                Err(error) => checker.report.errors.push(format!("index/{name}: {error}")),
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
                self.report.warnings.push(format!(
                    "pack {name} is not in any index (left by an interrupted backup; `sysstate prune` removes it)"
                ));
            }
        }
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
    /// header, and every blob decrypted and checked against its id.
    fn read_packs(&mut self, progress: &dyn crate::Progress) {
        let damaged = self.damaged();
        let total: u64 = self.indexed_packs.keys().filter_map(|p| self.packs.get(&p.to_hex())).sum();
        let mut done = 0u64;
        let mut names: Vec<Id> = self.indexed_packs.keys().copied().filter(|p| !damaged.contains(p)).collect();
        names.sort();
        for pack in names {
            let bytes = match self.repo.backend().read(FileKind::Pack, &pack.to_hex()) {
                Ok(bytes) => bytes,
                Err(error) => {
                    self.report.errors.push(format!("pack {}: {error}", pack.short()));
                    self.report.damaged_packs.push(pack.to_hex());
                    let lost = self.index.iter().filter(|(_, l)| l.pack == pack).map(|(id, _)| id);
                    self.missing_blobs.extend(lost.collect::<Vec<_>>());
                    continue;
                }
            };
            done += bytes.len() as u64;
            self.report.bytes_read += bytes.len() as u64;
            progress.bytes(done, total);
            if self.pack_damaged(&pack, &bytes) {
                self.report.damaged_packs.push(pack.to_hex());
            }
        }
    }

    /// Checks one pack's bytes; true when anything in it is damaged.
    fn pack_damaged(&mut self, pack: &Id, bytes: &[u8]) -> bool {
        let mut damaged = false;
        if Id::of_stored(bytes) != *pack {
            self.report
                .errors
                .push(format!("pack {}: its content does not match its name (the file was changed)", pack.short()));
            damaged = true;
        }
        // The pack's own header lists its blobs; fall back to the index if it is unreadable.
        let entries = match read_header(self.repo.key(), bytes) {
            Ok(entries) => entries,
            Err(error) => {
                self.report.errors.push(format!("pack {}: {error}", pack.short()));
                damaged = true;
                self.index.iter().filter(|(_, l)| l.pack == *pack).map(|(_, l)| l.entry).collect()
            }
        };
        for entry in &entries {
            let start = entry.offset as usize;
            let end = start + entry.length as usize;
            let sound = bytes.get(start..end).is_some_and(|sealed| self.repo.open_blob(pack, entry, sealed).is_ok());
            if !sound {
                self.report.errors.push(format!("pack {}: blob {} is damaged", pack.short(), entry.id.short()));
                damaged = true;
                // Restore reads a blob from the first pack the index names: only then is a
                // file broken by this damage.
                if self.index.get(&entry.id).is_some_and(|l| l.pack == *pack) {
                    self.missing_blobs.insert(entry.id);
                }
            }
        }
        damaged
    }

    /// Every version: its manifest readable, every tree readable, every data blob indexed and
    /// undamaged; the files and versions that cannot be restored whole.
    fn check_versions(&mut self) -> Result<()> {
        let mut checked_trees: HashSet<Id> = HashSet::new();
        let mut damaged_files = BTreeSet::new();
        for (name, _) in self.repo.backend().list(FileKind::Version)? {
            self.report.versions += 1;
            let Some(id) = Id::from_hex(&name) else {
                self.report.errors.push(format!("versions/{name}: not a version name"));
                continue;
            };
            let version = match self.repo.read_version(&id) {
                Ok(version) => version,
                Err(error) => {
                    self.report.errors.push(format!("version {}: {error}", id.short()));
                    self.report.damaged_versions.push(id.short());
                    continue;
                }
            };
            let mut broken = Vec::new();
            walk(
                self.repo,
                &self.index,
                &self.missing_blobs,
                &version.tree,
                Path::new("/"),
                &mut checked_trees,
                &mut broken,
                &mut self.report.errors,
            );
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

    fn into_report(mut self) -> CheckReport {
        self.report.damaged_packs.sort();
        self.report.damaged_packs.dedup();
        self.report
    }
}

#[allow(clippy::too_many_arguments)]
fn walk(
    repo: &Repository,
    index: &Index,
    missing: &HashSet<Id>,
    tree_id: &Id,
    path: &Path,
    seen: &mut HashSet<Id>,
    broken: &mut Vec<PathBuf>,
    errors: &mut Vec<String>,
) {
    // A tree seen clean before needs no second walk; a damaged one is walked again so every
    // version it breaks is named.
    if !index.contains(tree_id) || missing.contains(tree_id) {
        errors.push(format!("tree {} of `{}` is missing or damaged", tree_id.short(), path.display()));
        broken.push(path.to_path_buf());
        return;
    }
    let tree = match repo.read_tree(tree_id) {
        Ok(tree) => tree,
        Err(error) => {
            errors.push(format!("tree of `{}`: {error}", path.display()));
            broken.push(path.to_path_buf());
            return;
        }
    };
    let before = broken.len();
    for node in &tree.nodes {
        let child = path.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&node.name));
        match &node.kind {
            NodeKind::Dir { subtree } if !seen.contains(subtree) => {
                walk(repo, index, missing, subtree, &child, seen, broken, errors);
            }
            NodeKind::File(content) => {
                if let Some(bad) = content.blobs.iter().find(|b| !index.contains(b) || missing.contains(b)) {
                    if !index.contains(bad) {
                        errors.push(format!(
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
    if broken.len() == before {
        seen.insert(*tree_id);
    }
}
