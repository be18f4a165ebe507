//! Version manifests: one per backup.
//!
//! ```text
//! "SSVERSN\x01" | sealed(JSON(Version))
//! ```
//! JSON rather than postcard: manifests are small, read by people through `sysstate versions
//! --json`, and must grow (writer and provider results) without a format break — unknown fields
//! are kept by older readers as `extra`.

use crate::crypto::{Label, MasterKey};
use crate::id::Id;
use serde::{Deserialize, Serialize};

/// Magic of version files (format version 1).
pub const VERSION_MAGIC: &[u8; 8] = b"SSVERSN\x01";

/// One component as it was backed up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ComponentRecord {
    /// Its name (`config`, `efi`, …).
    pub name: String,
    /// The absolute paths it covers, as seen from the backed-up root.
    pub paths: Vec<String>,
    /// Paths that did not exist when the backup ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// Command output captured into the version (the package selection, the disk layout …),
    /// each with its command, exit status and stderr. Opaque to the repository.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generated: Vec<serde_json::Value>,
}

/// Counters of one backup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VersionStats {
    /// Regular files in the version.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks, devices, fifos.
    pub others: u64,
    /// Files read because they were new or changed.
    pub files_read: u64,
    /// Files taken from the parent without reading.
    pub files_unchanged: u64,
    /// Bytes of all regular files.
    pub bytes_total: u64,
    /// Bytes read from files.
    pub bytes_read: u64,
    /// Blobs this backup added.
    pub blobs_added: u64,
    /// Plaintext bytes of the blobs added.
    pub bytes_added: u64,
    /// Bytes of packs written (after compression and encryption).
    pub bytes_stored: u64,
    /// Files that could not be read (the version holds the rest).
    pub errors: u64,
    /// Wall time of the backup in ms.
    pub duration_ms: u64,
}

/// A version manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Version {
    /// When the backup's point in time was taken, ns since the epoch.
    pub time_ns: i64,
    /// The host name of the backed-up machine.
    pub host: String,
    /// The root the paths are relative to (`/` for the machine itself).
    pub root_path: String,
    /// The tree of the root directory.
    pub tree: Id,
    /// The components in this version.
    pub components: Vec<ComponentRecord>,
    /// The version this one was compared with to skip unchanged files.
    pub parent: Option<Id>,
    /// Free-form tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Counters.
    pub stats: VersionStats,
    /// The program that wrote it (`sysstate 0.1.0`).
    pub program: String,
    /// The shadow copy service's results: provider, writers and their results, freeze and
    /// commit durations. Filled in by the engine; opaque to the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<serde_json::Value>,
    /// What system it is of (distribution, release, architecture, kernels): filled in by the
    /// engine; opaque to the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<serde_json::Value>,
    /// Fields written by newer programs, kept as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Why a version file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VersionError {
    /// Wrong magic.
    #[error("not a sysstate version file (bad magic)")]
    NotAVersion,
    /// Did not decrypt.
    #[error("the version file does not decrypt: damaged, or another repository's key")]
    Seal,
    /// Does not decode.
    #[error("the version manifest is malformed: {0}")]
    Malformed(String),
}

impl Version {
    /// A version of host `h`, root `/`, at `time_ns`, with a random tree and nothing else: for
    /// tests of what is done with versions, not of what they hold.
    #[cfg(test)]
    pub(crate) fn at(time_ns: i64) -> Version {
        Version {
            time_ns,
            host: "h".into(),
            root_path: "/".into(),
            tree: Id::random(),
            components: vec![],
            parent: None,
            tags: vec![],
            stats: VersionStats::default(),
            program: String::new(),
            shadow: None,
            system: None,
            extra: Default::default(),
        }
    }

    /// Seals and frames it.
    pub fn encode(&self, key: &MasterKey) -> Vec<u8> {
        let plain = serde_json::to_vec(self).expect("versions encode");
        let mut out = VERSION_MAGIC.to_vec();
        out.extend_from_slice(&key.seal(Label::Version, &plain));
        out
    }

    /// Opens and decodes it.
    pub fn decode(key: &MasterKey, bytes: &[u8]) -> Result<Version, VersionError> {
        let body = bytes.strip_prefix(VERSION_MAGIC.as_slice()).ok_or(VersionError::NotAVersion)?;
        let plain = key.open(Label::Version, body).map_err(|_| VersionError::Seal)?;
        Version::decode_plaintext(&plain)
    }

    /// Decodes the plaintext (the fuzzing entry point).
    pub fn decode_plaintext(plain: &[u8]) -> Result<Version, VersionError> {
        serde_json::from_slice(plain).map_err(|e| VersionError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_round_trip_and_keep_unknown_fields() {
        let key = MasterKey::generate();
        let mut version = Version {
            time_ns: 1,
            host: "h".into(),
            root_path: "/".into(),
            tree: Id::random(),
            components: vec![ComponentRecord {
                name: "config".into(),
                paths: vec!["/etc".into()],
                missing: vec![],
                generated: vec![],
            }],
            parent: None,
            tags: vec!["t".into()],
            stats: VersionStats::default(),
            program: "sysstate test".into(),
            shadow: Some(serde_json::json!({"provider": "copy"})),
            system: None,
            extra: Default::default(),
        };
        version.extra.insert("future-field".into(), serde_json::json!(42));
        let bytes = version.encode(&key);
        assert_eq!(Version::decode(&key, &bytes).unwrap(), version);
        assert_eq!(Version::decode(&MasterKey::generate(), &bytes), Err(VersionError::Seal));
    }
}
