//! Pack files: many sealed blobs followed by a sealed header that lists them, so the index can
//! be rebuilt from the packs alone.
//!
//! ```text
//! "SSPACK\0\x01" | blob 0 | blob 1 | … | sealed header | header length (u32 LE) | "SSPACK\0\x01"
//! ```

use crate::crypto::{Label, MasterKey};
use crate::id::Id;
use serde::{Deserialize, Serialize};

/// Magic at the start and the end of every pack (format version 1).
pub const PACK_MAGIC: &[u8; 8] = b"SSPACK\0\x01";
const TRAILER_LEN: usize = 4 + PACK_MAGIC.len();
/// A pack is closed once it holds this many bytes. Up to three are in memory during a backup
/// (one filling, two being written); at 16 MiB a first backup of the 1 GB benchmark tree
/// peaked at 162–175 MB, at 8 MiB at 121–138 MB, in the same time.
pub const PACK_TARGET_SIZE: usize = 8 * 1024 * 1024;

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlobKind {
    /// File content.
    Data,
    /// An encoded directory.
    Tree,
}

/// One blob's place in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    /// Data or tree.
    pub kind: BlobKind,
    /// Keyed BLAKE3 of the plaintext.
    pub id: Id,
    /// Offset of the sealed blob in the pack.
    pub offset: u32,
    /// Length of the sealed blob.
    pub length: u32,
    /// Length of the plaintext.
    pub raw_length: u32,
    /// True when the sealed bytes hold zstd-compressed plaintext.
    pub compressed: bool,
}

/// A pack being filled.
#[derive(Debug)]
pub struct PackBuilder {
    bytes: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl Default for PackBuilder {
    fn default() -> Self {
        // Room for the blobs and a header of a few thousand entries; a blob larger than the target
        // (up to the 8 MiB chunk maximum, sealed) grows it once.
        let mut bytes = Vec::with_capacity(PACK_TARGET_SIZE + 256 * 1024);
        bytes.extend_from_slice(PACK_MAGIC);
        PackBuilder { bytes, entries: Vec::new() }
    }
}

impl PackBuilder {
    /// Appends a sealed blob.
    pub fn add(&mut self, kind: BlobKind, id: Id, sealed: &[u8], raw_length: u32, compressed: bool) {
        let offset = self.bytes.len() as u32;
        self.bytes.extend_from_slice(sealed);
        self.entries.push(PackEntry { kind, id, offset, length: sealed.len() as u32, raw_length, compressed });
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True when no blob was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Seals the header and returns the pack's bytes, its name and its entries.
    pub fn finish(mut self, key: &MasterKey) -> (Id, Vec<u8>, Vec<PackEntry>) {
        let header = postcard::to_allocvec(&self.entries).expect("pack entries encode");
        let sealed = key.seal(Label::PackHeader, &header);
        self.bytes.extend_from_slice(&sealed);
        self.bytes.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(PACK_MAGIC);
        (Id::of_stored(&self.bytes), self.bytes, self.entries)
    }
}

/// Why a pack could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackError {
    /// Shorter than a trailer, or the magic is wrong.
    #[error("not a sysstate pack (bad magic or too short)")]
    NotAPack,
    /// The header length points outside the file.
    #[error("the header length {0} does not fit in the pack")]
    BadHeaderLength(u32),
    /// The header did not decrypt.
    #[error("the pack header does not decrypt: damaged, or another repository's key")]
    HeaderSeal,
    /// The header decrypted but does not decode, or lists blobs outside the pack.
    #[error("the pack header is malformed: {0}")]
    BadHeader(String),
}

/// Reads the entries of a whole pack's header.
pub fn read_header(key: &MasterKey, pack: &[u8]) -> Result<Vec<PackEntry>, PackError> {
    if pack.len() < PACK_MAGIC.len() + TRAILER_LEN || &pack[..8] != PACK_MAGIC {
        return Err(PackError::NotAPack);
    }
    let length = pack.len() as u64;
    let header_start = header_start(&pack[pack.len() - TRAILER_LEN..], length)?;
    open_header(key, &pack[header_start as usize..pack.len() - TRAILER_LEN], header_start)
}

/// The bytes at a pack's end that say where its header starts.
pub const TRAILER_LENGTH: usize = TRAILER_LEN;

/// Where the sealed header starts, from the pack's last [`TRAILER_LENGTH`] bytes and its length:
/// the header is the bytes from there up to the trailer. Lets a reader fetch only a pack's tail
/// (`sysstate repair index` reads no blob).
pub fn header_start(trailer: &[u8], pack_length: u64) -> Result<u64, PackError> {
    if trailer.len() != TRAILER_LEN
        || pack_length < (PACK_MAGIC.len() + TRAILER_LEN) as u64
        || &trailer[4..] != PACK_MAGIC
    {
        return Err(PackError::NotAPack);
    }
    let header_length = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
    (pack_length - TRAILER_LEN as u64)
        .checked_sub(u64::from(header_length))
        .filter(|start| *start >= PACK_MAGIC.len() as u64)
        .ok_or(PackError::BadHeaderLength(header_length))
}

/// Opens a sealed header that starts at `header_start`, and checks that every entry lies in the
/// blob area before it.
pub fn open_header(key: &MasterKey, sealed: &[u8], header_start: u64) -> Result<Vec<PackEntry>, PackError> {
    let header = key.open(Label::PackHeader, sealed).map_err(|_| PackError::HeaderSeal)?;
    let entries: Vec<PackEntry> = postcard::from_bytes(&header).map_err(|e| PackError::BadHeader(e.to_string()))?;
    for entry in &entries {
        let end = u64::from(entry.offset) + u64::from(entry.length);
        if (entry.offset as usize) < PACK_MAGIC.len() || end > header_start {
            return Err(PackError::BadHeader(format!("blob {} lies outside the pack's blob area", entry.id.short())));
        }
    }
    Ok(entries)
}

/// Decodes a pack header's plaintext (the fuzzing entry point for the header codec).
pub fn decode_header_plaintext(bytes: &[u8]) -> Result<Vec<PackEntry>, PackError> {
    postcard::from_bytes(bytes).map_err(|e| PackError::BadHeader(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn header_round_trips(blobs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20)) {
            let key = MasterKey::generate();
            let mut builder = PackBuilder::default();
            for blob in &blobs {
                let sealed = key.seal(Label::Blob, blob);
                builder.add(BlobKind::Data, key.blob_id(blob), &sealed, blob.len() as u32, false);
            }
            let (name, bytes, entries) = builder.finish(&key);
            prop_assert_eq!(name, Id::of_stored(&bytes));
            prop_assert_eq!(read_header(&key, &bytes).unwrap(), entries.clone());
            for (entry, blob) in entries.iter().zip(&blobs) {
                let sealed = &bytes[entry.offset as usize..(entry.offset + entry.length) as usize];
                prop_assert_eq!(&key.open(Label::Blob, sealed).unwrap(), blob);
            }
        }
    }

    #[test]
    fn damaged_packs_are_rejected() {
        let key = MasterKey::generate();
        let mut builder = PackBuilder::default();
        builder.add(BlobKind::Data, key.blob_id(b"x"), &key.seal(Label::Blob, b"x"), 1, false);
        let (_, bytes, _) = builder.finish(&key);
        assert_eq!(read_header(&key, &bytes[..10]), Err(PackError::NotAPack));
        let mut flipped = bytes.clone();
        let n = flipped.len();
        flipped[n - 20] ^= 1;
        assert_eq!(read_header(&key, &flipped), Err(PackError::HeaderSeal));
        let mut long = bytes.clone();
        long[n - 12..n - 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_header(&key, &long), Err(PackError::BadHeaderLength(_))));
        assert_eq!(read_header(&MasterKey::generate(), &bytes), Err(PackError::HeaderSeal));
    }
}
