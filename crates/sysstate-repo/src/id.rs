//! 32-byte identifiers of blobs, packs, index files and versions.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A 32-byte id. Blob ids are keyed BLAKE3 hashes of the plaintext; the names of packs, index
/// files and versions are plain BLAKE3 hashes of the stored (encrypted) bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Id(pub [u8; 32]);

impl Id {
    /// The plain BLAKE3 hash of `data`: the storage name of a file.
    pub fn of_stored(data: &[u8]) -> Id {
        Id(*blake3::hash(data).as_bytes())
    }

    /// A random id (lock and key file names).
    pub fn random() -> Id {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes).expect("the kernel's random source is available");
        Id(bytes)
    }

    /// Full lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 hex digits, as shown to people.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Id> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Id(bytes))
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
