//! Keys and authenticated encryption.
//!
//! One random 32-byte master key per repository. From it, BLAKE3's key derivation gives the
//! encryption key, the blob-id key and the chunker seed, so none of them can be computed without
//! the master key. Every object is sealed with XChaCha20-Poly1305 under a fresh random 192-bit
//! nonce (FORMAT.md explains why random nonces are safe at this size) and an associated-data label
//! that names the kind of object, so a blob cannot be passed off as an index or a manifest.

use crate::id::Id;
use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// Bytes added to every sealed object: the nonce in front, the tag behind.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
pub const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// What a sealed object is; bound into the AEAD so objects cannot be swapped between roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// A data or tree blob inside a pack.
    Blob,
    /// The header at the end of a pack.
    PackHeader,
    /// An index file.
    Index,
    /// A version manifest.
    Version,
    /// The master key wrapped under a passphrase.
    KeyWrap,
}

impl Label {
    fn aad(self) -> &'static [u8] {
        match self {
            Label::Blob => b"sysstate blob v1",
            Label::PackHeader => b"sysstate pack header v1",
            Label::Index => b"sysstate index v1",
            Label::Version => b"sysstate version v1",
            Label::KeyWrap => b"sysstate key wrap v1",
        }
    }
}

/// Failure to open a sealed object: the key is wrong or the bytes were changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenError;

/// Seals `plaintext` under `key`: `nonce || ciphertext || tag`.
pub fn seal(key: &[u8; 32], label: Label, plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
    out.resize(NONCE_LEN, 0);
    out.extend_from_slice(plaintext);
    seal_in_place(key, label, &mut out);
    out
}

/// [`seal`] without allocating: `buffer` holds [`NONCE_LEN`] bytes of room followed by the
/// plaintext, and is left holding what [`seal`] returns for that plaintext.
pub fn seal_in_place(key: &[u8; 32], label: Label, buffer: &mut Vec<u8>) {
    assert!(buffer.len() >= NONCE_LEN, "no room for the nonce");
    let (nonce, body) = buffer.split_at_mut(NONCE_LEN);
    getrandom::getrandom(nonce).expect("the kernel's random source is available");
    let tag = XChaCha20Poly1305::new(key.into())
        .encrypt_in_place_detached(XNonce::from_slice(nonce), label.aad(), body)
        .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
    buffer.extend_from_slice(&tag);
}

/// [`open`] without allocating: decrypts `sealed` where it lies and returns the plaintext, a
/// part of it. On failure its bytes are left in no useful state.
pub fn open_in_place<'b>(key: &[u8; 32], label: Label, sealed: &'b mut [u8]) -> Result<&'b mut [u8], OpenError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(OpenError);
    }
    let (nonce, rest) = sealed.split_at_mut(NONCE_LEN);
    let (body, tag) = rest.split_at_mut(rest.len() - (SEAL_OVERHEAD - NONCE_LEN));
    XChaCha20Poly1305::new(key.into())
        .decrypt_in_place_detached(XNonce::from_slice(nonce), label.aad(), body, chacha20poly1305::Tag::from_slice(tag))
        .map_err(|_| OpenError)?;
    Ok(body)
}

/// Opens what [`seal`] produced.
pub fn open(key: &[u8; 32], label: Label, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(OpenError);
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    XChaCha20Poly1305::new(key.into())
        .decrypt(XNonce::from_slice(nonce), Payload { msg: body, aad: label.aad() })
        .map_err(|_| OpenError)
}

/// The repository's master key and the keys derived from it.
#[derive(Clone)]
pub struct MasterKey {
    master: [u8; 32],
    encryption: [u8; 32],
    blob_id: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A fresh random master key.
    pub fn generate() -> MasterKey {
        let mut master = [0u8; 32];
        getrandom::getrandom(&mut master).expect("the kernel's random source is available");
        MasterKey::from_bytes(master)
    }

    /// Rebuilds the derived keys from the 32 master bytes.
    pub fn from_bytes(master: [u8; 32]) -> MasterKey {
        MasterKey {
            master,
            encryption: blake3::derive_key("sysstate 2026-11 encryption key", &master),
            blob_id: blake3::derive_key("sysstate 2026-11 blob id key", &master),
        }
    }

    /// The raw master key (only for wrapping it under a passphrase).
    pub fn bytes(&self) -> &[u8; 32] {
        &self.master
    }

    /// The key every object is sealed with.
    pub fn encryption_key(&self) -> &[u8; 32] {
        &self.encryption
    }

    /// The id of a blob: keyed BLAKE3 of its plaintext.
    pub fn blob_id(&self, plaintext: &[u8]) -> Id {
        Id(*blake3::keyed_hash(&self.blob_id, plaintext).as_bytes())
    }

    /// The seed for the chunker's gear table, so chunk boundaries depend on the key.
    pub fn chunker_seed(&self) -> u64 {
        let derived = blake3::derive_key("sysstate 2026-11 chunker seed", &self.master);
        u64::from_le_bytes(derived[..8].try_into().expect("8 bytes")) | 1
    }

    /// Seals with the encryption key.
    pub fn seal(&self, label: Label, plaintext: &[u8]) -> Vec<u8> {
        seal(&self.encryption, label, plaintext)
    }

    /// Seals in place with the encryption key (see [`seal_in_place`]).
    pub fn seal_in_place(&self, label: Label, buffer: &mut Vec<u8>) {
        seal_in_place(&self.encryption, label, buffer)
    }

    /// Opens with the encryption key.
    pub fn open(&self, label: Label, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        open(&self.encryption, label, sealed)
    }

    /// Opens in place with the encryption key (see [`open_in_place`]).
    pub fn open_in_place<'b>(&self, label: Label, sealed: &'b mut [u8]) -> Result<&'b mut [u8], OpenError> {
        open_in_place(&self.encryption, label, sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_label_binding() {
        let key = MasterKey::generate();
        let sealed = key.seal(Label::Blob, b"hello");
        assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(key.open(Label::Blob, &sealed).unwrap(), b"hello");
        assert_eq!(key.open_in_place(Label::Blob, &mut sealed.clone()).unwrap(), b"hello");
        assert_eq!(key.open_in_place(Label::Index, &mut sealed.clone()), Err(OpenError));
        let mut changed = sealed.clone();
        changed[NONCE_LEN] ^= 1;
        assert_eq!(key.open_in_place(Label::Blob, &mut changed), Err(OpenError));
        assert_eq!(key.open_in_place(Label::Blob, &mut sealed[..SEAL_OVERHEAD - 1].to_vec()), Err(OpenError));
        assert_eq!(key.open(Label::Index, &sealed), Err(OpenError));
        let other = MasterKey::generate();
        assert_eq!(other.open(Label::Blob, &sealed), Err(OpenError));
        let mut flipped = sealed.clone();
        flipped[30] ^= 1;
        assert_eq!(key.open(Label::Blob, &flipped), Err(OpenError));
    }

    #[test]
    fn blob_ids_depend_on_the_key() {
        let a = MasterKey::generate();
        let b = MasterKey::generate();
        assert_eq!(a.blob_id(b"x"), a.blob_id(b"x"));
        assert_ne!(a.blob_id(b"x"), b.blob_id(b"x"));
    }
}
