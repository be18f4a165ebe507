//! Index files (which blob is in which pack) and the in-memory index built from them.
//!
//! ```text
//! "SSINDEX\x01" | sealed(postcard(IndexFile))
//! ```

use crate::crypto::{Label, MasterKey};
use crate::id::Id;
use crate::pack::PackEntry;
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

/// The in-memory index: blob id → location. About 100 bytes per blob.
#[derive(Debug, Default)]
pub struct Index {
    blobs: HashMap<Id, BlobLocation>,
}

impl Index {
    /// Adds every blob of a pack (a blob seen twice keeps its first location).
    pub fn add_pack(&mut self, pack: &IndexPack) {
        for entry in &pack.blobs {
            self.blobs.entry(entry.id).or_insert(BlobLocation { pack: pack.pack, entry: *entry });
        }
    }

    /// Where `id` is.
    pub fn get(&self, id: &Id) -> Option<&BlobLocation> {
        self.blobs.get(id)
    }

    /// True when `id` is stored.
    pub fn contains(&self, id: &Id) -> bool {
        self.blobs.contains_key(id)
    }

    /// Number of blobs.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// All blobs.
    pub fn iter(&self) -> impl Iterator<Item = (&Id, &BlobLocation)> {
        self.blobs.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::BlobKind;
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
