//! The vault's own records (`state.json` in its folder): registered hosts (their tokens only
//! hashed), credentials files handed out (their secrets only hashed, single-use, expiring),
//! grants, and which host wrote each version manifest and lease. Changed under an `flock` of
//! `state.lock`, written whole and atomically, so the CLI (`vault credentials`, `hosts revoke`)
//! and the server can change it side by side.

use serde::{Deserialize, Serialize};
use std::path::Path;
use sysstate_engine::{EngineError, ErrorCode, Result};

/// A registered host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Host {
    /// Its unique name.
    pub name: String,
    /// BLAKE3 of its token (hex).
    pub token_hash: String,
    /// When it registered (ns).
    pub registered_ns: i64,
    /// When it was revoked (ns), if it was.
    pub revoked_ns: Option<i64>,
}

/// A credentials file handed out, waiting for its registration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Pending {
    /// The host name it registers.
    pub host: String,
    /// BLAKE3 of its secret (hex).
    pub secret_hash: String,
    /// When it was made (ns).
    pub made_ns: i64,
    /// Until when it is good (ns).
    pub expires_ns: i64,
    /// When it was used (ns), if it was.
    pub used_ns: Option<i64>,
}

/// A grant: `to` may read `from`'s versions (to restore them onto itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Grant {
    /// Whose versions.
    pub from: String,
    /// Who may read them.
    pub to: String,
}

/// Everything the vault records.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct State {
    /// Registered hosts (revoked ones too, with when).
    #[serde(default)]
    pub hosts: Vec<Host>,
    /// Credentials files handed out.
    #[serde(default)]
    pub pending: Vec<Pending>,
    /// Grants.
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// Version manifest → the host that wrote it.
    #[serde(default)]
    pub versions: std::collections::BTreeMap<String, String>,
    /// Lease → the host that holds it.
    #[serde(default)]
    pub locks: std::collections::BTreeMap<String, String>,
    /// Version manifest → when it arrived (ns).
    #[serde(default)]
    pub received: std::collections::BTreeMap<String, i64>,
    /// Version manifest → when the vault soft-deleted it (ns): hidden from its host, kept (and
    /// undeletable) until the soft-delete window has passed, then purged.
    #[serde(default)]
    pub deleted: std::collections::BTreeMap<String, i64>,
}

/// BLAKE3 of a secret, hex.
pub fn hash(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

/// 32 random bytes, hex.
pub fn secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).expect("the kernel's random source is available");
    hex::encode(bytes)
}

fn failed(what: &str, path: &Path, error: impl std::fmt::Display) -> EngineError {
    EngineError::new(
        ErrorCode::StateDirPermission,
        format!("cannot {what} the vault's records `{}`: {error}", path.display()),
    )
    .with_resolution("check the vault's folder (`sysstate vault init` made it; it is root's only)")
}

impl State {
    /// The active (not revoked) host of `name`.
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name && h.revoked_ns.is_none())
    }

    /// The active host whose token is `token`.
    pub fn host_of_token(&self, token: &str) -> Option<&Host> {
        let hashed = hash(token);
        self.hosts.iter().find(|h| h.token_hash == hashed && h.revoked_ns.is_none())
    }

    /// True when `host` may read the versions `owner` wrote.
    pub fn may_read(&self, host: &str, owner: &str) -> bool {
        host == owner || self.grants.iter().any(|g| g.from == owner && g.to == host)
    }

    /// True when `host` may see version `name`: its own or granted, and not soft-deleted.
    pub fn visible(&self, host: &str, name: &str) -> bool {
        !self.deleted.contains_key(name) && self.versions.get(name).is_some_and(|owner| self.may_read(host, owner))
    }

    /// Reads the records of the vault in `dir`.
    pub fn read(dir: &Path) -> Result<State> {
        let path = dir.join("state.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| failed("read", &path, e)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(error) => Err(failed("read", &path, error)),
        }
    }

    /// Changes the records of the vault in `dir` under its lock: read, `change`, written whole.
    pub fn change<T>(dir: &Path, change: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let lock_path = dir.join("state.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| failed("lock", &lock_path, e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| failed("lock", &lock_path, e))?;
        let mut state = State::read(dir)?;
        let out = change(&mut state)?;
        let path = dir.join("state.json");
        let text = serde_json::to_vec_pretty(&state).expect("the records encode");
        sysstate_engine::paths::write_durably(&path, &text).map_err(|e| failed("write", &path, e))?;
        Ok(out)
    }
}
