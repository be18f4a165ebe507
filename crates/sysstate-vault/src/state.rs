//! The vault's own records, kept in its storage beside the repository (`vault/` — hosts never
//! reach it), so that the vault keeps no state that matters outside the storage and two vault
//! processes can serve one bucket.
//!
//! Object stores offer no compare-and-swap (Garage has no conditional write), so no record is
//! ever changed in place: each fact is a small file of its own, written once, and the state is
//! what they say together. Where two writers can race (two registrations with one credentials
//! file, two hosts taking one name), each writes its own attempt under a unique name and then
//! reads the others: the earliest wins, and the others withdraw.
//!
//! | file | says |
//! |---|---|
//! | `h~TOKENHASH` | a host registered under a name with the token of that hash |
//! | `r~TOKENHASH` | that host was revoked, when |
//! | `p~SECRETHASH` | a credentials file handed out: for which name, until when |
//! | `u~SECRETHASH~TIME~RANDOM` | an attempt to register with it (the earliest used it) |
//! | `g~FROM~TO` | host TO may read host FROM's versions |
//! | `v~VERSION` | which host wrote a version manifest, and when it arrived |
//! | `d~VERSION` | the vault soft-deleted that version, when |
//! | `l~LEASE` | which host holds a lease |
//! | `i~TIME~RANDOM` | immutability enabled, disabled or locked, when (the newest says; a lock is forever) |
//! | `k~SCOPE~TIME~RANDOM` | the retention policy of one host (or `*`: every host), from when (the newest says) |

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use sysstate_engine::{EngineError, Result};
use sysstate_repo::backend::{Backend, BackendError, ErrorKind, FileKind};

/// A registered host.
#[derive(Debug, Clone)]
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

/// A credentials file handed out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Pending {
    /// The host name it registers.
    pub host: String,
    /// When it was made (ns).
    pub made_ns: i64,
    /// Until when it is good (ns).
    pub expires_ns: i64,
}

/// A grant: `to` may read `from`'s versions (to restore them onto itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Whose versions.
    pub from: String,
    /// Who may read them.
    pub to: String,
}

/// Where the vault's immutability stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Immutability {
    /// Retention may be changed and versions soft-deleted at will.
    #[default]
    Disabled,
    /// Retention cannot be reduced, nor a version deleted before its retention drops it; can be
    /// disabled again.
    Enabled,
    /// As enabled, forever.
    Locked,
}

impl Immutability {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Immutability::Disabled => "disabled",
            Immutability::Enabled => "enabled",
            Immutability::Locked => "locked",
        }
    }
}

/// A retention policy of the vault's copies, as the agent's `[retention]` takes it, applied on
/// the times versions arrived at the vault (the vault cannot read a manifest's own time).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Retention {
    /// The newest N.
    #[serde(default)]
    pub last: usize,
    /// The newest of each of the last N days.
    #[serde(default)]
    pub daily: usize,
    /// … weeks.
    #[serde(default)]
    pub weekly: usize,
    /// … months.
    #[serde(default)]
    pub monthly: usize,
    /// … years.
    #[serde(default)]
    pub yearly: usize,
    /// Every version that arrived within this many seconds before the host's newest.
    #[serde(default)]
    pub within_s: u64,
}

impl Retention {
    /// True when it keeps nothing (never applied).
    pub fn is_empty(&self) -> bool {
        *self == Retention::default()
    }

    /// True when `self` keeps at least what `other` keeps: no rule of it is smaller.
    pub fn keeps_at_least(&self, other: &Retention) -> bool {
        self.last >= other.last
            && self.daily >= other.daily
            && self.weekly >= other.weekly
            && self.monthly >= other.monthly
            && self.yearly >= other.yearly
            && self.within_s >= other.within_s
    }

    /// As the repository's forget takes it.
    pub fn policy(&self) -> sysstate_repo::forget::Policy {
        sysstate_repo::forget::Policy {
            last: self.last,
            daily: self.daily,
            weekly: self.weekly,
            monthly: self.monthly,
            yearly: self.yearly,
            within_ns: (self.within_s > 0).then(|| self.within_s.saturating_mul(1_000_000_000) as i64),
            tags: Vec::new(),
        }
    }

    /// `last 3, daily 7, within 2d` (or `keep every version`).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (name, count) in [
            ("last", self.last),
            ("daily", self.daily),
            ("weekly", self.weekly),
            ("monthly", self.monthly),
            ("yearly", self.yearly),
        ] {
            if count > 0 {
                parts.push(format!("{name} {count}"));
            }
        }
        if self.within_s > 0 {
            parts.push(format!("within {}", sysstate_types::time::format_duration_s(self.within_s)));
        }
        if parts.is_empty() {
            "keep every version".into()
        } else {
            parts.join(", ")
        }
    }
}

/// One version in the vault.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Owner {
    /// The host that wrote it.
    pub host: String,
    /// When it arrived (ns, the vault's clock).
    pub received_ns: i64,
}

/// Everything the records say.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Registered hosts (revoked ones too, with when), oldest first.
    pub hosts: Vec<Host>,
    /// Credentials files handed out, by the hash of their secret, with when each was used.
    pub pending: BTreeMap<String, (Pending, Option<i64>)>,
    /// Grants.
    pub grants: Vec<Grant>,
    /// Version manifest → who wrote it and when it arrived.
    pub versions: BTreeMap<String, Owner>,
    /// Lease → the host that holds it.
    pub locks: BTreeMap<String, String>,
    /// Version manifest → when the vault soft-deleted it (ns): hidden from its host, kept (and
    /// undeletable) until the soft-delete window has passed, then purged.
    pub deleted: BTreeMap<String, i64>,
    /// Immutability, and since when.
    pub immutability: (Immutability, i64),
    /// Retention policies: `*` for every host, else by host name; with since when.
    pub retention: BTreeMap<String, (Retention, i64)>,
}

impl Host {
    /// True when this registration lost the race for its name and withdrew at once (revoked at
    /// the very time it registered): it never was a host, and is not listed.
    pub fn withdrew(&self) -> bool {
        self.revoked_ns == Some(self.registered_ns)
    }
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
        !self.deleted.contains_key(name)
            && self.versions.get(name).is_some_and(|owner| self.may_read(host, &owner.host))
    }

    /// The retention policy of `host`'s versions: its own, else every host's, else none.
    pub fn retention_of(&self, host: &str) -> Option<&Retention> {
        self.retention.get(host).or_else(|| self.retention.get("*")).map(|(policy, _)| policy)
    }

    /// Folds the records (name → bytes) into the state. A record that does not parse is
    /// skipped and named in the returned list: one damaged file does not stop the vault.
    fn fold(files: &HashMap<String, Arc<Vec<u8>>>) -> (State, Vec<String>) {
        let mut state = State::default();
        let mut damaged = Vec::new();
        let mut revoked: HashMap<&str, i64> = HashMap::new();
        let mut attempts: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut immutability: Vec<(&str, Immutability)> = Vec::new();
        let mut retention: BTreeMap<&str, (&str, Retention)> = BTreeMap::new();
        let mut hosts = Vec::new();
        let mut names: Vec<&String> = files.keys().collect();
        names.sort();
        for name in names {
            let body = files[name].as_slice();
            let parts: Vec<&str> = name.split('~').collect();
            let ok = match parts.as_slice() {
                ["h", token_hash] => serde_json::from_slice::<HostRecord>(body)
                    .map(|r| {
                        hosts.push(Host {
                            name: r.name,
                            token_hash: token_hash.to_string(),
                            registered_ns: r.registered_ns,
                            revoked_ns: None,
                        })
                    })
                    .is_ok(),
                ["r", token_hash] => {
                    serde_json::from_slice::<At>(body).map(|r| revoked.insert(token_hash, r.at_ns)).is_ok()
                }
                ["p", secret_hash] => serde_json::from_slice::<Pending>(body)
                    .map(|p| state.pending.insert(secret_hash.to_string(), (p, None)))
                    .is_ok(),
                ["u", secret_hash, _, _] => {
                    attempts.entry(secret_hash).or_default().push(name);
                    true
                }
                ["g", from, to] => {
                    state.grants.push(Grant { from: from.to_string(), to: to.to_string() });
                    true
                }
                ["v", version] => {
                    serde_json::from_slice::<Owner>(body).map(|o| state.versions.insert(version.to_string(), o)).is_ok()
                }
                ["d", version] => serde_json::from_slice::<At>(body)
                    .map(|r| state.deleted.insert(version.to_string(), r.at_ns))
                    .is_ok(),
                ["l", lease] => serde_json::from_slice::<LeaseRecord>(body)
                    .map(|r| state.locks.insert(lease.to_string(), r.host))
                    .is_ok(),
                ["i", _, _] => serde_json::from_slice::<ImmutabilityRecord>(body)
                    .map(|r| immutability.push((name, r.state)))
                    .is_ok(),
                ["k", scope, _, _] => serde_json::from_slice::<Retention>(body)
                    .map(|policy| {
                        // Names sort by time: the last one read is the newest.
                        retention.insert(scope, (name, policy));
                    })
                    .is_ok(),
                _ => false,
            };
            if !ok {
                damaged.push(name.clone());
            }
        }
        for (secret_hash, mut tries) in attempts {
            tries.sort();
            if let (Some(entry), Some(first)) = (state.pending.get_mut(secret_hash), tries.first()) {
                entry.1 = first.split('~').nth(2).and_then(|t| t.parse().ok());
            }
        }
        for host in &mut hosts {
            host.revoked_ns = revoked.get(host.token_hash.as_str()).copied();
        }
        hosts.sort_by(|a, b| (a.registered_ns, &a.token_hash).cmp(&(b.registered_ns, &b.token_hash)));
        state.hosts = hosts;
        // A lock is forever; otherwise the newest record (names sort by time) says.
        state.immutability = if let Some((name, _)) = immutability.iter().find(|(_, s)| *s == Immutability::Locked) {
            (Immutability::Locked, time_of(name))
        } else {
            immutability.last().map_or((Immutability::Disabled, 0), |(name, s)| (*s, time_of(name)))
        };
        state.retention =
            retention.into_iter().map(|(scope, (name, policy))| (scope.to_string(), (policy, time_of(name)))).collect();
        (state, damaged)
    }
}

/// The time in a record name `KIND~…~TIME~RANDOM`.
fn time_of(name: &str) -> i64 {
    let parts: Vec<&str> = name.split('~').collect();
    parts.len().checked_sub(2).and_then(|i| parts[i].parse().ok()).unwrap_or(0)
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct HostRecord {
    name: String,
    registered_ns: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct At {
    at_ns: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct LeaseRecord {
    host: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct ImmutabilityRecord {
    state: Immutability,
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

/// A unique suffix for a record of an event: `TIME~RANDOM` (names sort by time).
fn stamp(now_ns: i64) -> String {
    format!("{now_ns:020}~{}", &secret()[..16])
}

fn failed(what: &str, error: BackendError) -> EngineError {
    let code = sysstate_repo::RepoError::from(error);
    EngineError::new(code.code(), format!("cannot {what} the vault's records: {code}"))
        .with_resolution("check the vault's storage (`storage` in its `vault.toml`) and its log")
}

/// The records in a storage, read through a cache: a file, once read, is never read again
/// (records are written once); a refresh lists them and reads only the new ones.
#[derive(Debug)]
pub struct Records {
    storage: Arc<dyn Backend>,
    cache: Mutex<Cache>,
    /// Held while a host is added: this process's registrations one at a time.
    adding: Mutex<()>,
}

#[derive(Debug, Default)]
struct Cache {
    files: HashMap<String, Arc<Vec<u8>>>,
    state: Arc<State>,
    loaded: Option<Instant>,
}

impl Records {
    /// The records in `storage`.
    pub fn new(storage: Arc<dyn Backend>) -> Records {
        Records { storage, cache: Mutex::new(Cache::default()), adding: Mutex::new(()) }
    }

    /// The state as read at most `max_age` ago (`Duration::ZERO`: read now).
    pub fn state(&self, max_age: Duration) -> Result<Arc<State>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.loaded.is_some_and(|at| at.elapsed() <= max_age) && !max_age.is_zero() {
            return Ok(cache.state.clone());
        }
        let listed = self.storage.list(FileKind::VaultRecord).map_err(|e| failed("list", e))?;
        let mut files = HashMap::with_capacity(listed.len());
        for (name, _) in listed {
            let body = match cache.files.get(&name) {
                Some(body) => body.clone(),
                None => match self.storage.read(FileKind::VaultRecord, &name) {
                    Ok(body) => Arc::new(body),
                    // Removed since it was listed (an undelete, a released lease).
                    Err(error) if error.kind == ErrorKind::NotFound => continue,
                    Err(error) => return Err(failed("read", error)),
                },
            };
            files.insert(name, body);
        }
        let (state, damaged) = State::fold(&files);
        if !damaged.is_empty() {
            sysstate_engine::errln!("sysstate vault: records that do not parse, skipped: {}", damaged.join(", "));
        }
        cache.files = files;
        cache.state = Arc::new(state);
        cache.loaded = Some(Instant::now());
        Ok(cache.state.clone())
    }

    /// The state as it is now.
    pub fn fresh(&self) -> Result<Arc<State>> {
        self.state(Duration::ZERO)
    }

    /// What this process wrote (`Some`) or removed (`None`) goes into the cached state at once,
    /// without listing the records again (a listing of an object store takes tens of
    /// milliseconds, and every lease a host takes writes a record). When a write or removal
    /// failed, what it did is unknown: the next read lists.
    fn changed(&self, name: &str, body: Option<Vec<u8>>, done: bool) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if !done || cache.loaded.is_none() {
            cache.loaded = None;
            return;
        }
        match body {
            Some(body) => cache.files.insert(name.to_string(), Arc::new(body)),
            None => cache.files.remove(name),
        };
        cache.state = Arc::new(State::fold(&cache.files).0);
    }

    fn write(&self, name: &str, body: &impl Serialize) -> Result<()> {
        let bytes = serde_json::to_vec(body).expect("a record encodes");
        let written = self.storage.write(FileKind::VaultRecord, name, &bytes);
        self.changed(name, Some(bytes), written.is_ok());
        written.map_err(|e| failed("write", e))
    }

    fn remove(&self, name: &str) -> Result<()> {
        let removed = self.storage.remove(FileKind::VaultRecord, name);
        self.changed(name, None, removed.is_ok());
        removed.map_err(|e| failed("remove", e))
    }

    /// One record read from the storage itself (not the cache): `None` when there is none.
    fn read_one<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>> {
        match self.storage.read(FileKind::VaultRecord, name) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(error) if error.kind == ErrorKind::NotFound => Ok(None),
            Err(error) => Err(failed("read", error)),
        }
    }

    /// Records that `host` added `pack` (an empty file `vault-added/PACK~HOST`, outside the
    /// records the servers cache: there is one for each pack).
    pub fn note_addition(&self, pack: &str, host: &str) -> Result<()> {
        self.storage.write(FileKind::VaultAddition, &format!("{pack}~{host}"), b"").map_err(|e| failed("write", e))
    }

    /// Which host added each pack (the first by name where two sent the same pack).
    pub fn additions(&self) -> Result<std::collections::HashMap<String, String>> {
        let listed = self.storage.list(FileKind::VaultAddition).map_err(|e| failed("list", e))?;
        let mut added = std::collections::HashMap::new();
        for (name, _) in listed {
            if let Some((pack, host)) = name.split_once('~') {
                added.entry(pack.to_string()).or_insert_with(|| host.to_string());
            }
        }
        Ok(added)
    }

    /// Records a credentials file for `host`, by the hash of its secret.
    pub fn add_pending(&self, secret_hash: &str, pending: &Pending) -> Result<()> {
        self.write(&format!("p~{secret_hash}"), pending)
    }

    /// Drops the credentials files of `host` that were not used.
    pub fn drop_unused_pending(&self, host: &str) -> Result<()> {
        let state = self.fresh()?;
        for (secret_hash, (pending, used)) in &state.pending {
            if pending.host == host && used.is_none() {
                self.remove(&format!("p~{secret_hash}"))?;
            }
        }
        Ok(())
    }

    /// Records an attempt to register with the credentials file of `secret_hash` at `now_ns`,
    /// then reads every attempt: true when this one is the earliest (it used the file).
    pub fn try_use(&self, secret_hash: &str, now_ns: i64) -> Result<bool> {
        let name = format!("u~{secret_hash}~{}", stamp(now_ns));
        self.write(&name, &At { at_ns: now_ns })?;
        let listed = self.storage.list(FileKind::VaultRecord).map_err(|e| failed("list", e))?;
        let prefix = format!("u~{secret_hash}~");
        let first = listed.iter().map(|(n, _)| n).filter(|n| n.starts_with(&prefix)).min();
        Ok(first == Some(&name))
    }

    /// Registers `name` with the token of `token_hash`; then, of the active hosts of that name,
    /// keeps the earliest: false (and this registration revoked) when another came first.
    pub fn add_host(&self, name: &str, token_hash: &str, now_ns: i64) -> Result<bool> {
        // This process's registrations are serialized and each sees those before it: a name
        // registered a moment ago is taken, whatever the clock says. (Between two vault
        // processes the earliest record wins, as below.)
        let _adding = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        if self.fresh()?.host(name).is_some() {
            return Ok(false);
        }
        self.write(&format!("h~{token_hash}"), &HostRecord { name: name.to_string(), registered_ns: now_ns })?;
        let state = self.fresh()?;
        let first = state.host(name).map(|h| h.token_hash.clone());
        if first.as_deref() != Some(token_hash) {
            self.write(&format!("r~{token_hash}"), &At { at_ns: now_ns })?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Revokes the host whose token has `token_hash`.
    pub fn revoke(&self, token_hash: &str, now_ns: i64) -> Result<()> {
        self.write(&format!("r~{token_hash}"), &At { at_ns: now_ns })
    }

    /// Lets `to` read `from`'s versions.
    pub fn grant(&self, from: &str, to: &str) -> Result<()> {
        self.write(&format!("g~{from}~{to}"), &serde_json::json!({}))
    }

    /// The owner of `version`, from the storage itself.
    pub fn owner(&self, version: &str) -> Result<Option<Owner>> {
        self.read_one(&format!("v~{version}"))
    }

    /// Records `host` as the writer of `version`, arrived at `now_ns`; a version some other host
    /// wrote first stays that host's (`Err` with the owner's name).
    pub fn set_owner(&self, version: &str, host: &str, now_ns: i64) -> Result<std::result::Result<(), String>> {
        if let Some(owner) = self.owner(version)? {
            return Ok(if owner.host == host { Ok(()) } else { Err(owner.host) });
        }
        self.write(&format!("v~{version}"), &Owner { host: host.to_string(), received_ns: now_ns })?;
        Ok(Ok(()))
    }

    /// The holder of lease `lease`, from the storage itself.
    pub fn lease_holder(&self, lease: &str) -> Result<Option<String>> {
        Ok(self.read_one::<LeaseRecord>(&format!("l~{lease}"))?.map(|r| r.host))
    }

    /// Records `host` as the holder of `lease`.
    pub fn set_lease_holder(&self, lease: &str, host: &str) -> Result<()> {
        self.write(&format!("l~{lease}"), &LeaseRecord { host: host.to_string() })
    }

    /// Forgets the holder of a released lease.
    pub fn drop_lease(&self, lease: &str) -> Result<()> {
        self.remove(&format!("l~{lease}"))
    }

    /// Soft-deletes `version` at `now_ns` (a version soft-deleted already keeps its time).
    pub fn soft_delete(&self, version: &str, now_ns: i64) -> Result<()> {
        if self.read_one::<At>(&format!("d~{version}"))?.is_some() {
            return Ok(());
        }
        self.write(&format!("d~{version}"), &At { at_ns: now_ns })
    }

    /// Brings a soft-deleted version back.
    pub fn undelete(&self, version: &str) -> Result<()> {
        self.remove(&format!("d~{version}"))
    }

    /// Forgets a purged version (its manifest is gone).
    pub fn purged(&self, version: &str) -> Result<()> {
        self.remove(&format!("d~{version}"))?;
        self.remove(&format!("v~{version}"))
    }

    /// Records the vault's immutability from `now_ns`.
    pub fn set_immutability(&self, state: Immutability, now_ns: i64) -> Result<()> {
        self.write(&format!("i~{}", stamp(now_ns)), &ImmutabilityRecord { state })
    }

    /// Records the retention policy of `scope` (a host, or `*`) from `now_ns`.
    pub fn set_retention(&self, scope: &str, policy: &Retention, now_ns: i64) -> Result<()> {
        self.write(&format!("k~{scope}~{}", stamp(now_ns)), policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> (tempfile::TempDir, Records) {
        let dir = tempfile::tempdir().unwrap();
        let storage = sysstate_repo::backend::open_target(dir.path().join("s").to_str().unwrap()).unwrap();
        storage.create().unwrap();
        (dir, Records::new(storage))
    }

    #[test]
    fn the_first_registration_of_a_name_wins_and_the_second_is_revoked() {
        let (_dir, records) = records();
        assert!(records.add_host("web1", &hash("a"), 10).unwrap());
        assert!(!records.add_host("web1", &hash("b"), 20).unwrap());
        let state = records.fresh().unwrap();
        assert_eq!(state.host_of_token("a").unwrap().name, "web1");
        assert!(state.host_of_token("b").is_none(), "the loser's token is revoked");
        records.revoke(&hash("a"), 30).unwrap();
        assert!(records.fresh().unwrap().host("web1").is_none());
        assert!(records.add_host("web1", &hash("c"), 40).unwrap(), "a revoked name is free again");
    }

    #[test]
    fn a_registration_that_read_the_clock_earlier_but_comes_later_loses() {
        let (_dir, records) = records();
        assert!(records.add_host("web1", &hash("a"), 20).unwrap());
        // Its clock reading is the earlier, but the name was taken when it came.
        assert!(!records.add_host("web1", &hash("b"), 10).unwrap(), "both registrations won");
        let state = records.fresh().unwrap();
        assert_eq!(state.host("web1").unwrap().token_hash, hash("a"), "the first host lost its name");
    }

    #[test]
    fn a_credentials_file_is_used_by_its_first_attempt_only() {
        let (_dir, records) = records();
        records.add_pending("s", &Pending { host: "web1".into(), made_ns: 1, expires_ns: 100 }).unwrap();
        assert!(records.try_use("s", 5).unwrap());
        assert!(!records.try_use("s", 6).unwrap());
        assert_eq!(records.fresh().unwrap().pending["s"].1, Some(5));
    }

    #[test]
    fn a_lock_of_immutability_is_forever_and_the_newest_policy_says() {
        let (_dir, records) = records();
        records.set_immutability(Immutability::Enabled, 1).unwrap();
        assert_eq!(records.fresh().unwrap().immutability, (Immutability::Enabled, 1));
        records.set_immutability(Immutability::Locked, 2).unwrap();
        records.set_immutability(Immutability::Disabled, 3).unwrap();
        assert_eq!(records.fresh().unwrap().immutability.0, Immutability::Locked);
        records.set_retention("*", &Retention { daily: 7, ..Default::default() }, 1).unwrap();
        records.set_retention("*", &Retention { daily: 9, ..Default::default() }, 2).unwrap();
        records.set_retention("web1", &Retention { last: 2, ..Default::default() }, 3).unwrap();
        let state = records.fresh().unwrap();
        assert_eq!(state.retention_of("web2").unwrap().daily, 9);
        assert_eq!(state.retention_of("web1").unwrap().last, 2);
    }

    #[test]
    fn what_this_process_writes_is_in_its_state_at_once_without_a_listing() {
        let (_dir, records) = records();
        records.fresh().unwrap();
        // Another vault process's record: seen only when the records are listed again.
        Records::new(records.storage.clone()).set_owner("v9", "web2", 1).unwrap().unwrap();
        records.set_lease_holder("l1", "web1").unwrap();
        let cached = records.state(Duration::from_secs(600)).unwrap();
        assert_eq!(cached.locks.get("l1").map(String::as_str), Some("web1"));
        assert!(!cached.versions.contains_key("v9"), "the write listed the records again");
        records.drop_lease("l1").unwrap();
        assert!(!records.state(Duration::from_secs(600)).unwrap().locks.contains_key("l1"));
        assert!(records.fresh().unwrap().versions.contains_key("v9"));
    }

    #[test]
    fn a_damaged_record_is_skipped_and_named() {
        let (_dir, records) = records();
        records.set_owner("v1", "web1", 5).unwrap().unwrap();
        records.storage.write(FileKind::VaultRecord, "v~v2", b"not json").unwrap();
        let state = records.fresh().unwrap();
        assert_eq!(state.versions["v1"].host, "web1");
        assert!(!state.versions.contains_key("v2"));
        assert_eq!(records.set_owner("v1", "web2", 6).unwrap(), Err("web1".to_string()));
    }
}
