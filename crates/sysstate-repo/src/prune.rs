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
use crate::error::Result;
use crate::id::Id;
use crate::index::{IndexFile, IndexPack};
use crate::repo::Repository;
use crate::saver::BlobSaver;
use crate::tree::NodeKind;
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
    /// Bytes of pack files deleted.
    pub bytes_freed: u64,
    /// Bytes of new packs written.
    pub bytes_written: u64,
}

/// Every blob reachable from the versions.
pub fn used_blobs(repo: &Repository) -> Result<HashSet<Id>> {
    let mut used = HashSet::new();
    let mut stack: Vec<Id> = repo.versions()?.into_iter().map(|(_, v)| v.tree).collect();
    while let Some(tree_id) = stack.pop() {
        if !used.insert(tree_id) {
            continue;
        }
        for node in repo.read_tree(&tree_id)?.nodes {
            match node.kind {
                NodeKind::Dir { subtree } => stack.push(subtree),
                NodeKind::File(content) => used.extend(content.blobs),
                _ => {}
            }
        }
    }
    Ok(used)
}

/// Prunes `repo` (index loaded, exclusive lease held by the caller). `progress` is told the
/// bytes of partly used packs read so far and in all.
pub fn prune(repo: &Repository, progress: &dyn Fn(u64, u64)) -> Result<PruneReport> {
    let mut report = PruneReport::default();
    let old_index_files = repo.load_index()?;
    let used = used_blobs(repo)?;
    let pack_sizes: HashMap<String, u64> = repo.backend().list(FileKind::Pack)?.into_iter().collect();

    // Group the index by pack.
    let mut by_pack: HashMap<Id, Vec<crate::pack::PackEntry>> = HashMap::new();
    for (_, location) in repo.index().iter() {
        by_pack.entry(location.pack).or_default().push(location.entry);
    }
    let mut keep: Vec<IndexPack> = Vec::new();
    let mut delete: Vec<Id> = Vec::new();
    let mut repack: Vec<(Id, Vec<crate::pack::PackEntry>)> = Vec::new();
    for (pack, entries) in by_pack {
        let used_entries: Vec<_> = entries.iter().copied().filter(|e| used.contains(&e.id)).collect();
        report.blobs_used += used_entries.len();
        report.blobs_dropped += entries.len() - used_entries.len();
        if used_entries.len() == entries.len() {
            keep.push(IndexPack { pack, blobs: entries });
        } else if used_entries.is_empty() {
            delete.push(pack);
        } else {
            repack.push((pack, used_entries));
        }
    }

    // Move used blobs out of partly used packs, without re-sealing them (after checking them).
    let saver = BlobSaver::new(repo);
    let mut moved: HashSet<Id> = HashSet::new();
    let repack_total: u64 = repack.iter().filter_map(|(pack, _)| pack_sizes.get(&pack.to_hex())).sum();
    let mut repack_done = 0u64;
    for (pack, entries) in &repack {
        let bytes = repo.backend().read(FileKind::Pack, &pack.to_hex())?;
        repack_done += bytes.len() as u64;
        progress(repack_done, repack_total);
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
    // The saver writes the moved blobs' packs and their own index file; the kept packs go in a
    // second index file that supersedes every old one.
    saver.finish()?;
    report.bytes_written = saver.stats.stored_bytes.load(std::sync::atomic::Ordering::Relaxed);
    let kept_file = IndexFile { packs: keep, supersedes: old_index_files.clone() };
    let bytes = kept_file.encode(repo.key());
    let kept_name = Id::of_stored(&bytes);
    repo.backend().write(FileKind::Index, &kept_name.to_hex(), &bytes)?;
    for name in &old_index_files {
        if *name != kept_name {
            repo.backend().remove(FileKind::Index, &name.to_hex())?;
        }
    }
    // Packs in no index at all were left by interrupted backups.
    repo.load_index()?;
    let indexed: HashSet<Id> = repo.index().iter().map(|(_, l)| l.pack).collect();
    for name in pack_sizes.keys() {
        match Id::from_hex(name) {
            Some(id) if indexed.contains(&id) => {}
            Some(id) if delete.contains(&id) || repack.iter().any(|(p, _)| *p == id) => {}
            _ => {
                report.orphan_packs_deleted += 1;
                report.bytes_freed += pack_sizes[name];
                repo.backend().remove(FileKind::Pack, name)?;
            }
        }
    }
    report.packs_deleted = delete.len();
    for pack in delete.iter().chain(repack.iter().map(|(p, _)| p)) {
        report.bytes_freed += pack_sizes.get(&pack.to_hex()).copied().unwrap_or(0);
        repo.backend().remove(FileKind::Pack, &pack.to_hex())?;
    }
    Ok(report)
}
