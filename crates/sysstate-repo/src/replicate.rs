//! Replication (`sysstate copy`): versions from one repository to another. Blob ids are keyed per repository, so every
//! blob is re-identified under the destination's key and every tree is rewritten with the new
//! ids; blobs the destination already has are not stored again.

use crate::error::Result;
use crate::id::Id;
use crate::pack::BlobKind;
use crate::repo::Repository;
use crate::saver::BlobSaver;
use crate::tree::{too_deep, NodeKind, MAX_TREE_DEPTH};
use std::collections::HashMap;

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
