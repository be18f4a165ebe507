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
}

impl Config {
    /// `[jobs] retention`, parsed.
    pub fn job_retention(&self) -> Result<std::time::Duration> {
        match &self.jobs.retention {
            None => Ok(crate::jobs::RETENTION),
            Some(text) => crate::shadow::parse_duration(text)
                .map_err(|e| EngineError::new(ErrorCode::InvalidInput, format!("`jobs.retention`: {e}"))),
        }
    }
}

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
                return Err(EngineError::new(
                    ErrorCode::InvalidInput,
                    format!("cannot read the config file `{}`: {error}", file.display()),
                )
                .with_resolution("check the path given with `--config` or `SYSSTATE_CONFIG`"))
            }
        };
        if file.exists() {
            config.sources.push(file.to_path_buf());
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
                config.components.extend(extra.components);
                config.writers.extend(extra.writers);
                config.sources.push(path);
            }
        }
        Ok(config)
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
