//! Replication (`sysstate copy`, the agent's to its vault): versions from one repository to
//! another.
//!
//! Between repositories of one key (a vault's, and the local repositories made from it — see
//! [`Repository::init_like`]) a version's packs are sent as they are: nothing is opened or sealed
//! again, a pack the destination has already (from a replication that was stopped) is not sent
//! again, and only where a pack holds blobs the destination has (another host's) are the
//! missing blobs' sealed bytes packed anew. The manifest is sent as it is, so the version keeps
//! its id. Between repositories of different keys, blob ids are keyed per repository, so every
//! blob is re-identified under the destination's key and every tree rewritten with the new ids;
//! blobs the destination already has are not stored again.

use crate::backend::FileKind;
use crate::error::Result;
use crate::id::Id;
use crate::pack::BlobKind;
use crate::repo::Repository;
use crate::saver::BlobSaver;
use crate::tree::{too_deep, NodeKind, MAX_TREE_DEPTH};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, HashSet};

/// True when `to` holds the same key as `from` (one made from the other): packs can go as they
/// are.
pub fn same_key(from: &Repository, to: &Repository) -> bool {
    from.config().id == to.config().id && from.key().bytes() == to.key().bytes()
}

/// What a replication of packs as they are sent.
#[derive(Debug, Default, Clone, Copy, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PackStats {
    /// Packs sent whole.
    pub packs_sent: u64,
    /// Packs the destination had already (indexed now), not sent again.
    pub packs_there: u64,
    /// Blobs whose sealed bytes were packed anew (their packs held blobs the destination has).
    pub blobs_repacked: u64,
    /// Bytes of whole packs sent.
    pub bytes_sent: u64,
}

/// Sends versions of `from` to a repository of the same key ([`same_key`]) through a saver on
/// it, packs as they are. One per replication: a tree sent for one version is not walked again
/// for the next. The caller finishes the saver, then sends the manifests ([`send_manifest`]).
#[derive(Debug)]
pub struct PackSender<'a> {
    from: &'a Repository,
    /// The packs the destination has.
    there: HashSet<Id>,
    /// Every blob the versions sent so far need (their trees walked).
    walked: HashSet<Id>,
    /// What went.
    pub stats: PackStats,
}

impl<'a> PackSender<'a> {
    /// A sender from `from` to a destination that has the packs `there`.
    pub fn new(from: &'a Repository, there: HashSet<Id>) -> PackSender<'a> {
        PackSender { from, there, walked: HashSet::new(), stats: PackStats::default() }
    }

    /// Sends what version `id` needs and the destination lacks through `saver`.
    pub fn send(&mut self, saver: &BlobSaver<'_>, id: &Id) -> Result<()> {
        let from = self.from;
        let version = from.read_version(id)?;
        // Every blob the version needs that no version sent before did: its trees, walked here
        // (the key is ours), and their files'.
        let mut needed: HashSet<Id> = HashSet::new();
        let mut walk = vec![(version.tree, 0usize)];
        while let Some((tree_id, depth)) = walk.pop() {
            if depth > MAX_TREE_DEPTH {
                return Err(too_deep(from, format!("tree {}", tree_id.short())));
            }
            if !self.walked.insert(tree_id) {
                continue;
            }
            needed.insert(tree_id);
            for node in from.read_tree(&tree_id)?.nodes {
                match node.kind {
                    NodeKind::Dir { subtree } => walk.push((subtree, depth + 1)),
                    NodeKind::File(content) => needed.extend(content.blobs),
                    _ => {}
                }
            }
        }
        self.send_blobs(saver, &needed)
    }

    fn send_blobs(&mut self, saver: &BlobSaver<'_>, needed: &HashSet<Id>) -> Result<()> {
        let (from, stats, there) = (self.from, &mut self.stats, &self.there);
        let mut packs = BTreeSet::new();
        {
            let index = from.index();
            for blob in needed {
                if saver.has(blob) {
                    continue;
                }
                let location = index.get(blob).ok_or_else(|| {
                    from.corrupt(format!("blob {}", blob.short()), "no pack holds it (the index lacks it)")
                })?;
                packs.insert(location.pack);
            }
        }
        for pack in packs {
            let bytes = from.backend().read(FileKind::Pack, &pack.to_hex())?;
            if Id::of_stored(&bytes) != pack {
                return Err(from.corrupt(format!("pack {}", pack.short()), "its bytes do not match its name"));
            }
            let entries = crate::pack::read_header(from.key(), &bytes)
                .map_err(|e| from.corrupt(format!("pack {}", pack.short()), e))?;
            if entries.iter().all(|entry| !saver.has(&entry.id)) {
                // Nothing of it is there: the pack goes as it is (or only into the index, when a
                // stopped replication sent it).
                if there.contains(&pack) {
                    stats.packs_there += 1;
                    saver.add_pack(pack, None, entries)?;
                } else {
                    stats.packs_sent += 1;
                    stats.bytes_sent += bytes.len() as u64;
                    saver.add_pack(pack, Some(bytes), entries)?;
                }
                continue;
            }
            for entry in entries {
                if !needed.contains(&entry.id) || !saver.reserve(entry.id) {
                    continue;
                }
                let (start, end) = (entry.offset as usize, entry.offset as usize + entry.length as usize);
                let sealed = bytes
                    .get(start..end)
                    .ok_or_else(|| from.corrupt(format!("pack {}", pack.short()), "a blob lies outside the pack"))?;
                saver.add_sealed(entry.kind, entry.id, sealed, entry.raw_length, entry.compressed)?;
                stats.blobs_repacked += 1;
            }
        }
        Ok(())
    }
}

/// Sends version `id`'s manifest from `from` to `to` as it is (same key): it keeps its id.
pub fn send_manifest(from: &Repository, to: &Repository, id: &Id) -> Result<()> {
    let name = id.to_hex();
    let bytes = from.backend().read(FileKind::Version, &name)?;
    Ok(to.backend().write(FileKind::Version, &name, &bytes)?)
}

/// Replicates version `id` of `from` into `to` (both with loaded indexes); returns the new id.
pub fn replicate_version(from: &Repository, to: &Repository, id: &Id) -> Result<Id> {
    let version = from.read_version(id)?;
    let saver = BlobSaver::new(to);
    let mut mapped: HashMap<Id, Id> = HashMap::new();
    let tree = replicate_tree(from, to, &saver, &version.tree, &mut mapped, 0)?;
    saver.finish()?;
    let mut copied = version;
    copied.tree = tree;
    copied.parent = None;
    to.save_version(&copied)
}

fn replicate_blob(
    from: &Repository,
    to: &Repository,
    saver: &BlobSaver<'_>,
    kind: BlobKind,
    id: &Id,
    mapped: &mut HashMap<Id, Id>,
) -> Result<Id> {
    if let Some(new) = mapped.get(id) {
        return Ok(*new);
    }
    let data = from.read_blob(id)?;
    let new = to.key().blob_id(&data);
    if saver.reserve(new) {
        saver.store(kind, new, &data)?;
    }
    mapped.insert(*id, new);
    Ok(new)
}

fn replicate_tree(
    from: &Repository,
    to: &Repository,
    saver: &BlobSaver<'_>,
    id: &Id,
    mapped: &mut HashMap<Id, Id>,
    depth: usize,
) -> Result<Id> {
    if let Some(new) = mapped.get(id) {
        return Ok(*new);
    }
    // Recursion, bounded: a crafted tree deeper than the limit is damage.
    if depth > MAX_TREE_DEPTH {
        return Err(too_deep(from, format!("tree {}", id.short())));
    }
    let mut tree = from.read_tree(id)?;
    for node in &mut tree.nodes {
        match &mut node.kind {
            NodeKind::Dir { subtree } => *subtree = replicate_tree(from, to, saver, subtree, mapped, depth + 1)?,
            NodeKind::File(content) => {
                for blob in &mut content.blobs {
                    *blob = replicate_blob(from, to, saver, BlobKind::Data, blob, mapped)?;
                }
            }
            _ => {}
        }
    }
    let bytes = tree.encode();
    let new = to.key().blob_id(&bytes);
    if saver.reserve(new) {
        saver.store(BlobKind::Tree, new, &bytes)?;
    }
    mapped.insert(*id, new);
    Ok(new)
}
