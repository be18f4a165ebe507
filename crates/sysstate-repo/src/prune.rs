//! `prune`: drop blobs no version needs. Takes an exclusive lease (a concurrent backup's packs
//! are not indexed yet and would look unused).
//!
//! Order, so that a crash at any point loses nothing: write the packs of blobs moved out of
//! partly used packs → write one index of everything kept, superseding the old index files →
//! delete the old index files → delete the packs no longer indexed.
//!
//! Memory: the index, plus the set of used blob ids (32 bytes and hash-set overhead each), plus
//! one pack being read and one being written.

use crate::backend::FileKind;
use crate::error::{RepoError, Result};
use crate::id::Id;
use crate::index::{IndexFile, IndexPack};
use crate::repo::Repository;
use crate::saver::BlobSaver;
use crate::tree::{too_deep, NodeKind, MAX_TREE_DEPTH};
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// What prune did.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PruneReport {
    /// Blobs still used.
    pub blobs_used: usize,
    /// Blobs dropped.
    pub blobs_dropped: usize,
    /// Packs deleted whole.
    pub packs_deleted: usize,
    /// Packs whose used blobs were moved to new packs.
    pub packs_repacked: usize,
    /// Pack files not in any index (left by interrupted backups), deleted.
    pub orphan_packs_deleted: usize,
    /// Temporary files of writes that never finished (`.tmp-*`, older than an hour), deleted.
    pub temporaries_deleted: usize,
    /// Bytes of pack files deleted.
    pub bytes_freed: u64,
    /// Bytes of new packs written.
    pub bytes_written: u64,
}

/// How old a temporary file (`.tmp-*`) must be for prune to delete it. Prune holds the
/// exclusive lease, so no writer of this repository is running; the grace covers a writer on
/// another host whose lease was taken for stale (30 minutes without a refresh).
pub const TEMPORARY_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Every blob reachable from the versions.
pub fn used_blobs(repo: &Repository) -> Result<HashSet<Id>> {
    let mut used = HashSet::new();
    let mut stack: Vec<(Id, usize)> = repo.versions()?.into_iter().map(|(_, v)| (v.tree, 0)).collect();
    while let Some((tree_id, depth)) = stack.pop() {
        if !used.insert(tree_id) {
            continue;
        }
        if depth > MAX_TREE_DEPTH {
            return Err(too_deep(repo, format!("tree {}", tree_id.short())));
        }
        if !repo.index().contains(&tree_id) {
            return Err(repo.corrupt(
                format!("tree {}", tree_id.short()),
                "a version needs it and no index lists it: run `sysstate repair index` before pruning",
            ));
        }
        for node in repo.read_tree(&tree_id)?.nodes {
            match node.kind {
                NodeKind::Dir { subtree } => stack.push((subtree, depth + 1)),
                NodeKind::File(content) => used.extend(content.blobs),
                _ => {}
            }
        }
    }
    Ok(used)
}

/// What prune will do, decided before anything is written: a dry run prints it, a real run
/// executes it ([`PrunePlan::execute`]).
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PrunePlan {
    /// Blobs still used.
    pub blobs_used: usize,
    /// Blobs no version needs.
    pub blobs_unused: usize,
    /// Packs whose every blob is used: kept as they are.
    #[serde(skip)]
    keep: Vec<IndexPack>,
    /// Packs with no used blob: deleted whole.
    pub delete: Vec<Id>,
    /// Packs with some used blobs: those are moved to new packs, then the pack is deleted.
    pub repack: Vec<Id>,
    #[serde(skip)]
    repack_entries: Vec<Vec<crate::pack::PackEntry>>,
    /// Pack files in no index (left by interrupted backups): deleted.
    pub orphans: Vec<String>,
    /// Temporary files of writes that never finished, older than [`TEMPORARY_GRACE`]: deleted.
    pub temporaries: Vec<String>,
    /// Bytes that deleting the packs frees (before the repacked blobs are written again).
    pub bytes_to_free: u64,
    /// Bytes of partly used packs to read.
    pub bytes_to_repack: u64,
    #[serde(skip)]
    old_index_files: Vec<Id>,
    #[serde(skip)]
    pack_sizes: HashMap<String, u64>,
}

/// Plans a prune of `repo` (exclusive lease held by the caller): which packs stay, go, or are
/// repacked. Reads the index and every tree; writes nothing.
pub fn plan(repo: &Repository) -> Result<PrunePlan> {
    let old_index_files = repo.load_index()?;
    let used = used_blobs(repo)?;
    // Damage first: a damaged index file hides packs that versions need, a damaged manifest
    // hides the blobs it names; pruning now would delete them.
    if let Some(damaged) = repo.damaged().into_iter().next() {
        return Err(RepoError::Corrupt {
            location: repo.location(),
            object: damaged.object,
            detail: format!("{}; prune would delete data it may name: run `{}` first", damaged.detail, damaged.repair),
        });
    }
    let pack_sizes: HashMap<String, u64> = repo.backend().list(FileKind::Pack)?.into_iter().collect();
    let mut plan = PrunePlan { old_index_files, ..PrunePlan::default() };

    let mut by_pack: HashMap<Id, Vec<crate::pack::PackEntry>> = HashMap::new();
    for (_, location) in repo.index().iter() {
        by_pack.entry(location.pack).or_default().push(location.entry);
    }
    let size_of = |pack: &Id| pack_sizes.get(&pack.to_hex()).copied().unwrap_or(0);
    for (pack, entries) in by_pack {
        let used_entries: Vec<_> = entries.iter().copied().filter(|e| used.contains(&e.id)).collect();
        plan.blobs_used += used_entries.len();
        plan.blobs_unused += entries.len() - used_entries.len();
        if used_entries.len() == entries.len() {
            plan.keep.push(IndexPack { pack, blobs: entries });
        } else if used_entries.is_empty() {
            plan.bytes_to_free += size_of(&pack);
            plan.delete.push(pack);
        } else {
            plan.bytes_to_free += size_of(&pack);
            plan.bytes_to_repack += size_of(&pack);
            plan.repack.push(pack);
            plan.repack_entries.push(used_entries);
        }
    }
    let indexed: HashSet<Id> = repo.index().iter().map(|(_, l)| l.pack).collect();
    for (name, size) in &pack_sizes {
        if !Id::from_hex(name).is_some_and(|id| indexed.contains(&id)) {
            plan.orphans.push(name.clone());
            plan.bytes_to_free += size;
        }
    }
    plan.orphans.sort();
    // Packs in no index may be what an index file that was lost listed: while a version needs
    // a blob the index lacks, they are not deleted.
    let absent = used.iter().filter(|id| !repo.index().contains(id)).count();
    if absent > 0 && !plan.orphans.is_empty() {
        return Err(RepoError::Corrupt {
            location: repo.location(),
            object: "index".into(),
            detail: format!(
                "versions need {absent} blobs that no index lists, and {} packs are in no index: they may hold them. Run `sysstate repair index` before pruning",
                plan.orphans.len()
            ),
        });
    }
    plan.pack_sizes = pack_sizes;
    plan.temporaries = repo.backend().clean_temporaries(TEMPORARY_GRACE, true)?;
    Ok(plan)
}

impl PrunePlan {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.repack.is_empty() && self.orphans.is_empty() && self.temporaries.is_empty()
    }

    /// Carries the plan out (exclusive lease still held); what it shows stays for the caller
    /// to print. `progress` is told the bytes of partly used packs read so far and in all.
    pub fn execute(&mut self, repo: &Repository, progress: &dyn crate::Progress) -> Result<PruneReport> {
        let mut report =
            PruneReport { blobs_used: self.blobs_used, blobs_dropped: self.blobs_unused, ..PruneReport::default() };
        // Move used blobs out of partly used packs, without re-sealing them (after checking them).
        let saver = BlobSaver::new(repo);
        let mut moved: HashSet<Id> = HashSet::new();
        let mut repack_done = 0u64;
        for (pack, entries) in self.repack.iter().zip(&self.repack_entries) {
            let bytes = repo.backend().read(FileKind::Pack, &pack.to_hex())?;
            repack_done += bytes.len() as u64;
            progress.bytes(repack_done, self.bytes_to_repack);
            for entry in entries {
                if !moved.insert(entry.id) {
                    continue;
                }
                let sealed = bytes
                    .get(entry.offset as usize..(entry.offset + entry.length) as usize)
                    .ok_or_else(|| repo.corrupt(format!("pack {}", pack.short()), "shorter than its index says"))?;
                repo.open_blob(pack, entry, sealed)?;
                saver.add_sealed(entry.kind, entry.id, sealed, entry.raw_length, entry.compressed)?;
            }
            report.packs_repacked += 1;
        }
        // The saver writes the moved blobs' packs and their own index file; the kept packs go in
        // a second index file that supersedes every old one.
        saver.finish()?;
        report.bytes_written = saver.stats.stored_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let kept_file = IndexFile { packs: std::mem::take(&mut self.keep), supersedes: self.old_index_files.clone() };
        let bytes = kept_file.encode(repo.key());
        let kept_name = Id::of_stored(&bytes);
        repo.backend().write(FileKind::Index, &kept_name.to_hex(), &bytes)?;
        for name in &self.old_index_files {
            if *name != kept_name {
                repo.backend().remove(FileKind::Index, &name.to_hex())?;
            }
        }
        let size_of = |name: &str| self.pack_sizes.get(name).copied().unwrap_or(0);
        for name in &self.orphans {
            report.orphan_packs_deleted += 1;
            report.bytes_freed += size_of(name);
            repo.backend().remove(FileKind::Pack, name)?;
        }
        report.temporaries_deleted = repo.backend().clean_temporaries(TEMPORARY_GRACE, false)?.len();
        report.packs_deleted = self.delete.len();
        for pack in self.delete.iter().chain(&self.repack) {
            report.bytes_freed += size_of(&pack.to_hex());
            repo.backend().remove(FileKind::Pack, &pack.to_hex())?;
        }
        Ok(report)
    }
}

/// Prunes `repo` (exclusive lease held by the caller): [`plan`], then [`PrunePlan::execute`].
pub fn prune(repo: &Repository, progress: &dyn crate::Progress) -> Result<PruneReport> {
    plan(repo)?.execute(repo, progress)
}
