//! The effective configuration (`sysstate config show`): every key with the value a command
//! uses — the file's, or the default — laid out as the file is, so it can be read as one.

use crate::config::Config;
use crate::error::Result;
use serde::Serialize;
use std::path::Path;

/// The whole effective configuration.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Effective {
    /// The files it was read from (none: the embedded defaults).
    pub sources: Vec<String>,
    /// `[backup]`.
    pub backup: Backup,
    /// `[shadow]`.
    pub shadow: Shadow,
    /// `[jobs]`.
    pub jobs: Jobs,
    /// `[storage]`.
    pub storage: StorageSettings,
    /// `[[component]]`: the built-ins and the file's.
    pub component: Vec<Component>,
    /// `[[writer]]`: the built-ins and the file's.
    pub writer: Vec<Writer>,
}

/// `[backup]`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Backup {
    /// Where versions go.
    pub target: String,
    /// What a backup takes without `--component`.
    pub components: Vec<String>,
}

/// `[shadow]`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Shadow {
    /// The provider.
    pub provider: String,
    /// The commit timeout.
    pub commit_timeout: String,
    /// Every storage area, resizes applied.
    pub storage: Vec<Storage>,
}

/// `[[shadow.storage]]`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Storage {
    /// The volume.
    #[serde(rename = "for")]
    pub for_volume: String,
    /// Where the copies live.
    pub on: String,
    /// The limit.
    pub max_size: String,
}

/// `[jobs]`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Jobs {
    /// How long ended jobs are kept.
    pub retention: String,
    /// The most the undo folders take together.
    pub undo_max_size: String,
}

/// `[storage]`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StorageSettings {
    /// Requests in flight at once to a remote repository.
    pub connections: usize,
    /// Whether remote repositories are read through a local cache.
    pub cache: bool,
    /// The most the cache of one repository holds.
    pub cache_max_size: String,
}

/// `[[component]]`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Component {
    /// Its name.
    pub name: String,
    /// Its paths.
    pub paths: Vec<String>,
    /// What is left out.
    pub exclude: Vec<String>,
    /// Whether locks are checked.
    pub lock_check: bool,
    /// Built in, or from the file.
    pub built_in: bool,
}

/// `[[writer]]`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Writer {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// What it serves (empty: every backup).
    pub components: Vec<String>,
    /// The freeze window.
    pub freeze_timeout: String,
    /// The prepare limit.
    pub prepare_timeout: String,
    /// Built in, or from the file.
    pub built_in: bool,
}

/// The effective configuration of `config`, with the state directory's resizes.
pub fn effective(config: &Config, state_dir: &Path) -> Result<Effective> {
    let seconds = |d: std::time::Duration| format!("{}s", d.as_secs());
    let default_window = seconds(sysstate_shadow::writer::DEFAULT_FREEZE_TIMEOUT);
    let default_prepare = seconds(sysstate_shadow::writer::DEFAULT_PHASE_TIMEOUT);
    let components = crate::components::all(config)?;
    let writers = crate::shadow::writer_entries(config)
        .into_iter()
        .map(|entry| {
            let configured = config.writers.iter().find(|w| w.name == entry.name && !entry.builtin);
            Writer {
                freeze_timeout: configured
                    .and_then(|w| w.freeze_timeout.clone())
                    .unwrap_or_else(|| default_window.clone()),
                prepare_timeout: configured
                    .and_then(|w| w.prepare_timeout.clone())
                    .unwrap_or_else(|| default_prepare.clone()),
                name: entry.name,
                kind: entry.kind,
                components: entry.components,
                built_in: entry.builtin,
            }
        })
        .collect();
    Ok(Effective {
        sources: config.sources.iter().map(|p| p.display().to_string()).collect(),
        backup: Backup {
            target: config.backup.target.clone().unwrap_or_else(crate::paths::default_target),
            components: config
                .backup
                .components
                .clone()
                .unwrap_or_else(|| components.iter().map(|c| c.name.clone()).collect()),
        },
        shadow: Shadow {
            provider: config.shadow.provider.clone().unwrap_or_else(|| "auto".into()),
            commit_timeout: config
                .shadow
                .commit_timeout
                .clone()
                .unwrap_or_else(|| seconds(crate::config::DEFAULT_COMMIT_TIMEOUT)),
            storage: crate::shadow::storage_areas(config, state_dir)?
                .into_iter()
                .map(|area| Storage {
                    for_volume: area.for_volume.display().to_string(),
                    on: area.on.display().to_string(),
                    max_size: area.max_size.setting(),
                })
                .collect(),
        },
        jobs: Jobs {
            retention: config
                .jobs
                .retention
                .clone()
                .unwrap_or_else(|| format!("{}d", crate::jobs::RETENTION.as_secs() / 86_400)),
            undo_max_size: config
                .jobs
                .undo_max_size
                .clone()
                .unwrap_or_else(|| crate::config::DEFAULT_UNDO_MAX_SIZE.into()),
        },
        storage: StorageSettings {
            connections: config.connections()?,
            cache: config.storage.cache.unwrap_or(true),
            cache_max_size: config
                .storage
                .cache_max_size
                .clone()
                .unwrap_or_else(|| crate::config::DEFAULT_CACHE_MAX_SIZE.into()),
        },
        component: components
            .into_iter()
            .map(|c| Component {
                name: c.name,
                paths: c.paths,
                exclude: c.exclude,
                lock_check: c.lock_check,
                built_in: c.builtin,
            })
            .collect(),
        writer: writers,
    })
}
