//! The repository config and key files.
//!
//! `config` is plain JSON: the magic, the format version, the repository id and the chunker
//! parameters. Nothing in it is secret. `keys/<id>` is plain JSON too: the argon2id parameters
//! and salt, and the master key sealed under the key that argon2id derives from a passphrase.

use crate::chunker::ChunkerParams;
use crate::crypto::{self, Label, MasterKey};
use crate::id::Id;
use serde::{Deserialize, Serialize};

/// The `magic` field of the config file.
pub const CONFIG_MAGIC: &str = "sysstate-repository";
/// The format version this program writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The repository config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RepoConfig {
    /// Always [`CONFIG_MAGIC`].
    pub magic: String,
    /// The format version.
    pub version: u32,
    /// A random id, the same for every key.
    pub id: Id,
    /// Chunk sizes.
    pub chunker: ChunkerParams,
}

/// The argon2id cost of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        // argon2id, 32 MiB × 6 passes: the cost of RFC 9106's 64 MiB × 3 (the same memory ×
        // passes) at half the peak memory, which every command pays — with 64 MiB it was the
        // whole peak RSS of a no-change backup and above restic's in the benchmark. Well above
        // OWASP's minimums (46 MiB × 1, 19 MiB × 2). Two lanes, computed on two threads: an
        // attacker pays the same memory × time per guess (lanes split the memory, they do not
        // add to it), and opening takes half the time on two cores (0.1 s → 0.05 s here; RFC
        // 9106 itself advises four lanes). Existing key files keep their own parameters.
        KdfParams { memory_kib: 32 * 1024, iterations: 6, parallelism: 2 }
    }
}

/// A key file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct KeyFile {
    /// Always `argon2id`.
    pub kdf: String,
    /// Its cost.
    pub params: KdfParams,
    /// 32 random bytes, hex.
    pub salt: String,
    /// The sealed master key, hex.
    pub wrapped: String,
    /// Who made it.
    pub host: String,
    /// The user who made it.
    pub user: String,
    /// When, ns since the epoch.
    pub created_ns: i64,
    /// The id of the repository the key belongs to (keys made before December 2026 have
    /// none); a key never opens another repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<crate::Id>,
}

/// Why a key file did not open.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// The passphrase does not open it.
    #[error("the passphrase does not open this key")]
    WrongPassphrase,
    /// It is not a key file.
    #[error("malformed key file: {0}")]
    Malformed(String),
}

/// Keys derived in this process, by a hash of what they were derived from: a long-lived process
/// (the agent) opens its repository for every job, and argon2id is made to cost a core for a
/// tenth of a second and 32 MiB each time. Kept in memory only, as the passphrase is; at most
/// [`DERIVED_KEPT`].
static DERIVED: std::sync::Mutex<Vec<([u8; 32], [u8; 32])>> = std::sync::Mutex::new(Vec::new());

/// How many derived keys a process keeps.
const DERIVED_KEPT: usize = 8;

fn derive(passphrase: &[u8], salt: &[u8], params: KdfParams) -> Result<[u8; 32], KeyError> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(passphrase.len() as u64).to_le_bytes()).update(passphrase).update(salt);
    hasher.update(&params.memory_kib.to_le_bytes()).update(&params.iterations.to_le_bytes());
    hasher.update(&params.parallelism.to_le_bytes());
    let id: [u8; 32] = hasher.finalize().into();
    if let Some((_, key)) = DERIVED.lock().expect("derived keys lock").iter().find(|(known, _)| *known == id) {
        return Ok(*key);
    }
    let key = derive_now(passphrase, salt, params)?;
    let mut derived = DERIVED.lock().expect("derived keys lock");
    if derived.len() >= DERIVED_KEPT {
        derived.remove(0);
    }
    derived.push((id, key));
    Ok(key)
}

fn derive_now(passphrase: &[u8], salt: &[u8], params: KdfParams) -> Result<[u8; 32], KeyError> {
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(params.memory_kib, params.iterations, params.parallelism, Some(32))
            .map_err(|e| KeyError::Malformed(format!("argon2id parameters: {e}")))?,
    );
    let mut out = [0u8; 32];
    argon.hash_password_into(passphrase, salt, &mut out).map_err(|e| KeyError::Malformed(format!("argon2id: {e}")))?;
    Ok(out)
}

impl KeyFile {
    /// Wraps `master` under `passphrase`.
    pub fn wrap(
        master: &MasterKey,
        passphrase: &[u8],
        params: KdfParams,
        host: &str,
        user: &str,
        now_ns: i64,
    ) -> KeyFile {
        let mut salt = [0u8; 32];
        getrandom::getrandom(&mut salt).expect("the kernel's random source is available");
        let wrapping = derive(passphrase, &salt, params).expect("default argon2id parameters are valid");
        KeyFile {
            kdf: "argon2id".into(),
            params,
            salt: hex::encode(salt),
            wrapped: hex::encode(crypto::seal(&wrapping, Label::KeyWrap, master.bytes())),
            host: host.into(),
            user: user.into(),
            created_ns: now_ns,
            repository: None,
        }
    }

    /// The key, bound to the repository `id`.
    pub fn for_repository(mut self, id: crate::Id) -> KeyFile {
        self.repository = Some(id);
        self
    }

    /// Unwraps the master key.
    pub fn unwrap_key(&self, passphrase: &[u8]) -> Result<MasterKey, KeyError> {
        if self.kdf != "argon2id" {
            return Err(KeyError::Malformed(format!("unknown kdf `{}`", self.kdf)));
        }
        // Refuse costs no honest key has, so a hostile key file cannot exhaust memory.
        if self.params.memory_kib > 4 * 1024 * 1024 || self.params.iterations > 64 || self.params.parallelism > 64 {
            return Err(KeyError::Malformed("argon2id parameters out of range".into()));
        }
        let salt = hex::decode(&self.salt).map_err(|e| KeyError::Malformed(e.to_string()))?;
        let wrapped = hex::decode(&self.wrapped).map_err(|e| KeyError::Malformed(e.to_string()))?;
        let wrapping = derive(passphrase, &salt, self.params)?;
        let master = crypto::open(&wrapping, Label::KeyWrap, &wrapped).map_err(|_| KeyError::WrongPassphrase)?;
        let master: [u8; 32] =
            master.try_into().map_err(|_| KeyError::Malformed("master key is not 32 bytes".into()))?;
        Ok(MasterKey::from_bytes(master))
    }

    /// Decodes a key file (the fuzzing entry point).
    pub fn decode(bytes: &[u8]) -> Result<KeyFile, KeyError> {
        serde_json::from_slice(bytes).map_err(|e| KeyError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap() {
        let master = MasterKey::generate();
        let cheap = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };
        let key = KeyFile::wrap(&master, b"secret", cheap, "h", "u", 0);
        let bytes = serde_json::to_vec(&key).unwrap();
        let decoded = KeyFile::decode(&bytes).unwrap();
        assert_eq!(decoded.unwrap_key(b"secret").unwrap().bytes(), master.bytes());
        assert_eq!(decoded.unwrap_key(b"wrong").unwrap_err(), KeyError::WrongPassphrase);
    }

    #[test]
    fn the_key_derivation_is_argon2id_as_the_reference_implementation_computes_it() {
        // From the reference C implementation (Python's argon2-cffi, `hash_secret_raw`, type ID,
        // version 19): key files made with one lane, or with any other argon2 crate, still open.
        let expected = [
            (1, "03741938006c13dc0de864da6b4155d43c1adc933bda936331e7b1221083a38d"),
            (2, "e0a1ff13da7d92766c0441211599131666963db29a2e08522960210cc654d728"),
            (4, "07fc1f2f2630c6b5d3f3175049e9eaa4c42f6f09eb3069c2cb42f033a8eec60c"),
        ];
        for (lanes, hex) in expected {
            let params = KdfParams { memory_kib: 256, iterations: 2, parallelism: lanes };
            let derived = derive(b"correct horse battery staple", b"sysstate salt 16bytes!", params).unwrap();
            assert_eq!(hex::encode(derived), hex, "{lanes} lanes");
        }
    }
}
