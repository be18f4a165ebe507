//! The configuration file (DESIGN §4 "Config keys"): TOML, kebab-case, and an unknown key is an
//! error that names the key and the file.

use crate::error::{EngineError, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use sysstate_types::ErrorCode;

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// `[backup]`.
    #[serde(default)]
    pub backup: BackupSection,
    /// `[shadow]`.
    #[serde(default)]
    pub shadow: ShadowSection,
    /// `[jobs]`.
    #[serde(default)]
    pub jobs: JobsSection,
    /// `[storage]`.
    #[serde(default)]
    pub storage: StorageSection,
    /// `[schedule]`: the agent's schedules.
    #[serde(default)]
    pub schedule: crate::schedule::ScheduleSection,
    /// `[retention]`: the policy the agent applies after each scheduled backup.
    #[serde(default)]
    pub retention: RetentionSection,
    /// `[agent]`: the agent's API.
    #[serde(default)]
    pub agent: AgentSection,
    /// `[notify]`: whom the agent tells of failures.
    #[serde(default)]
    pub notify: NotifySection,
    /// `[metrics]`: the agent's metrics for Prometheus.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// `[vault]`: the vault this host replicates to.
    #[serde(default)]
    pub vault: VaultSection,
    /// `[[component]]`: administrators' components, added to the defaults (or replacing one of
    /// the same name).
    #[serde(default, rename = "component")]
    pub components: Vec<ComponentConfig>,
    /// `[[writer]]`.
    #[serde(default, rename = "writer")]
    pub writers: Vec<WriterConfig>,
    /// Files the config was read from, for messages.
    #[serde(skip)]
    pub sources: Vec<PathBuf>,
}

/// `[backup]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BackupSection {
    /// Where versions go.
    pub target: Option<String>,
    /// Which components a backup takes by default.
    pub components: Option<Vec<String>>,
}

/// `[jobs]`: the job history and event log.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct JobsSection {
    /// How long ended jobs, their events, logs and undo folders are kept (`90d`, the default).
    pub retention: Option<String>,
    /// The most the undo folders of in-place restores may take together (`1GiB`, the default);
    /// the oldest go first, the newest is always kept.
    pub undo_max_size: Option<String>,
}

/// `[storage]`: how sysstate works with a remote repository (object storage).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StorageSection {
    /// Requests in flight at once to a remote repository (8, the default; 1 to 64).
    pub connections: Option<usize>,
    /// Keep a local cache of remote repositories' index, manifests and trees (`true`, the
    /// default).
    pub cache: Option<bool>,
    /// The most the cache of one repository may hold (`1GiB`, the default).
    pub cache_max_size: Option<String>,
}

/// `[retention]`: which versions the agent keeps after each scheduled backup, per group (as
/// `sysstate forget` takes them).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RetentionSection {
    /// The newest N.
    pub last: Option<usize>,
    /// The newest of each of the last N days.
    pub daily: Option<usize>,
    /// … weeks.
    pub weekly: Option<usize>,
    /// … months.
    pub monthly: Option<usize>,
    /// … years.
    pub yearly: Option<usize>,
    /// Every version within this long before the group's newest (`2d`).
    pub within: Option<String>,
    /// What makes a group (`host,root,components`, the default).
    pub group_by: Option<String>,
}

impl RetentionSection {
    /// The policy and its groups; `None` when the section sets no rule (the agent then keeps
    /// every version). A section with only `group-by` is refused: it would keep nothing.
    pub fn policy(&self) -> Result<Option<(sysstate_repo::forget::Policy, sysstate_repo::forget::GroupBy)>> {
        let invalid = |detail: String| EngineError::new(ErrorCode::InvalidInput, detail);
        let within_ns = match &self.within {
            Some(text) => Some(
                crate::shadow::parse_duration(text).map_err(|e| invalid(format!("`retention.within`: {e}")))?.as_nanos()
                    as i64,
            ),
            None => None,
        };
        let policy = sysstate_repo::forget::Policy {
            last: self.last.unwrap_or(0),
            daily: self.daily.unwrap_or(0),
            weekly: self.weekly.unwrap_or(0),
            monthly: self.monthly.unwrap_or(0),
            yearly: self.yearly.unwrap_or(0),
            within_ns,
            tags: Vec::new(),
        };
        let group_by = match &self.group_by {
            Some(text) => sysstate_repo::forget::GroupBy::parse(text)
                .map_err(|e| invalid(format!("`retention.group-by`: {e}")))?,
            None => sysstate_repo::forget::GroupBy::default(),
        };
        if policy.is_empty() {
            if self.group_by.is_some() {
                return Err(invalid("`[retention]` has `group-by` but no rule: it would keep no version".into())
                    .with_resolution("add a rule (`daily = 7`, `within = \"2d\"`, …) or remove the section"));
            }
            return Ok(None);
        }
        Ok(Some((policy, group_by)))
    }
}

/// `[agent]`: who may use the agent's API (root always may).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentSection {
    /// Members of this group may start and cancel jobs, as root.
    pub admin_group: Option<String>,
    /// Members of this group may read status, jobs, logs and events.
    pub read_group: Option<String>,
}

/// `[vault]`: the vault the agent replicates each new version to (`sysstate agent register`
/// registers the host with it).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VaultSection {
    /// `vault://NAME:PORT`.
    pub url: Option<String>,
    /// The vault repository's passphrase, from this file (default: the local repository's).
    pub passphrase_file: Option<std::path::PathBuf>,
    /// The most replication sends per second outside work hours (`20MiB`; default: no limit).
    pub bandwidth: Option<String>,
    /// Work hours, local time (`08:00-18:00`), when `work-hours-bandwidth` is the limit.
    pub work_hours: Option<String>,
    /// The days work hours apply (default: mon to fri).
    pub work_days: Option<Vec<String>>,
    /// The most replication sends per second in work hours (`2MiB`; default: no limit).
    pub work_hours_bandwidth: Option<String>,
}

impl VaultSection {
    /// The bandwidth schedule of replication.
    pub fn bandwidth(&self) -> Result<crate::schedule::Bandwidth> {
        crate::schedule::Bandwidth::parse(
            self.bandwidth.as_deref(),
            self.work_hours.as_deref(),
            self.work_days.as_deref(),
            self.work_hours_bandwidth.as_deref(),
        )
        .map_err(|(key, detail)| EngineError::new(ErrorCode::InvalidInput, format!("`{key}`: {detail}")))
    }
}

/// `[metrics]`: where the agent's metrics go (both are opt-in).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MetricsSection {
    /// An address to serve `GET /metrics` on (`127.0.0.1:9466`).
    pub listen: Option<String>,
    /// A file for node_exporter's textfile collector (`/var/lib/prometheus/node-exporter/sysstate.prom`).
    pub textfile: Option<String>,
}

impl MetricsSection {
    /// The listen address, checked.
    pub fn listen_address(&self) -> Result<Option<std::net::SocketAddr>> {
        self.listen
            .as_deref()
            .map(|text| {
                text.parse().map_err(|_| {
                    EngineError::new(
                        ErrorCode::InvalidInput,
                        format!("`metrics.listen`: `{text}` is not an address and port (`127.0.0.1:9466`)"),
                    )
                })
            })
            .transpose()
    }
}

/// `[notify]`: the agent's notifications.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NotifySection {
    /// What is told: `failure`, `warning`, `no-success-for 26h` (default: failure and warning).
    pub on: Option<Vec<String>>,
    /// A URL that gets each notice as a JSON POST.
    pub webhook: Option<String>,
    /// E-mail.
    pub mail: Option<MailConfig>,
    /// `hourly`: one message an hour with every notice since (default: one message each).
    pub digest: Option<String>,
}

/// `[notify] mail`: to whom, through which server (or the local `sendmail`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MailConfig {
    /// The recipient (`root@localhost`).
    pub to: String,
    /// The sender (default: `sysstate@` and the host name).
    pub from: Option<String>,
    /// An SMTP server (`host:port`), spoken to in plain SMTP (a local relay).
    pub smtp: Option<String>,
    /// The local `sendmail` program (the default when no `smtp` is given: `/usr/sbin/sendmail`).
    pub sendmail: Option<String>,
}

/// What `[notify] on` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyRules {
    /// A failed job (critical).
    pub failure: bool,
    /// A job that ended with warnings (warning).
    pub warning: bool,
    /// No successful backup for this long (critical; fires even when no job ran).
    pub no_success_for: Option<std::time::Duration>,
    /// One message an hour.
    pub hourly: bool,
}

impl NotifySection {
    /// True when a target is configured.
    pub fn has_targets(&self) -> bool {
        self.webhook.is_some() || self.mail.is_some()
    }

    /// The rules, checked.
    pub fn rules(&self) -> Result<NotifyRules> {
        let invalid = |detail: String| EngineError::new(ErrorCode::InvalidInput, detail);
        let mut rules = NotifyRules::default();
        let default = ["failure".to_string(), "warning".to_string()];
        for rule in self.on.as_deref().unwrap_or(&default) {
            match rule.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["failure"] => rules.failure = true,
                ["warning"] => rules.warning = true,
                ["no-success-for", duration] => {
                    rules.no_success_for = Some(
                        crate::shadow::parse_duration(duration)
                            .map_err(|e| invalid(format!("`notify.on`: `{rule}`: {e}")))?,
                    )
                }
                _ => {
                    return Err(invalid(format!(
                        "`notify.on`: `{rule}` is not a rule: use `failure`, `warning` or `no-success-for 26h`"
                    )))
                }
            }
        }
        rules.hourly = match self.digest.as_deref() {
            None => false,
            Some("hourly") => true,
            Some(other) => return Err(invalid(format!("`notify.digest`: `{other}`: use `hourly`, or leave it out"))),
        };
        if let Some(url) = &self.webhook {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(format!("`notify.webhook`: `{url}` is not an http:// or https:// URL")));
            }
        }
        if let Some(mail) = &self.mail {
            if mail.smtp.is_some() && mail.sendmail.is_some() {
                return Err(invalid("`notify.mail`: give `smtp` or `sendmail`, not both".into()));
            }
            if mail.to.trim().is_empty() {
                return Err(invalid("`notify.mail.to` is empty".into()));
            }
        }
        Ok(rules)
    }
}

/// `storage.cache-max-size` when the config has none.
pub const DEFAULT_CACHE_MAX_SIZE: &str = "1GiB";

impl Config {
    /// `[storage] connections`, checked.
    pub fn connections(&self) -> Result<usize> {
        match self.storage.connections.unwrap_or(sysstate_repo::DEFAULT_CONNECTIONS) {
            connections @ 1..=64 => Ok(connections),
            other => Err(EngineError::new(
                ErrorCode::InvalidInput,
                format!("`storage.connections = {other}`: give a number from 1 to 64"),
            )),
        }
    }

    /// `[storage] cache-max-size` in bytes, or `None` when the cache is off.
    pub fn cache_max_bytes(&self) -> Result<Option<u64>> {
        if self.storage.cache == Some(false) {
            return Ok(None);
        }
        let text = self.storage.cache_max_size.as_deref().unwrap_or(DEFAULT_CACHE_MAX_SIZE);
        match sysstate_shadow::storage::MaxSize::parse(text) {
            Ok(sysstate_shadow::storage::MaxSize::Bytes(bytes)) => Ok(Some(bytes)),
            Ok(sysstate_shadow::storage::MaxSize::Unbounded) => Ok(Some(u64::MAX)),
            _ => Err(EngineError::new(
                ErrorCode::InvalidInput,
                format!("`storage.cache-max-size = \"{text}\"`: give bytes (`512MiB`, `2GiB`) or `unbounded`"),
            )),
        }
    }
}

/// `jobs.undo-max-size` when the config has none.
pub const DEFAULT_UNDO_MAX_SIZE: &str = "1GiB";

impl Config {
    /// `[jobs] undo-max-size`, in bytes (`None`: unbounded).
    pub fn undo_max_bytes(&self) -> Result<Option<u64>> {
        let text = self.jobs.undo_max_size.as_deref().unwrap_or(DEFAULT_UNDO_MAX_SIZE);
        match sysstate_shadow::storage::MaxSize::parse(text) {
            Ok(sysstate_shadow::storage::MaxSize::Bytes(bytes)) => Ok(Some(bytes)),
            Ok(sysstate_shadow::storage::MaxSize::Unbounded) => Ok(None),
            _ => Err(EngineError::new(
                ErrorCode::InvalidInput,
                format!("`jobs.undo-max-size = \"{text}\"`: give bytes (`512MiB`, `2GiB`) or `unbounded`"),
            )),
        }
    }

    /// `[jobs] retention`, parsed.
    pub fn job_retention(&self) -> Result<std::time::Duration> {
        match &self.jobs.retention {
            None => Ok(crate::jobs::RETENTION),
            Some(text) => crate::shadow::parse_duration(text)
                .map_err(|e| EngineError::new(ErrorCode::InvalidInput, format!("`jobs.retention`: {e}"))),
        }
    }
}

/// `shadow.commit-timeout` when the config has none.
pub const DEFAULT_COMMIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `[shadow]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ShadowSection {
    /// `auto | copy | reflink | btrfs`.
    pub provider: Option<String>,
    /// `10s`.
    pub commit_timeout: Option<String>,
    /// `[[shadow.storage]]`.
    #[serde(default)]
    pub storage: Vec<ShadowStorageConfig>,
}

/// `[[shadow.storage]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ShadowStorageConfig {
    /// The volume whose copies it holds.
    #[serde(rename = "for")]
    pub for_volume: String,
    /// Where they live.
    pub on: String,
    /// `512MiB`, `10%` or `unbounded`.
    pub max_size: Option<String>,
}

/// `[[component]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ComponentConfig {
    /// Its name.
    pub name: String,
    /// Absolute paths.
    pub paths: Vec<String>,
    /// Glob patterns to leave out.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Check for locks before the freeze (default true).
    pub lock_check: Option<bool>,
}

/// `[[writer]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WriterConfig {
    /// Its name.
    pub name: String,
    /// `command | process | postgresql | fsfreeze | dpkg | accounts`.
    pub kind: String,
    /// The components it makes consistent.
    #[serde(default)]
    pub components: Vec<String>,
    /// Command run at prepare.
    pub prepare: Option<Vec<String>>,
    /// Command run at freeze.
    pub freeze: Option<Vec<String>>,
    /// Command run at thaw.
    pub thaw: Option<Vec<String>>,
    /// Command run at abort.
    pub abort: Option<Vec<String>>,
    /// For `process` writers: the program and its arguments.
    pub command: Option<Vec<String>>,
    /// The freeze-to-thaw window.
    pub freeze_timeout: Option<String>,
    /// How long prepare may wait (for the `dpkg` and `accounts` writers: for the lock holder).
    pub prepare_timeout: Option<String>,
    /// For `fsfreeze` writers: the mount points to freeze.
    pub mount_points: Option<Vec<String>>,
    /// For `postgresql` writers: the cluster's data directory (absolute, as seen from the root).
    pub data_directory: Option<String>,
}

impl Config {
    /// Reads `file` and the `components.d/*.toml` and `writers.d/*.toml` beside it. A missing
    /// main file gives the embedded defaults when `required` is false.
    pub fn load(file: &Path, required: bool) -> Result<Config> {
        let mut config = match std::fs::read_to_string(file) {
            Ok(text) => parse(file, &text)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && !required => Config::default(),
            Err(error) => {
                // Say where the path came from: the administrator may never have named it.
                let from = if required {
                    "the path given with `--config`"
                } else if std::env::var_os("SYSSTATE_CONFIG").is_some() {
                    "the path `SYSSTATE_CONFIG` gives"
                } else {
                    "the default config file (`--config FILE` names another)"
                };
                let fix = match error.kind() {
                    std::io::ErrorKind::PermissionDenied => {
                        "let the user sysstate runs as read it (most commands run as root)"
                    }
                    std::io::ErrorKind::NotFound => "create it, or give the right path",
                    _ => "make it a readable file",
                };
                return Err(EngineError::new(
                    ErrorCode::InvalidInput,
                    format!("cannot read the config file `{}`, {from}: {error}", file.display()),
                )
                .with_resolution(format!("{fix}; docs/config.md lists every key")));
            }
        };
        if file.exists() {
            config.sources.push(file.to_path_buf());
            config.validate(file)?;
        }
        let dir = file.parent().unwrap_or(Path::new("."));
        for sub in ["components.d", "writers.d"] {
            let Ok(entries) = std::fs::read_dir(dir.join(sub)) else { continue };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            files.sort();
            for path in files {
                let text = std::fs::read_to_string(&path).map_err(|error| {
                    EngineError::new(
                        ErrorCode::InvalidInput,
                        format!("cannot read the config file `{}`: {error}", path.display()),
                    )
                })?;
                let extra = parse(&path, &text)?;
                extra.validate(&path)?;
                config.components.extend(extra.components);
                config.writers.extend(extra.writers);
                config.sources.push(path);
            }
        }
        Ok(config)
    }
}

impl Config {
    /// Values that parse as TOML but mean nothing: a provider that does not exist, a duration
    /// that is not one. Each named with its key and file, at load, so no command (and not the
    /// doctor) takes a typo for a setting.
    fn validate(&self, file: &Path) -> Result<()> {
        let invalid = |key: &str, detail: String| {
            EngineError::new(ErrorCode::InvalidInput, format!("config file `{}`: `{key}`: {detail}", file.display()))
                .with_cause("the config file has a value sysstate cannot use")
                .with_resolution("correct the value named; docs/config.md lists every key and its values")
        };
        if let Some(provider) = &self.shadow.provider {
            sysstate_shadow::provider::ProviderChoice::parse(provider).map_err(|_| {
                invalid("shadow.provider", format!("`{provider}` is not a provider: use auto, copy, reflink or btrfs"))
            })?;
        }
        let durations = [
            ("shadow.commit-timeout", self.shadow.commit_timeout.as_ref()),
            ("jobs.retention", self.jobs.retention.as_ref()),
        ]
        .into_iter()
        .chain(self.writers.iter().flat_map(|w| {
            [
                ("writer.freeze-timeout", w.freeze_timeout.as_ref()),
                ("writer.prepare-timeout", w.prepare_timeout.as_ref()),
            ]
        }));
        for (key, value) in durations {
            if let Some(value) = value {
                crate::shadow::parse_duration(value).map_err(|e| invalid(key, e))?;
            }
        }
        self.undo_max_bytes().map_err(|e| invalid("jobs.undo-max-size", e.message))?;
        self.connections().map_err(|e| invalid("storage.connections", e.message))?;
        self.cache_max_bytes().map_err(|e| invalid("storage.cache-max-size", e.message))?;
        self.schedule.schedules().map_err(|(key, detail)| invalid(&key, detail))?;
        self.retention.policy().map_err(|e| invalid("retention", e.message))?;
        self.notify.rules().map_err(|e| invalid("notify", e.message))?;
        self.metrics.listen_address().map_err(|e| invalid("metrics", e.message))?;
        self.vault.bandwidth().map_err(|e| invalid("vault", e.message))?;
        if let Some(url) = &self.vault.url {
            if !url.starts_with("vault://") {
                return Err(invalid("vault.url", format!("`{url}` is not a vault URL: write `vault://NAME:PORT`")));
            }
        }
        Ok(())
    }
}

fn parse(file: &Path, text: &str) -> Result<Config> {
    toml::from_str(text).map_err(|error| {
        let detail = error.message().to_string();
        let position = error.span().map(|span| {
            let line = text[..span.start].matches('\n').count() + 1;
            format!(" (line {line})")
        });
        EngineError::new(
            ErrorCode::InvalidInput,
            format!("config file `{}`{}: {detail}", file.display(), position.unwrap_or_default()),
        )
        .with_cause("the config file has a key sysstate does not know, or a value of the wrong type")
        .with_resolution("correct or remove the key named; DESIGN §4 and docs/config.md list every key")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named_with_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, "[backup]\ntarget = \"/x\"\ntargte = \"/y\"\n").unwrap();
        let error = Config::load(&file, true).unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidInput);
        assert!(error.message.contains("targte"), "{}", error.message);
        assert!(error.message.contains("config.toml"), "{}", error.message);
        assert!(error.message.contains("line 3"), "{}", error.message);
    }

    #[test]
    fn values_that_mean_nothing_are_named_with_their_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        for (text, key) in [
            ("[shadow]\nprovider = \"reflnk\"\n", "shadow.provider"),
            ("[shadow]\ncommit-timeout = \"ten seconds\"\n", "shadow.commit-timeout"),
            ("[jobs]\nretention = \"90 days\"\n", "jobs.retention"),
        ] {
            std::fs::write(&file, text).unwrap();
            let error = Config::load(&file, true).unwrap_err();
            assert_eq!(error.code, ErrorCode::InvalidInput);
            assert!(error.message.contains(key) && error.message.contains("config.toml"), "{}", error.message);
        }
    }

    #[test]
    fn components_d_is_merged() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, "[[component]]\nname = \"a\"\npaths = [\"/a\"]\n").unwrap();
        std::fs::create_dir(dir.path().join("components.d")).unwrap();
        std::fs::write(
            dir.path().join("components.d/b.toml"),
            "[[component]]\nname = \"b\"\npaths = [\"/b\"]\nexclude = [\"*.tmp\"]\n",
        )
        .unwrap();
        let config = Config::load(&file, true).unwrap();
        let names: Vec<_> = config.components.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(config.sources.len(), 2);
    }

    #[test]
    fn a_missing_optional_file_gives_defaults() {
        let config = Config::load(Path::new("/nonexistent/sysstate.toml"), false).unwrap();
        assert!(config.components.is_empty());
        assert!(Config::load(Path::new("/nonexistent/sysstate.toml"), true).is_err());
    }
}
