//! Index files (which blob is in which pack) and the in-memory index built from them.
//!
//! ```text
//! "SSINDEX\x01" | sealed(postcard(IndexFile))
//! ```

use crate::crypto::{Label, MasterKey};
use crate::id::Id;
use crate::pack::{BlobKind, PackEntry};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Magic of index files (format version 1).
pub const INDEX_MAGIC: &[u8; 8] = b"SSINDEX\x01";

/// One pack and its blobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexPack {
    /// The pack's name.
    pub pack: Id,
    /// Its blobs, as in its header.
    pub blobs: Vec<PackEntry>,
}

/// The decoded content of one index file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexFile {
    /// Packs described here.
    pub packs: Vec<IndexPack>,
    /// Index files this one replaces (written by prune; the replaced ones are deleted after).
    pub supersedes: Vec<Id>,
}

/// Why an index file could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    /// Wrong magic.
    #[error("not a sysstate index file (bad magic)")]
    NotAnIndex,
    /// Did not decrypt.
    #[error("the index file does not decrypt: damaged, or another repository's key")]
    Seal,
    /// Decrypted but does not decode.
    #[error("the index file is malformed: {0}")]
    Malformed(String),
}

impl IndexFile {
    /// Seals and frames it.
    pub fn encode(&self, key: &MasterKey) -> Vec<u8> {
        let plain = postcard::to_allocvec(self).expect("index encodes");
        let mut out = INDEX_MAGIC.to_vec();
        out.extend_from_slice(&key.seal(Label::Index, &plain));
        out
    }

    /// Opens and decodes it.
    pub fn decode(key: &MasterKey, bytes: &[u8]) -> Result<IndexFile, IndexError> {
        let body = bytes.strip_prefix(INDEX_MAGIC.as_slice()).ok_or(IndexError::NotAnIndex)?;
        let plain = key.open(Label::Index, body).map_err(|_| IndexError::Seal)?;
        IndexFile::decode_plaintext(&plain)
    }

    /// Decodes the plaintext (the fuzzing entry point).
    pub fn decode_plaintext(plain: &[u8]) -> Result<IndexFile, IndexError> {
        postcard::from_bytes(plain).map_err(|e| IndexError::Malformed(e.to_string()))
    }
}

/// Where a blob is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    /// The pack's name.
    pub pack: Id,
    /// The entry in its header.
    pub entry: PackEntry,
}

/// The in-memory index: blob id → location. A blob costs its id and 20 bytes (the pack as a
/// number into a table of packs), about 60 bytes with the hash table's room: 500,000 blobs take
/// about 53 MB where a map to whole [`BlobLocation`]s (the pack's name and the entry, its id
/// again) took 118 MB.
#[derive(Debug, Default, Clone)]
pub struct Index {
    packs: Vec<Id>,
    pack_numbers: HashMap<Id, u32>,
    blobs: HashMap<Id, Slot>,
}

/// A blob's location, compact: see [`Index`].
#[derive(Debug, Clone, Copy)]
struct Slot {
    pack: u32,
    offset: u32,
    length: u32,
    raw_length: u32,
    tree: bool,
    compressed: bool,
}

impl Index {
    /// Adds a pack's blobs (a blob already indexed keeps its first location).
    pub fn add_pack(&mut self, pack: &IndexPack) {
        let number = *self.pack_numbers.entry(pack.pack).or_insert_with(|| {
            self.packs.push(pack.pack);
            (self.packs.len() - 1) as u32
        });
        self.blobs.reserve(pack.blobs.len());
        for entry in &pack.blobs {
            self.blobs.entry(entry.id).or_insert(Slot {
                pack: number,
                offset: entry.offset,
                length: entry.length,
                raw_length: entry.raw_length,
                tree: entry.kind == BlobKind::Tree,
                compressed: entry.compressed,
            });
        }
    }

    fn location(&self, id: &Id, slot: &Slot) -> BlobLocation {
        BlobLocation {
            pack: self.packs[slot.pack as usize],
            entry: PackEntry {
                kind: if slot.tree { BlobKind::Tree } else { BlobKind::Data },
                id: *id,
                offset: slot.offset,
                length: slot.length,
                raw_length: slot.raw_length,
                compressed: slot.compressed,
            },
        }
    }

    /// Where a blob is.
    pub fn get(&self, id: &Id) -> Option<BlobLocation> {
        self.blobs.get(id).map(|slot| self.location(id, slot))
    }

    /// True when the blob is indexed.
    pub fn contains(&self, id: &Id) -> bool {
        self.blobs.contains_key(id)
    }

    /// How many blobs are indexed.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    /// True when no blob is indexed.
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// The packs that hold at least one tree.
    pub fn tree_packs(&self) -> std::collections::HashSet<Id> {
        self.blobs.values().filter(|slot| slot.tree).map(|slot| self.packs[slot.pack as usize]).collect()
    }

    /// Every blob and its location, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (Id, BlobLocation)> + '_ {
        self.blobs.iter().map(|(id, slot)| (*id, self.location(id, slot)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry() -> impl Strategy<Value = PackEntry> {
        (any::<[u8; 32]>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<bool>(), any::<bool>()).prop_map(
            |(id, offset, length, raw_length, compressed, tree)| PackEntry {
                kind: if tree { BlobKind::Tree } else { BlobKind::Data },
                id: Id(id),
                offset,
                length,
                raw_length,
                compressed,
            },
        )
    }

    #[test]
    fn the_index_gives_back_every_field_and_keeps_a_blobs_first_location() {
        let blob = |id: u8, offset, tree| PackEntry {
            kind: if tree { BlobKind::Tree } else { BlobKind::Data },
            id: Id([id; 32]),
            offset,
            length: 100 + offset,
            raw_length: 300 + offset,
            compressed: tree,
        };
        let (first, second) = (Id([0xaa; 32]), Id([0xbb; 32]));
        let mut index = Index::default();
        index.add_pack(&IndexPack { pack: first, blobs: vec![blob(1, 8, false), blob(2, 200, true)] });
        index.add_pack(&IndexPack { pack: second, blobs: vec![blob(2, 8, false), blob(3, 40, false)] });
        assert_eq!(index.len(), 3);
        assert_eq!(index.get(&Id([2; 32])), Some(BlobLocation { pack: first, entry: blob(2, 200, true) }));
        assert_eq!(index.get(&Id([3; 32])), Some(BlobLocation { pack: second, entry: blob(3, 40, false) }));
        assert_eq!(index.get(&Id([4; 32])), None);
        let mut all: Vec<(Id, BlobLocation)> = index.iter().collect();
        all.sort_by_key(|(id, _)| *id);
        assert_eq!(all[0], (Id([1; 32]), BlobLocation { pack: first, entry: blob(1, 8, false) }));
    }

    proptest! {
        #[test]
        fn index_files_round_trip(packs in proptest::collection::vec((any::<[u8; 32]>(), proptest::collection::vec(entry(), 0..10)), 0..10)) {
            let key = MasterKey::generate();
            let file = IndexFile {
                packs: packs.into_iter().map(|(pack, blobs)| IndexPack { pack: Id(pack), blobs }).collect(),
                supersedes: vec![Id::random()],
            };
            let bytes = file.encode(&key);
            prop_assert_eq!(IndexFile::decode(&key, &bytes).unwrap(), file);
            prop_assert_eq!(IndexFile::decode(&MasterKey::generate(), &bytes), Err(IndexError::Seal));
        }
    }
}
