//! The engine's side of the shadow copy service: writers and storage from the config, and
//! shadow errors turned into engine errors with this machine's specifics.

use crate::config::Config;
use crate::error::{EngineError, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use sysstate_shadow::storage::{MaxSize, StorageArea};
use sysstate_shadow::writer::{
    CommandWriter, FsfreezeWriter, LockFileWriter, PostgresWriter, ProcessWriter, DEFAULT_FREEZE_TIMEOUT,
    DEFAULT_PHASE_TIMEOUT,
};
use sysstate_shadow::{ShadowError, Writer};
use sysstate_types::ErrorCode;

/// Parses `10s`, `500ms`, `2m`, `1h` or a number of seconds.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: use `500ms`, `10s`, `2m`, `1h`, `90d`, `2w` or `1y`"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        "w" => value * 7.0 * 86400.0,
        "y" => value * 365.0 * 86400.0,
        other => return Err(format!("`{text}`: unknown unit `{other}`")),
    };
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|duration| *duration <= MAX_DURATION)
        .ok_or_else(|| format!("`{text}` is too long: at most 100 years (`36500d`)"))
}

/// The longest duration taken anywhere: far beyond any sensible wait or retention, and far from
/// the overflow of a time in nanoseconds.
const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

fn invalid(message: String) -> EngineError {
    EngineError::new(ErrorCode::InvalidInput, message)
}

/// The writers that serve any of `components` (a writer with no components serves every
/// backup): the config's, and the built-in `dpkg` and `accounts` writers for the `packages` and
/// `accounts` components unless the config defines writers of those names.
pub fn writers(
    config: &Config,
    root: &Path,
    components: &[String],
    set_id: &str,
    protected: &[(String, PathBuf)],
) -> Result<Vec<Box<dyn Writer>>> {
    let mut out: Vec<Box<dyn Writer>> = Vec::new();
    let configured = |name: &str| config.writers.iter().any(|w| w.name == name);
    if components.iter().any(|c| c == "packages") && !configured("dpkg") && root.join("var/lib/dpkg").is_dir() {
        out.push(Box::new(LockFileWriter::dpkg("dpkg", root, DEFAULT_PHASE_TIMEOUT, DEFAULT_FREEZE_TIMEOUT)));
    }
    if components.iter().any(|c| c == "accounts") && !configured("accounts") && root.join("etc").is_dir() {
        out.push(Box::new(LockFileWriter::accounts("accounts", root, DEFAULT_PHASE_TIMEOUT, DEFAULT_FREEZE_TIMEOUT)));
    }
    for writer in &config.writers {
        if !writer.components.is_empty() && !writer.components.iter().any(|c| components.contains(c)) {
            continue;
        }
        let window = match &writer.freeze_timeout {
            Some(text) => {
                parse_duration(text).map_err(|e| invalid(format!("writer `{}`: freeze-timeout {e}", writer.name)))?
            }
            None => DEFAULT_FREEZE_TIMEOUT,
        };
        let prepare = match &writer.prepare_timeout {
            Some(text) => {
                parse_duration(text).map_err(|e| invalid(format!("writer `{}`: prepare-timeout {e}", writer.name)))?
            }
            None => DEFAULT_PHASE_TIMEOUT,
        };
        match writer.kind.as_str() {
            "command" => out.push(Box::new(CommandWriter::new(
                &writer.name,
                writer.prepare.clone(),
                writer.freeze.clone(),
                writer.thaw.clone(),
                writer.abort.clone(),
                window,
            ))),
            "process" => {
                let argv = writer.command.clone().filter(|c| !c.is_empty()).ok_or_else(|| {
                    invalid(format!(
                        "writer `{}` of kind `process` needs `command = [\"/path/to/writer\", …]`",
                        writer.name
                    ))
                })?;
                out.push(Box::new(ProcessWriter::new(&writer.name, argv, window, set_id)));
            }
            "dpkg" => out.push(Box::new(LockFileWriter::dpkg(&writer.name, root, prepare, window))),
            "accounts" => out.push(Box::new(LockFileWriter::accounts(&writer.name, root, prepare, window))),
            "fsfreeze" => {
                let mounts = writer.mount_points.clone().filter(|m| !m.is_empty()).ok_or_else(|| {
                    invalid(format!(
                        "writer `{}` of kind `fsfreeze` needs `mount-points = [\"/srv/data\"]`",
                        writer.name
                    ))
                })?;
                out.push(Box::new(FsfreezeWriter::new(
                    &writer.name,
                    mounts.iter().map(PathBuf::from).collect(),
                    protected.to_vec(),
                    window,
                )));
            }
            "postgresql" => {
                let data = writer.data_directory.clone().ok_or_else(|| {
                    invalid(format!(
                        "writer `{}` of kind `postgresql` needs `data-directory = \"/var/lib/postgresql/15/main\"`",
                        writer.name
                    ))
                })?;
                let psql = writer
                    .command
                    .clone()
                    .filter(|c| !c.is_empty())
                    .unwrap_or_else(|| vec!["psql".into(), "-U".into(), "postgres".into()]);
                out.push(Box::new(PostgresWriter::new(&writer.name, psql, PathBuf::from(data), window)));
            }
            other => {
                return Err(invalid(format!(
                    "writer `{}`: unknown kind `{other}`: use command, process, postgresql, fsfreeze, dpkg or accounts",
                    writer.name
                )))
            }
        }
    }
    Ok(out)
}

/// A writer as `sysstate writers` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterEntry {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// The components it serves (empty: every backup).
    pub components: Vec<String>,
    /// True for the built-in `dpkg` and `accounts` writers.
    pub builtin: bool,
}

/// Every writer a backup may run: the built-in `dpkg` (for `packages`) and `accounts` (for
/// `accounts`) unless the config defines writers of those names, then the config's.
pub fn writer_entries(config: &Config) -> Vec<WriterEntry> {
    let configured = |name: &str| config.writers.iter().any(|w| w.name == name);
    let builtin = ["dpkg", "accounts"].into_iter().filter(|name| !configured(name)).map(|name| WriterEntry {
        name: name.into(),
        kind: name.into(),
        components: vec![if name == "dpkg" { "packages".into() } else { "accounts".into() }],
        builtin: true,
    });
    builtin
        .chain(config.writers.iter().map(|w| WriterEntry {
            name: w.name.clone(),
            kind: w.kind.clone(),
            components: w.components.clone(),
            builtin: false,
        }))
        .collect()
}

/// The components a writer makes consistent: those named by a configured writer, and `packages`
/// and `accounts`, which the built-in `dpkg` and `accounts` writers serve.
pub fn served_components(config: &Config) -> Vec<String> {
    let mut served: Vec<String> = config.writers.iter().flat_map(|w| w.components.iter().cloned()).collect();
    served.extend(["packages".to_string(), "accounts".to_string()]);
    served
}

/// A `shadowstorage resize`, kept in the state directory; it overrides the config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StorageSetting {
    /// The volume.
    #[serde(rename = "for")]
    pub for_volume: String,
    /// The location.
    pub on: String,
    /// The maximum size.
    pub max_size: String,
}

fn settings_path(state_dir: &Path) -> PathBuf {
    state_dir.join("shadowstorage.json")
}

/// The resize settings.
pub fn read_settings(state_dir: &Path) -> Vec<StorageSetting> {
    std::fs::read(settings_path(state_dir)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// Stores a resize setting (replacing one for the same volume).
pub fn write_setting(state_dir: &Path, setting: StorageSetting) -> Result<()> {
    let mut settings = read_settings(state_dir);
    settings.retain(|s| s.for_volume != setting.for_volume);
    settings.push(setting);
    let path = settings_path(state_dir);
    crate::paths::create_private_dir(state_dir)
        .and_then(|_| std::fs::write(&path, serde_json::to_vec_pretty(&settings).expect("settings encode")))
        .map_err(|e| EngineError::new(ErrorCode::StateDirPermission, format!("cannot write `{}`: {e}", path.display())))
}

/// Sets a storage area's maximum size (`sysstate shadowstorage resize`), kept in the state
/// directory over the config. Shrinking below what is used deletes the oldest copies that no
/// longer fit, each a `shadow-storage-oldest-deleted` warning in the event log; returns those
/// warnings' messages.
pub fn resize(state_dir: &Path, setting: StorageSetting) -> Result<Vec<String>> {
    let size = MaxSize::parse(&setting.max_size).map_err(|e| invalid(format!("`--max-size`: {e}")))?;
    let area = StorageArea { for_volume: (&setting.for_volume).into(), on: (&setting.on).into(), max_size: size };
    write_setting(state_dir, setting)?;
    let deleted = area.make_room(0).unwrap_or_default();
    let store = crate::jobs::JobStore::open(state_dir).ok();
    let mut warnings = Vec::new();
    for copy in &deleted {
        let message = format!(
            "deleted shadow copy {} of `{}` (made {}) from `{}`: it no longer fits in the new maximum of {size}",
            copy.id,
            copy.for_volume,
            sysstate_types::time::format_utc(copy.created_ns),
            area.on.display()
        );
        if let Some(store) = &store {
            let data =
                serde_json::json!({"id": copy.id, "volume": copy.for_volume, "location": area.on, "bytes": copy.bytes});
            let code = ErrorCode::ShadowStorageOldestDeleted;
            let _ = store.event(None, code.level(), crate::jobs::Source::Shadow, code, &message, Some(data));
        }
        warnings.push(message);
    }
    Ok(warnings)
}

/// Which persistent shadow copies `sysstate shadows delete` deletes.
#[derive(Debug, Clone)]
pub enum CopySelector {
    /// The one copy whose id starts with this.
    Id(String),
    /// The oldest copy.
    Oldest,
    /// Every copy.
    All,
}

/// Deletes the chosen shadow copies; returns their ids.
pub fn delete_copies(config: &Config, state_dir: &Path, selector: &CopySelector) -> Result<Vec<String>> {
    let areas = storage_areas(config, state_dir)?;
    let mut copies: Vec<_> = areas.iter().flat_map(|a| a.copies().into_iter().map(move |c| (a, c))).collect();
    copies.sort_by_key(|(_, c)| c.created_ns);
    let chosen: Vec<_> = match selector {
        CopySelector::All => copies,
        CopySelector::Oldest => copies.into_iter().take(1).collect(),
        CopySelector::Id(id) => {
            let found: Vec<_> = copies.into_iter().filter(|(_, c)| c.id.starts_with(id.as_str())).collect();
            if found.len() != 1 {
                return Err(invalid(format!(
                    "`--id {id}` matches {} shadow copies: `sysstate shadows list` shows them",
                    found.len()
                )));
            }
            found
        }
    };
    let mut deleted = Vec::new();
    for (area, copy) in chosen {
        area.delete(&copy.id).map_err(shadow_error)?;
        deleted.push(copy.id);
    }
    Ok(deleted)
}

/// Every storage area: the config's, overridden by resizes, and the default (`/` on
/// `STATE/shadow`, 10%) when none is for `/`.
pub fn storage_areas(config: &Config, state_dir: &Path) -> Result<Vec<StorageArea>> {
    let mut settings: Vec<StorageSetting> = config
        .shadow
        .storage
        .iter()
        .map(|s| StorageSetting {
            for_volume: s.for_volume.clone(),
            on: s.on.clone(),
            max_size: s.max_size.clone().unwrap_or_else(|| "10%".into()),
        })
        .collect();
    for resized in read_settings(state_dir) {
        settings.retain(|s| s.for_volume != resized.for_volume);
        settings.push(resized);
    }
    if !settings.iter().any(|s| s.for_volume == "/") {
        settings.push(StorageSetting {
            for_volume: "/".into(),
            on: state_dir.join("shadow").display().to_string(),
            max_size: "10%".into(),
        });
    }
    settings
        .into_iter()
        .map(|s| {
            let max_size = MaxSize::parse(&s.max_size)
                .map_err(|e| invalid(format!("shadow storage for `{}`: max-size {e}", s.for_volume)))?;
            Ok(StorageArea { for_volume: PathBuf::from(&s.for_volume), on: PathBuf::from(&s.on), max_size })
        })
        .collect()
}

/// The mount point holding `path` (from `/proc/self/mountinfo`, the longest match).
pub fn mount_point(path: &Path) -> PathBuf {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.as_os_str().len())
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// The storage area for a shadow set of files under `root`: the one for its volume, else the
/// one for `/`.
pub fn storage_for(config: &Config, state_dir: &Path, root: &Path) -> Result<StorageArea> {
    let areas = storage_areas(config, state_dir)?;
    let volume = mount_point(root);
    let chosen =
        areas.iter().find(|a| a.for_volume == volume).or_else(|| areas.iter().find(|a| a.for_volume == Path::new("/")));
    Ok(chosen.expect("a storage for `/` always exists").clone())
}

/// A shadow error as the administrator reads it.
pub fn shadow_error(error: ShadowError) -> EngineError {
    let code = error.code();
    let message = error.to_string();
    let engine = EngineError::new(code, message).with_data(shadow_error_data(&error));
    match error {
        ShadowError::InProgress(holder) => engine
            .with_cause(format!("{holder} holds the machine's shadow-set lock; only one shadow set runs at a time"))
            .with_resolution(format!("wait for pid {} to finish, or run with `--wait 10m` to wait for it", holder.pid)),
        ShadowError::StorageFull { volume, location, used, needed, .. } => engine
            .with_cause(format!(
                "the shadow storage on `{location}` cannot hold a copy of `{volume}` of {} next to {} of other copies",
                sysstate_types::units::bytes(needed),
                sysstate_types::units::bytes(used)
            ))
            .with_resolution(format!(
                "free space on `{location}`, delete persistent copies with `sysstate shadows delete --oldest`, or raise the limit: `{}`",
                sysstate_shadow::storage::resize_command(&volume, &location, used, needed)
            )),
        ShadowError::WriterTimeout(timeout) => engine.with_resolution(format!(
            "if the system was busy, retry when it is quieter; if another backup was running, retry after it; if writer `{}` needs longer than {} ms, raise its `freeze-timeout`",
            timeout.writer, timeout.window_ms
        )),
        _ => engine,
    }
}

/// The specifics of a shadow failure as data, for the doctor: the typed value itself where
/// there is one (the doctor reads it back as that type).
fn shadow_error_data(error: &ShadowError) -> serde_json::Value {
    use serde_json::json;
    match error {
        ShadowError::Writer(failure) => {
            json!({"writer": failure.writer, "phase": failure.phase, "writer-message": failure.message})
        }
        ShadowError::WriterTimeout(timeout) => serde_json::to_value(timeout).expect("a timeout encodes"),
        ShadowError::InProgress(holder) => serde_json::to_value(holder).expect("a holder encodes"),
        ShadowError::CommitTimeout { provider, elapsed_ms, limit_ms } => {
            json!({"provider": provider, "elapsed-ms": elapsed_ms, "limit-ms": limit_ms})
        }
        ShadowError::StorageFull { volume, location, max_size, used, free, needed } => json!({
            "volume": volume, "location": location, "max-size": max_size, "used": used, "free": free, "needed": needed,
        }),
        ShadowError::Provider { provider, path, .. } => json!({"provider": provider, "path": path}),
        ShadowError::Interrupted(signal) => json!({"signal": signal}),
        ShadowError::Config(_) | ShadowError::Io { .. } => serde_json::Value::Null,
    }
}

/// What an `fsfreeze` writer must never freeze: the filesystems sysstate writes to.
pub fn protected_paths(config: &Config, root: &Path, target: Option<&str>) -> Result<Vec<(String, PathBuf)>> {
    let state_dir = crate::paths::state_dir();
    let mut protected = vec![
        ("state directory".to_string(), state_dir.clone()),
        ("runtime directory".to_string(), crate::paths::runtime_dir()),
        ("shadow storage".to_string(), storage_for(config, &state_dir, root)?.on),
    ];
    if let Some(target) = target.filter(|t| !t.contains("://")) {
        protected.push(("backup target".to_string(), PathBuf::from(target)));
    }
    if let Ok(exe) = std::env::current_exe() {
        protected.push(("sysstate binary".to_string(), exe));
    }
    Ok(protected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_durations_are_refused_not_panicked_on() {
        assert_eq!(parse_duration("36500d").unwrap(), MAX_DURATION);
        for absurd in ["300000000000000d", "1e400", "99999999999999999999999999999999999h", "36501d"] {
            let error = parse_duration(absurd).unwrap_err();
            assert!(error.contains(absurd), "{error}");
        }
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 fortnights").is_err());
    }
}
