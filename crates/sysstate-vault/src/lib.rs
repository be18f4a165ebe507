//! The vault (DESIGN §1: the seed's Recovery Services vault): an HTTPS service in front of a
//! repository in today's format, stored in a folder or in object storage whose credentials only
//! the vault has. Hosts register with single-use, expiring credentials files and get a token of
//! their own; with it they may add data (never delete or overwrite it) and read their own
//! versions (another host's only with a grant). The vault never sees a passphrase or a
//! plaintext byte: it stores what hosts encrypted. `docs/vault.md` tells the model.
//!
//! - [`init`]: the vault's folder, its own certificate authority and server certificate;
//! - [`credentials`], [`hosts`], [`revoke`], [`grant`]: registration and rights;
//! - [`server`]: the HTTPS API, and what it lets a host do;
//! - [`state`]: the vault's records.

pub mod jobs;
pub mod server;
pub mod state;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use sysstate_engine::{EngineError, ErrorCode, Result};
use sysstate_repo::backend::FileKind;

/// The vault's settings (`vault.toml` in its folder).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VaultConfig {
    /// Where the repository is stored: a folder, or `s3://…`, `az://…` (the credentials in the
    /// vault's environment).
    pub storage: String,
    /// The address to serve on (`0.0.0.0:8443`).
    pub listen: String,
    /// The URL hosts reach it at (`vault://vault.example:8443`).
    pub url: String,
    /// How long a soft-deleted version is kept, undeletable, before it is purged (`14d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_delete: Option<String>,
    /// The share of the packs the nightly verify reads, a different share each night (`10`:
    /// every pack in ten nights; `100`: all of them each night).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_sample: Option<u8>,
    /// `true`: a host's read of a pack, once its token is checked, is answered with a redirect
    /// to a URL of the storage signed for that one object, and the host reads it from there (the
    /// vault neither carries the bytes nor holds them). Only for object storage, and only where
    /// hosts reach the storage's endpoint; a host that cannot falls back to reading through the
    /// vault. Packs are ciphertext and authenticated by the host: the URL gives nothing a host
    /// could not read through the vault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_reads: Option<bool>,
}

/// `verify-sample` when the settings have none.
pub const DEFAULT_VERIFY_SAMPLE: u8 = 10;

/// `soft-delete` when the settings have none.
pub const DEFAULT_SOFT_DELETE: Duration = Duration::from_secs(14 * 86_400);

impl VaultConfig {
    /// The share of the packs the nightly verify reads (1 to 100).
    pub fn verify_sample(&self) -> Result<u8> {
        match self.verify_sample.unwrap_or(DEFAULT_VERIFY_SAMPLE) {
            percent @ 1..=100 => Ok(percent),
            other => Err(EngineError::new(
                ErrorCode::InvalidInput,
                format!("the vault's `verify-sample = {other}` is not a percent from 1 to 100"),
            )),
        }
    }

    /// The soft-delete window.
    pub fn soft_delete(&self) -> Result<Duration> {
        match &self.soft_delete {
            None => Ok(DEFAULT_SOFT_DELETE),
            Some(text) => sysstate_engine::shadow::parse_duration(text)
                .map_err(|e| EngineError::new(ErrorCode::InvalidInput, format!("the vault's `soft-delete`: {e}"))),
        }
    }
}

/// The vault's clock (ns): now; in tests, ahead by `SYSSTATE_FAILPOINT_CLOCK_AHEAD_S`.
pub(crate) fn now() -> i64 {
    sysstate_repo::lock::now_ns() + sysstate_types::failpoint::<i64>("CLOCK_AHEAD_S").unwrap_or(0) * 1_000_000_000
}

/// The vault's folder: `/var/lib/sysstate-vault` unless named.
pub fn default_dir() -> PathBuf {
    PathBuf::from("/var/lib/sysstate-vault")
}

fn io_error(what: &str, path: &Path, error: impl std::fmt::Display) -> EngineError {
    EngineError::new(ErrorCode::StateDirPermission, format!("cannot {what} `{}`: {error}", path.display()))
}

/// Reads the vault's settings.
pub fn config(dir: &Path) -> Result<VaultConfig> {
    let path = dir.join("vault.toml");
    let text = std::fs::read_to_string(&path).map_err(|error| {
        io_error("read the vault's settings", &path, error)
            .with_resolution("make the vault first: `sysstate vault init --storage DIR|URL --url vault://NAME:PORT`")
    })?;
    toml::from_str(&text).map_err(|error| {
        EngineError::new(ErrorCode::InvalidInput, format!("the vault's settings `{}`: {error}", path.display()))
    })
}

/// What `init` made.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Initialised {
    /// The vault's folder.
    pub dir: PathBuf,
    /// Its certificate authority (hosts pin it from their credentials files).
    pub ca: PathBuf,
    /// The names its server certificate is good for.
    pub names: Vec<String>,
}

/// `sysstate vault init`: the vault's folder (root's only), its certificate authority and key,
/// a server certificate for `url`'s host name (and `localhost`, `127.0.0.1`), and its settings.
/// Refused where a vault stands already.
pub fn init(dir: &Path, storage: &str, listen: &str, url: &str) -> Result<Initialised> {
    let base = sysstate_repo::backend::vault::https_base(url)
        .map_err(|detail| EngineError::new(ErrorCode::InvalidInput, format!("`--url`: {detail}")))?;
    let host = base.trim_start_matches("https://").rsplit_once(':').map_or(base.as_str(), |(h, _)| h);
    let host = host.trim_start_matches("https://").trim_matches(['[', ']']).to_string();
    if dir.join("vault.toml").exists() {
        return Err(EngineError::new(
            ErrorCode::InvalidInput,
            format!("a vault stands in `{}` already", dir.display()),
        )
        .with_resolution("use it (`sysstate vault serve`), or choose another folder with `--dir`"));
    }
    listen.parse::<std::net::SocketAddr>().map_err(|_| {
        EngineError::new(
            ErrorCode::InvalidInput,
            format!("`--listen {listen}` is not an address and port (`0.0.0.0:8443`)"),
        )
    })?;
    sysstate_engine::paths::create_private_dir(dir).map_err(|e| io_error("create", dir, e))?;
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if !names.contains(&host) {
        names.insert(0, host);
    }
    let certificate_error =
        |e: rcgen::Error| EngineError::new(ErrorCode::Internal, format!("cannot make the vault's certificates: {e}"));
    let ca_key = rcgen::KeyPair::generate().map_err(certificate_error)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(certificate_error)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "sysstate vault CA");
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).map_err(certificate_error)?;
    let server_key = rcgen::KeyPair::generate().map_err(certificate_error)?;
    let mut server_params = rcgen::CertificateParams::new(names.clone()).map_err(certificate_error)?;
    server_params.distinguished_name.push(rcgen::DnType::CommonName, "sysstate vault");
    server_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let server = server_params.signed_by(&server_key, &ca, &ca_key).map_err(certificate_error)?;
    for (name, text) in [
        ("ca.pem", ca.pem()),
        ("ca-key.pem", ca_key.serialize_pem()),
        ("server.pem", server.pem()),
        ("server-key.pem", server_key.serialize_pem()),
    ] {
        let path = dir.join(name);
        sysstate_engine::paths::write_durably(&path, text.as_bytes()).map_err(|e| io_error("write", &path, e))?;
    }
    let config = VaultConfig {
        storage: storage.to_string(),
        listen: listen.to_string(),
        url: url.to_string(),
        soft_delete: None,
        verify_sample: None,
        direct_reads: None,
    };
    let path = dir.join("vault.toml");
    sysstate_engine::paths::write_durably(&path, toml::to_string(&config).expect("settings encode").as_bytes())
        .map_err(|e| io_error("write", &path, e))?;
    Ok(Initialised { dir: dir.to_path_buf(), ca: dir.join("ca.pem"), names })
}

/// A vault credentials file, as handed to a host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CredentialsFile {
    /// `vault://HOST:PORT`.
    pub vault: String,
    /// The name the host registers as.
    pub host: String,
    /// The single-use secret.
    pub secret: String,
    /// The vault's certificate authority, PEM.
    pub ca: String,
    /// Until when it is good (RFC 3339).
    pub expires: String,
}

/// How long a credentials file is good when not said.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(10 * 86_400);

/// An open vault: its settings, its storage and its records there.
#[derive(Debug)]
pub struct Vault {
    /// Its folder.
    pub dir: PathBuf,
    /// Its settings.
    pub config: VaultConfig,
    /// Its storage (the repository, and `vault/` beside it).
    pub storage: std::sync::Arc<dyn sysstate_repo::backend::Backend>,
    /// Its records.
    pub records: state::Records,
}

impl Vault {
    /// Opens the vault in `dir`.
    pub fn open(dir: &Path) -> Result<Vault> {
        let config = config(dir)?;
        let settings = storage_settings(dir)?;
        let storage = sysstate_repo::backend::open_target_with(&config.storage, &settings).map_err(|e| {
            EngineError::from(sysstate_repo::RepoError::from(e)).with_resolution(format!(
                "check `storage` in `{}` and the credentials in `{}`",
                dir.join("vault.toml").display(),
                dir.join(STORAGE_ENV).display()
            ))
        })?;
        Ok(Vault { dir: dir.to_path_buf(), config, records: state::Records::new(storage.clone()), storage })
    }
}

/// The file in the vault's folder that holds the object store's credentials and settings, one
/// `NAME=value` a line as in a systemd environment file (`AWS_ACCESS_KEY_ID=…`), read by every
/// `sysstate vault` command: so the vault's commands work from any shell, and only the vault's
/// folder holds the keys. They win over the environment's.
pub const STORAGE_ENV: &str = "storage.env";

/// The settings in the vault's [`STORAGE_ENV`] (none when it is absent). Refused when others
/// than its owner may read it, or a line is not `NAME=value`.
pub fn storage_settings(dir: &Path) -> Result<Vec<(String, String)>> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(STORAGE_ENV);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("read", &path, e)),
    };
    let mode = file.metadata().map_err(|e| io_error("read", &path, e))?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(EngineError::new(
            ErrorCode::StateDirPermission,
            format!(
                "`{}` holds the storage's credentials and others may read it (mode {:o})",
                path.display(),
                mode & 0o777
            ),
        )
        .with_resolution(format!("`chmod 600 {}`, and change the keys if someone else read them", path.display())));
    }
    let text = std::io::read_to_string(file).map_err(|e| io_error("read", &path, e))?;
    let mut settings = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, value)) = line
            .split_once('=')
            .filter(|(name, _)| !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        else {
            return Err(invalid(format!("line {} of `{}` is not `NAME=value`", number + 1, path.display())));
        };
        let value = value.trim();
        let unquoted = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|(open, close)| value.strip_prefix(*open)?.strip_suffix(*close))
            .unwrap_or(value);
        settings.push((name.to_string(), unquoted.to_string()));
    }
    Ok(settings)
}

fn invalid(message: String) -> EngineError {
    EngineError::new(ErrorCode::InvalidInput, message)
}

fn no_host(name: &str) -> EngineError {
    invalid(format!("no registered host `{name}`")).with_resolution("`sysstate vault hosts` lists them")
}

/// `sysstate vault credentials --host NAME`: a single-use credentials file that expires, written
/// to `out` (0600). A name already registered is refused (`host-name-taken`).
pub fn credentials(dir: &Path, host: &str, valid: Duration, out: &Path) -> Result<CredentialsFile> {
    let vault = Vault::open(dir)?;
    if host.is_empty() || !host.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) || host.len() > 64 {
        return Err(invalid(format!("`{host}` is not a host name: use letters, digits, `-`, `_` and `.`, at most 64")));
    }
    let ca = std::fs::read_to_string(dir.join("ca.pem")).map_err(|e| io_error("read", &dir.join("ca.pem"), e))?;
    if let Some(taken) = vault.records.fresh()?.host(host) {
        return Err(EngineError::new(
            ErrorCode::HostNameTaken,
            format!(
                "host `{host}` is registered with this vault already (since {})",
                sysstate_types::time::format_utc(taken.registered_ns)
            ),
        )
        .with_resolution(format!(
            "revoke it first if it is gone (`sysstate vault hosts revoke {host}`), or choose another name"
        )));
    }
    let secret = state::secret();
    let now = now();
    let expires_ns = now.saturating_add(valid.as_nanos().min(i64::MAX as u128) as i64);
    vault
        .records
        .add_pending(&state::hash(&secret), &state::Pending { host: host.to_string(), made_ns: now, expires_ns })?;
    let file = CredentialsFile {
        vault: vault.config.url,
        host: host.to_string(),
        secret,
        ca,
        expires: sysstate_types::time::format_utc(expires_ns),
    };
    let text = serde_json::to_vec_pretty(&file).expect("credentials encode");
    sysstate_engine::paths::write_durably(out, &text).map_err(|e| io_error("write", out, e))?;
    Ok(file)
}

/// The hosts, as `sysstate vault hosts` lists them.
pub fn hosts(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let records = Vault::open(dir)?.records.fresh()?;
    Ok(records
        .hosts
        .iter()
        .filter(|host| !host.withdrew())
        .map(|host| {
            let versions = records.versions.values().filter(|owner| owner.host == host.name).count();
            serde_json::json!({
                "name": host.name,
                "registered": sysstate_types::time::format_utc(host.registered_ns),
                "revoked": host.revoked_ns.map(sysstate_types::time::format_utc),
                "versions": versions,
                "may-read": records.grants.iter().filter(|g| g.to == host.name).map(|g| g.from.clone()).collect::<Vec<_>>(),
            })
        })
        .collect())
}

/// Revokes host `name`: its token is refused from now on (by every vault process within
/// [`server::RECORDS_MAX_AGE`]), and credentials files made for the name and not used are void.
pub fn revoke(dir: &Path, name: &str) -> Result<()> {
    let vault = Vault::open(dir)?;
    let records = vault.records.fresh()?;
    let host = records.host(name).ok_or_else(|| no_host(name))?;
    vault.records.revoke(&host.token_hash, now())?;
    vault.records.drop_unused_pending(name)
}

/// The versions in the vault, each with its host, when it arrived and, soft-deleted, when and
/// until when it can be undeleted.
pub fn versions(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let vault = Vault::open(dir)?;
    let window = vault.config.soft_delete()?;
    let records = vault.records.fresh()?;
    Ok(records
        .versions
        .iter()
        .map(|(name, owner)| {
            let deleted = records.deleted.get(name).copied();
            serde_json::json!({
                "id": name,
                "host": owner.host,
                "received": sysstate_types::time::format_utc(owner.received_ns),
                "soft-deleted": deleted.map(sysstate_types::time::format_utc),
                "purge-after": deleted.map(|d| sysstate_types::time::format_utc(d.saturating_add(window.as_nanos() as i64))),
            })
        })
        .collect())
}

/// The full name of the version `prefix` names.
fn version_named(records: &state::State, prefix: &str) -> Result<String> {
    let matches: Vec<&String> = records.versions.keys().filter(|name| name.starts_with(prefix)).collect();
    match matches.as_slice() {
        [one] if !prefix.is_empty() => Ok((*one).clone()),
        [] | [_] => Err(invalid(format!("no version `{prefix}` in the vault"))
            .with_resolution("`sysstate vault versions` lists them")),
        _ => {
            Err(invalid(format!("`{prefix}` names {} versions", matches.len())).with_resolution("give more of the id"))
        }
    }
}

/// A version, with its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostVersion {
    /// Its id.
    pub id: String,
    /// Its host.
    pub host: String,
}

type HostVersions = Vec<HostVersion>;

/// What the retention policies keep and drop of the versions not soft-deleted: (kept, dropped).
fn retention_plan(records: &state::State) -> (HostVersions, HostVersions) {
    use sysstate_repo::version::{Version, VersionStats};
    let mut by_host: std::collections::BTreeMap<&str, Vec<(sysstate_repo::Id, Version)>> = Default::default();
    let mut names = std::collections::HashMap::new();
    for (name, owner) in records.versions.iter().filter(|(name, _)| !records.deleted.contains_key(*name)) {
        // The plan wants versions; the vault knows only who and when.
        let id = sysstate_repo::Id::from_hex(name).unwrap_or_else(sysstate_repo::Id::random);
        names.insert(id, name.clone());
        by_host.entry(owner.host.as_str()).or_default().push((
            id,
            Version {
                time_ns: owner.received_ns,
                host: owner.host.clone(),
                root_path: "/".into(),
                tree: id,
                components: Vec::new(),
                parent: None,
                tags: Vec::new(),
                stats: VersionStats::default(),
                program: String::new(),
                shadow: None,
                system: None,
                extra: Default::default(),
            },
        ));
    }
    let (mut kept, mut dropped) = (Vec::new(), Vec::new());
    for (host, versions) in by_host {
        let named = |ids: Vec<sysstate_repo::Id>| {
            ids.into_iter().map(|id| HostVersion { id: names[&id].clone(), host: host.to_string() })
        };
        match records.retention_of(host).filter(|policy| !policy.is_empty()) {
            None => kept.extend(named(versions.iter().map(|(id, _)| *id).collect())),
            Some(policy) => {
                let group = sysstate_repo::forget::GroupBy { host: true, root: false, components: false, tags: false };
                let (keep, drop) = sysstate_repo::forget::plan(&versions, &policy.policy(), group, &Default::default());
                kept.extend(named(keep));
                dropped.extend(named(drop));
            }
        }
    }
    (kept, dropped)
}

fn immutable(message: String) -> EngineError {
    EngineError::new(ErrorCode::VaultImmutable, message)
}

/// Soft-deletes a version: hidden from its host (and from grants), kept and undeletable for the
/// soft-delete window, then purged by `purge`. An immutable vault refuses a version its
/// retention keeps. Returns its full id.
pub fn forget(dir: &Path, version: &str) -> Result<String> {
    let vault = Vault::open(dir)?;
    let records = vault.records.fresh()?;
    let name = version_named(&records, version)?;
    if records.immutability.0 != state::Immutability::Disabled && !records.deleted.contains_key(&name) {
        let (kept, _) = retention_plan(&records);
        if let Some(HostVersion { host, .. }) = kept.iter().find(|kept| kept.id == name) {
            let policy = records.retention_of(host).map_or("keep every version".into(), |p| p.describe());
            return Err(immutable(format!(
                "the vault is immutable ({}): version {name} of `{host}` is kept by its retention ({policy}), and an immutable vault deletes no version before its retention drops it",
                records.immutability.0.as_str()
            )));
        }
    }
    vault.records.soft_delete(&name, now())?;
    Ok(name)
}

/// Brings a soft-deleted version back to its host. Returns its full id.
pub fn undelete(dir: &Path, version: &str) -> Result<String> {
    let vault = Vault::open(dir)?;
    let records = vault.records.fresh()?;
    let name = version_named(&records, version)?;
    if !records.deleted.contains_key(&name) {
        return Err(invalid(format!("version {name} is not soft-deleted")));
    }
    vault.records.undelete(&name)?;
    Ok(name)
}

/// Purges the versions soft-deleted longer ago than the window, as a `vault-purge` job: their
/// manifests are deleted from the storage (the data only they needed is freed by the next
/// prune). Returns their ids.
pub fn purge(dir: &Path, trigger: sysstate_engine::jobs::JobTrigger) -> Result<jobs::Purged> {
    let vault = Vault::open(dir)?;
    jobs::run(&vault, sysstate_engine::jobs::JobKind::VaultPurge, trigger, |job| {
        let window = vault.config.soft_delete()?.as_nanos() as i64;
        let now = now();
        let due: Vec<String> = vault
            .records
            .fresh()?
            .deleted
            .iter()
            .filter(|(_, deleted)| now >= deleted.saturating_add(window))
            .map(|(name, _)| name.clone())
            .collect();
        job.operation(&format!("purging {} versions soft-deleted before the window", due.len()));
        for name in &due {
            vault
                .storage
                .remove(FileKind::Version, name)
                .map_err(|e| EngineError::from(sysstate_repo::RepoError::from(e)))?;
            vault.records.purged(name)?;
        }
        Ok(jobs::Purged { purged: due })
    })
}

/// Lets host `to` read host `from`'s versions (to restore them onto itself).
pub fn grant(dir: &Path, from: &str, to: &str) -> Result<()> {
    let vault = Vault::open(dir)?;
    let records = vault.records.fresh()?;
    for name in [from, to] {
        if records.host(name).is_none() {
            return Err(no_host(name));
        }
    }
    if from == to {
        return Err(invalid(format!("`{from}` reads its own versions already")));
    }
    vault.records.grant(from, to)
}

/// The vault's immutability, and since when.
pub fn immutability(dir: &Path) -> Result<(state::Immutability, i64)> {
    Ok(Vault::open(dir)?.records.fresh()?.immutability)
}

/// Sets the vault's immutability: `Enabled` and `Disabled` while it is not locked; `Locked`
/// for good. Disabling a locked vault is refused (`vault-immutable`).
pub fn set_immutability(dir: &Path, wanted: state::Immutability) -> Result<()> {
    let vault = Vault::open(dir)?;
    let (now_state, since) = vault.records.fresh()?.immutability;
    if now_state == state::Immutability::Locked && wanted != state::Immutability::Locked {
        return Err(immutable(format!(
            "the vault's immutability was locked at {}: it cannot be {} (a lock is forever)",
            sysstate_types::time::format_utc(since),
            wanted.as_str()
        )));
    }
    if now_state == wanted {
        return Ok(());
    }
    vault.records.set_immutability(wanted, now())
}

/// The retention policies: `*` (every host) and per host, each with since when.
pub fn retention(dir: &Path) -> Result<Vec<(String, state::Retention, i64)>> {
    let records = Vault::open(dir)?.records.fresh()?;
    Ok(records.retention.iter().map(|(scope, (policy, since))| (scope.clone(), policy.clone(), *since)).collect())
}

/// Sets the retention policy of `host` (or every host's, `None`); an empty policy keeps every
/// version. An immutable vault refuses a policy that keeps less than the one in force.
pub fn set_retention(dir: &Path, host: Option<&str>, policy: &state::Retention) -> Result<()> {
    let vault = Vault::open(dir)?;
    let records = vault.records.fresh()?;
    if let Some(host) = host {
        if !records.hosts.iter().any(|h| h.name == host) {
            return Err(no_host(host));
        }
    }
    let scope = host.unwrap_or("*");
    if records.immutability.0 != state::Immutability::Disabled {
        // What keeps this scope's versions now: its own policy, else every host's (for a host),
        // else none (every version kept).
        let current = match host {
            Some(host) => records.retention_of(host),
            None => records.retention.get("*").map(|(p, _)| p),
        };
        let reduced = match current.filter(|p| !p.is_empty()) {
            None => !policy.is_empty(),
            Some(current) => !policy.is_empty() && !policy.keeps_at_least(current),
        };
        if reduced {
            return Err(immutable(format!(
                "the vault is immutable ({}): the retention of {} cannot be reduced from `{}` to `{}`",
                records.immutability.0.as_str(),
                host.map_or("every host".to_string(), |h| format!("`{h}`")),
                current.map_or("keep every version".into(), |p| p.describe()),
                policy.describe()
            ))
            .with_resolution("give a policy that keeps at least as much in every rule"));
        }
    }
    vault.records.set_retention(scope, policy, now())
}

/// Applies the retention policies as a `vault-retention` job: soft-deletes (or, `dry_run`, only
/// names) the versions they drop.
pub fn apply_retention(dir: &Path, dry_run: bool, trigger: sysstate_engine::jobs::JobTrigger) -> Result<jobs::Dropped> {
    let vault = Vault::open(dir)?;
    jobs::run(&vault, sysstate_engine::jobs::JobKind::VaultRetention, trigger, |job| {
        let (_, dropped) = retention_plan(&*vault.records.fresh()?);
        job.operation(&format!(
            "{} {} versions the retention drops",
            if dry_run { "would soft-delete" } else { "soft-deleting" },
            dropped.len()
        ));
        if !dry_run {
            let now = now();
            for version in &dropped {
                vault.records.soft_delete(&version.id, now)?;
            }
        }
        Ok(jobs::Dropped { versions: dropped, dry_run })
    })
}

/// Verifies the vault's storage as a `vault-verify` job (`jobs::verify`).
pub fn verify(
    dir: &Path,
    sample_percent: u8,
    trigger: sysstate_engine::jobs::JobTrigger,
) -> Result<jobs::VerifyReport> {
    let vault = Vault::open(dir)?;
    jobs::run(&vault, sysstate_engine::jobs::JobKind::VaultVerify, trigger, |job| {
        jobs::verify(&vault, sample_percent, job)
    })
}

/// `sysstate vault report`: per host, what the vault holds of it and when the last version came;
/// for the vault, its storage, immutability and its jobs' last runs. The data of a fleet view.
pub fn report(dir: &Path) -> Result<serde_json::Value> {
    let vault = Vault::open(dir)?;
    let records = vault.records.fresh()?;
    let now = now();
    let overdue_after = 26 * 3600 * 1_000_000_000i64;
    let packs = vault.storage.list(FileKind::Pack).map_err(|e| EngineError::from(sysstate_repo::RepoError::from(e)))?;
    let additions = vault.records.additions()?;
    // What each host added: the packs it sent first, as they stand (shared blobs count for the
    // host that sent them).
    let mut added: std::collections::HashMap<&str, (usize, u64)> = std::collections::HashMap::new();
    for (pack, size) in &packs {
        let by = additions.get(pack).map_or("", String::as_str);
        let entry = added.entry(by).or_default();
        entry.0 += 1;
        entry.1 += size;
    }
    let hosts: Vec<serde_json::Value> = records
        .hosts
        .iter()
        .filter(|host| !host.withdrew())
        .map(|host| {
            let owned: Vec<(&String, &state::Owner)> =
                records.versions.iter().filter(|(_, owner)| owner.host == host.name).collect();
            let kept: Vec<_> = owned.iter().filter(|(name, _)| !records.deleted.contains_key(*name)).collect();
            let last = kept.iter().map(|(_, owner)| owner.received_ns).max();
            let (added_packs, added_bytes) = added.get(host.name.as_str()).copied().unwrap_or_default();
            serde_json::json!({
                "name": host.name,
                "revoked": host.revoked_ns.map(sysstate_types::time::format_utc),
                "last-received": last.map(sysstate_types::time::format_utc),
                "overdue": host.revoked_ns.is_none() && last.is_none_or(|last| now - last > overdue_after),
                "versions": kept.len(),
                "soft-deleted": owned.len() - kept.len(),
                "added-packs": added_packs,
                "added-bytes": added_bytes,
                "retention": records.retention_of(&host.name).map_or("keep every version".into(), |p| p.describe()),
            })
        })
        .collect();
    let size = |kind| -> Result<(usize, u64)> {
        let files = vault.storage.list(kind).map_err(|e| EngineError::from(sysstate_repo::RepoError::from(e)))?;
        Ok((files.len(), files.iter().map(|(_, size)| size).sum()))
    };
    let (unattributed_packs, unattributed_bytes) = added.get("").copied().unwrap_or_default();
    let pack_bytes: u64 = packs.iter().map(|(_, size)| size).sum();
    let (indexes, index_bytes) = size(FileKind::Index)?;
    let store = jobs::store(dir)?;
    let mut last_jobs = serde_json::Map::new();
    for kind in [
        sysstate_engine::jobs::JobKind::VaultVerify,
        sysstate_engine::jobs::JobKind::VaultRetention,
        sysstate_engine::jobs::JobKind::VaultPurge,
    ] {
        let filter = sysstate_engine::jobs::JobFilter { kind: Some(kind), limit: 1, ..Default::default() };
        if let Some(job) = store.list(&filter)?.into_iter().next() {
            last_jobs.insert(kind.as_str().into(), serde_json::to_value(&job).expect("jobs encode"));
        }
    }
    Ok(serde_json::json!({
        "hosts": hosts,
        "storage": {
            "location": vault.config.storage, "packs": packs.len(), "pack-bytes": pack_bytes,
            "index-files": indexes, "index-bytes": index_bytes,
            "unattributed-packs": unattributed_packs, "unattributed-bytes": unattributed_bytes,
        },
        "immutability": records.immutability.0.as_str(),
        "jobs": last_jobs,
    }))
}

/// `sysstate agent register FILE`, the host's side: exchanges the credentials file for this
/// host's token at the vault (pinning the vault's certificate from the file) and returns what
/// the host keeps.
pub fn register(file: &Path) -> Result<sysstate_repo::backend::vault::VaultCredentials> {
    let text = std::fs::read(file).map_err(|e| {
        EngineError::new(
            ErrorCode::InvalidInput,
            format!("cannot read the vault credentials file `{}`: {e}", file.display()),
        )
    })?;
    let credentials: CredentialsFile = serde_json::from_slice(&text).map_err(|e| {
        EngineError::new(ErrorCode::InvalidInput, format!("`{}` is not a vault credentials file: {e}", file.display()))
            .with_resolution("use the file `sysstate vault credentials --host NAME` wrote on the vault")
    })?;
    let unreachable = |detail: String| {
        EngineError::new(
            ErrorCode::VaultUnreachable,
            format!("cannot reach the vault at `{}`: {detail}", credentials.vault),
        )
    };
    let base = sysstate_repo::backend::vault::https_base(&credentials.vault).map_err(unreachable)?;
    let client = sysstate_repo::backend::vault::pinned_client(&credentials.ca).map_err(unreachable)?;
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| unreachable(e.to_string()))?;
    let (status, body) = runtime.block_on(async {
        let response = client
            .post(format!("{base}/v1/register"))
            .header("content-type", "application/json")
            .body(
                serde_json::to_vec(&serde_json::json!({"host": credentials.host, "secret": credentials.secret}))
                    .expect("JSON encodes"),
            )
            .send()
            .await
            .map_err(|e| unreachable(sysstate_repo::backend::vault::describe(&e)))?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|e| unreachable(sysstate_repo::backend::vault::describe(&e)))?;
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        Ok::<_, EngineError>((status, body))
    })?;
    if status != 200 {
        let code = body["error"]["code"].as_str().and_then(ErrorCode::from_name).unwrap_or(ErrorCode::VaultForbidden);
        let message = body["error"]["message"].as_str().unwrap_or("the vault refused the registration");
        return Err(EngineError::new(
            code,
            format!("the vault at `{}` refused to register `{}`: {message}", credentials.vault, credentials.host),
        ));
    }
    let token = body["token"].as_str().ok_or_else(|| unreachable("the vault answered without a token".into()))?;
    Ok(sysstate_repo::backend::vault::VaultCredentials {
        vault: credentials.vault,
        host: credentials.host,
        token: token.to_string(),
        ca: credentials.ca,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write_env(dir: &Path, text: &str, mode: u32) {
        let path = dir.join(STORAGE_ENV);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn storage_settings_read_as_systemd_reads_an_environment_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(storage_settings(dir.path()).unwrap(), Vec::new(), "no file: no settings");
        write_env(
            dir.path(),
            "# Garage\nAWS_ACCESS_KEY_ID=GK1\n\nexport AWS_SECRET_ACCESS_KEY=\"s=cret\"\n  AWS_REGION='garage'  \n",
            0o600,
        );
        let names = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
        };
        assert_eq!(
            storage_settings(dir.path()).unwrap(),
            names(&[("AWS_ACCESS_KEY_ID", "GK1"), ("AWS_SECRET_ACCESS_KEY", "s=cret"), ("AWS_REGION", "garage")])
        );
        write_env(dir.path(), "AWS_REGION=garage\naws secret\n", 0o600);
        let error = storage_settings(dir.path()).unwrap_err();
        assert!(error.to_string().contains("line 2 of"), "{error}");
    }

    #[test]
    fn storage_settings_others_may_read_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_env(dir.path(), "AWS_SECRET_ACCESS_KEY=x\n", 0o644);
        let error = storage_settings(dir.path()).unwrap_err();
        assert_eq!(error.code, ErrorCode::StateDirPermission);
        assert!(error.to_string().contains("mode 644"), "{error}");
        assert!(error.resolution.as_deref().unwrap_or_default().contains("chmod 600"), "{error:?}");
    }
}
