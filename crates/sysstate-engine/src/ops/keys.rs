//! The repository's keys: each wraps the one master key under its own passphrase.

use crate::error::{EngineError, Result};
use serde::Serialize;
use sysstate_repo::keys::KdfParams;
use sysstate_repo::Repository;
use sysstate_types::ErrorCode;

/// One key file.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct KeyInfo {
    /// Its name in the repository.
    pub id: String,
    /// True for the key the repository was opened with.
    pub current: bool,
    /// Who made it.
    pub host: String,
    /// …
    pub user: String,
    /// When (RFC 3339).
    pub created: String,
}

impl KeyInfo {
    /// The first 8 characters of the id (all of it when shorter: a backend may list any name).
    pub fn short(&self) -> &str {
        short(&self.id)
    }
}

/// The first 8 characters of a key name, or all of a shorter one.
pub fn short(name: &str) -> &str {
    name.get(..8).unwrap_or(name)
}

/// The keys.
pub fn list(repo: &Repository) -> Result<Vec<KeyInfo>> {
    Ok(repo
        .list_keys()?
        .into_iter()
        .map(|(name, key)| KeyInfo {
            current: name == repo.key_name(),
            id: name,
            host: key.host,
            user: key.user,
            created: sysstate_types::time::format_utc(key.created_ns),
        })
        .collect())
}

/// Adds a key for `passphrase`; returns its name.
pub fn add(repo: &Repository, passphrase: &[u8]) -> Result<String> {
    Ok(repo.add_key(passphrase, KdfParams::default())?)
}

/// Removes the key whose name starts with `prefix` (never the one in use).
pub fn remove(repo: &Repository, prefix: &str) -> Result<()> {
    repo.remove_key(prefix).map_err(|e| EngineError::new(ErrorCode::InvalidInput, e.to_string()))
}

/// Replaces the key in use by one for `passphrase`; returns (new name, old name).
pub fn change_passphrase(repo: &Repository, passphrase: &[u8]) -> Result<(String, String)> {
    let new = repo.change_passphrase(passphrase, KdfParams::default())?;
    Ok((new, repo.key_name().to_string()))
}
