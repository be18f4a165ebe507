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
    let mut report = CheckReport::default();
    let mut index = Index::default();
    // Every pack an index file lists, with the end of its furthest blob. Taken from the files,
    // not from the blob map: concurrent backups may store one blob twice, and a pack that holds
    // only such duplicates is indexed all the same.
    let mut indexed_packs: HashMap<Id, u64> = HashMap::new();
    for (name, _) in repo.backend().list(FileKind::Index)? {
        match repo.read_index_file(&name) {
            Ok(file) => {
                for pack in &file.packs {
                    index.add_pack(pack);
                    let end = pack.blobs.iter().map(|b| u64::from(b.offset) + u64::from(b.length)).max().unwrap_or(0);
                    let furthest = indexed_packs.entry(pack.pack).or_default();
                    *furthest = (*furthest).max(end);
                }
            }
            Err(error) => report.errors.push(format!("index/{name}: {error}")),
        }
    }
    report.blobs = index.len();
    let packs: HashMap<String, u64> = repo.backend().list(FileKind::Pack)?.into_iter().collect();
    report.packs = packs.len();
    // Index entries must point into existing packs, within their size.
    let mut missing_blobs: HashSet<Id> = HashSet::new();
    for (pack, end) in &indexed_packs {
        match packs.get(&pack.to_hex()) {
            None => {
                report.errors.push(format!("pack {} is in the index but missing from `data/`", pack.short()));
                report.damaged_packs.push(pack.to_hex());
            }
            Some(size) if *size < *end => {
                report.errors.push(format!("pack {} is truncated: {size} bytes, the index needs {end}", pack.short()));
                report.damaged_packs.push(pack.to_hex());
            }
            Some(_) => {}
        }
    }
    for name in packs.keys() {
        if Id::from_hex(name).is_none_or(|id| !indexed_packs.contains_key(&id)) {
            report.warnings.push(format!(
                "pack {name} is not in any index (left by an interrupted backup; `sysstate prune` removes it)"
            ));
        }
    }
    let damaged: HashSet<Id> = report.damaged_packs.iter().filter_map(|p| Id::from_hex(p)).collect();
    for (id, location) in index.iter() {
        if damaged.contains(&location.pack) {
            missing_blobs.insert(id);
        }
    }

    if read_data {
        let total: u64 = indexed_packs.keys().filter_map(|p| packs.get(&p.to_hex())).sum();
        let mut done = 0u64;
        let mut names: Vec<&Id> = indexed_packs.keys().collect();
        names.sort();
        for pack in names {
            if damaged.contains(pack) {
                continue;
            }
            let bytes = match repo.backend().read(FileKind::Pack, &pack.to_hex()) {
                Ok(bytes) => bytes,
                Err(error) => {
                    report.errors.push(format!("pack {}: {error}", pack.short()));
                    report.damaged_packs.push(pack.to_hex());
                    index.iter().filter(|(_, l)| l.pack == *pack).for_each(|(id, _)| {
                        missing_blobs.insert(id);
                    });
                    continue;
                }
            };
            done += bytes.len() as u64;
            report.bytes_read += bytes.len() as u64;
            progress.bytes(done, total);
            let mut pack_damaged = false;
            if Id::of_stored(&bytes) != *pack {
                report
                    .errors
                    .push(format!("pack {}: its content does not match its name (the file was changed)", pack.short()));
                pack_damaged = true;
            }
            // The pack's own header lists its blobs; fall back to the index if it is unreadable.
            let entries = match read_header(repo.key(), &bytes) {
                Ok(entries) => entries,
                Err(error) => {
                    report.errors.push(format!("pack {}: {error}", pack.short()));
                    pack_damaged = true;
                    index.iter().filter(|(_, l)| l.pack == *pack).map(|(_, l)| l.entry).collect()
                }
            };
            for entry in &entries {
                let start = entry.offset as usize;
                let end = start + entry.length as usize;
                let sound = bytes.get(start..end).is_some_and(|sealed| repo.open_blob(pack, entry, sealed).is_ok());
                if !sound {
                    report.errors.push(format!("pack {}: blob {} is damaged", pack.short(), entry.id.short()));
                    pack_damaged = true;
                    // Restore reads a blob from the first pack the index names: only then is a
                    // file broken by this damage.
                    if index.get(&entry.id).is_some_and(|l| l.pack == *pack) {
                        missing_blobs.insert(entry.id);
                    }
                }
            }
            if pack_damaged {
                report.damaged_packs.push(pack.to_hex());
            }
        }
    }

    // Every version: every tree readable, every data blob indexed and undamaged.
    let mut checked_trees: HashSet<Id> = HashSet::new();
    let mut damaged_files = BTreeSet::new();
    for (name, _) in repo.backend().list(FileKind::Version)? {
        report.versions += 1;
        let Some(id) = Id::from_hex(&name) else {
            report.errors.push(format!("versions/{name}: not a version name"));
            continue;
        };
        let version = match repo.read_version(&id) {
            Ok(version) => version,
            Err(error) => {
                report.errors.push(format!("version {}: {error}", id.short()));
                report.damaged_versions.push(id.short());
                continue;
            }
        };
        let mut broken = Vec::new();
        walk(
            repo,
            &index,
            &missing_blobs,
            &version.tree,
            Path::new("/"),
            &mut checked_trees,
            &mut broken,
            &mut report.errors,
        );
        if !broken.is_empty() {
            report.damaged_versions.push(id.short());
            for path in broken {
                damaged_files.insert(format!("{}:{}", id.short(), path.display()));
            }
        }
    }
    report.damaged_files = damaged_files.into_iter().collect();
    report.damaged_packs.sort();
    report.damaged_packs.dedup();
    Ok(report)
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
