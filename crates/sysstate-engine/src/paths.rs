//! Where sysstate keeps its files (DESIGN §4 "Paths").

use std::path::{Path, PathBuf};

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"))
}

fn xdg(var: &str, fallback: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| home().join(fallback))
}

/// The config file: `SYSSTATE_CONFIG`, else `/etc/sysstate/config.toml` as root, else XDG.
pub fn config_file() -> PathBuf {
    if let Some(path) = std::env::var_os("SYSSTATE_CONFIG") {
        return PathBuf::from(path);
    }
    if is_root() {
        PathBuf::from("/etc/sysstate/config.toml")
    } else {
        xdg("XDG_CONFIG_HOME", ".config").join("sysstate/config.toml")
    }
}

/// The state directory: `SYSSTATE_STATE_DIR`, else `/var/lib/sysstate` as root, else XDG.
pub fn state_dir() -> PathBuf {
    if let Some(path) = std::env::var_os("SYSSTATE_STATE_DIR") {
        return PathBuf::from(path);
    }
    if is_root() {
        PathBuf::from("/var/lib/sysstate")
    } else {
        xdg("XDG_STATE_HOME", ".local/state").join("sysstate")
    }
}

/// The runtime directory: `SYSSTATE_RUNTIME_DIR`, else `/run/sysstate` as root, else XDG.
pub fn runtime_dir() -> PathBuf {
    if let Some(path) = std::env::var_os("SYSSTATE_RUNTIME_DIR") {
        return PathBuf::from(path);
    }
    if is_root() {
        PathBuf::from("/run/sysstate")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir).join("sysstate")
    }
}

/// The agent's API socket: in `SYSSTATE_RUNTIME_DIR` when it is set, else the machine's
/// (`/run/sysstate/agent.sock`) when an agent runs there, else in this user's runtime folder.
pub fn agent_socket() -> PathBuf {
    const NAME: &str = "agent.sock";
    if std::env::var_os("SYSSTATE_RUNTIME_DIR").is_some() {
        return runtime_dir().join(NAME);
    }
    let machine = PathBuf::from("/run/sysstate").join(NAME);
    if machine.exists() {
        return machine;
    }
    runtime_dir().join(NAME)
}

/// The default backup target when the config names none.
pub fn default_target() -> String {
    if is_root() {
        "/var/backups/sysstate".into()
    } else {
        xdg("XDG_DATA_HOME", ".local/share").join("sysstate/backups").display().to_string()
    }
}

/// Writes `bytes` to `path` so that after a crash the file holds either its old content or all
/// of the new: a temporary file beside it, fsynced, renamed over it, and the directory fsynced.
/// The file is readable by its owner only.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let temp = dir.join(format!(".{}.tmp", path.file_name().unwrap_or_default().to_string_lossy()));
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `dir` (and missing parents) readable by its owner only (mode 0700), as the state
/// directory must be; an existing directory is left as it is (`sysstate doctor` checks it).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Refuses a state directory that others can write: they could plant a key file, alter the
/// job records or replace undo data.
pub fn require_private(state_dir: &Path) -> crate::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(state_dir) else { return Ok(()) };
    if meta.mode() & 0o022 == 0 {
        return Ok(());
    }
    Err(crate::EngineError::new(
        sysstate_types::ErrorCode::StateDirPermission,
        format!(
            "the state directory `{}` can be written by others (mode {:o})",
            state_dir.display(),
            meta.mode() & 0o7777
        ),
    )
    .with_cause("anyone who can write there can plant a key file, alter the job records or replace undo data")
    .with_resolution(format!(
        "`chmod 700 {}` (or `sysstate doctor --fix`), then run the backup again",
        state_dir.display()
    )))
}
