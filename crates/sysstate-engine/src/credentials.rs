//! Passphrases: from a passphrase file (`--passphrase-file`, which wins when both are given),
//! `SYSSTATE_PASSPHRASE`, or a key file that sysstate made in the state directory for a target
//! created without any passphrase (mode 0600). An empty passphrase is refused wherever it comes
//! from: it would protect nothing.

use crate::error::{EngineError, Result};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use sysstate_types::ErrorCode;

/// Where a key generated for a target waits until its repository exists: named after the
/// target as typed (how keys were kept before they were kept by repository).
pub fn stored_key_path(state_dir: &Path, target: &str) -> PathBuf {
    let digest = sysstate_repo::Id::of_stored(target.as_bytes());
    state_dir.join("keys").join(format!("{}.key", &digest.to_hex()[..16]))
}

/// The generated key of the repository with id `id`: found whatever path or URL names it.
pub fn repository_key_path(state_dir: &Path, id: &sysstate_repo::Id) -> PathBuf {
    state_dir.join("keys").join(format!("repository-{}.key", id.to_hex()))
}

/// The id of the repository at `target`, from its config (which is not encrypted).
fn repository_id(target: &str) -> Option<sysstate_repo::Id> {
    let backend = crate::ops::backend(target).ok()?;
    sysstate_repo::Repository::read_config(&*backend).ok().map(|config| config.id)
}

/// The generated key of the repository at `target`, if there is one: by the repository's id,
/// else (a key made for a target before its repository existed, or by an earlier version) by
/// the target as typed, which is then filed under the repository's id.
pub fn settle(target: &str, state_dir: &Path) -> Option<PathBuf> {
    let waiting = stored_key_path(state_dir, target);
    let Some(id) = repository_id(target) else { return waiting.exists().then_some(waiting) };
    let by_id = repository_key_path(state_dir, &id);
    if !by_id.exists() && waiting.exists() && std::fs::rename(&waiting, &by_id).is_err() {
        return Some(waiting);
    }
    by_id.exists().then_some(by_id)
}

/// Reads a passphrase file (one trailing newline is dropped).
pub fn read_passphrase_file(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = std::fs::read(path).map_err(|error| {
        EngineError::new(
            ErrorCode::InvalidInput,
            format!("cannot read the passphrase file `{}`: {error}", path.display()),
        )
        .with_cause("the file named with `--passphrase-file` is missing or unreadable; the repository was not tried")
        .with_resolution("check the path given with `--passphrase-file` (sysstate's generated keys are in the state directory's `keys/`)")
    })?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
    }
    not_empty(bytes, &format!("the passphrase file `{}`", path.display()))
}

/// Refuses an empty passphrase, naming where it came from.
pub fn not_empty(passphrase: Vec<u8>, from: &str) -> Result<Vec<u8>> {
    if passphrase.is_empty() {
        return Err(EngineError::new(ErrorCode::InvalidInput, format!("{from} is empty: an empty passphrase protects nothing"))
            .with_resolution("give a passphrase of at least one character, or none at all for a new repository (a random key is then made and kept in the state directory)"));
    }
    Ok(passphrase)
}

/// A passphrase from a file given explicitly, the environment, or the state directory's key
/// file, if any, in that order.
pub fn find(target: &str, passphrase_file: Option<&Path>, state_dir: &Path) -> Result<Option<Vec<u8>>> {
    if let Some(path) = passphrase_file {
        return read_passphrase_file(path).map(Some);
    }
    if let Some(value) = std::env::var_os("SYSSTATE_PASSPHRASE") {
        let value = std::os::unix::ffi::OsStrExt::as_bytes(value.as_os_str()).to_vec();
        return not_empty(value, "`SYSSTATE_PASSPHRASE`").map(Some);
    }
    match settle(target, state_dir) {
        Some(key) => read_passphrase_file(&key).map(Some),
        None => Ok(None),
    }
}

/// The error for a repository whose passphrase was not given, saying how to give one.
pub fn missing(target: &str, state_dir: &Path) -> EngineError {
    EngineError::new(ErrorCode::WrongPassphrase, format!("no passphrase for the repository at `{target}`"))
        .with_cause("no passphrase was given and there is no terminal to ask on")
        .with_resolution(format!(
            "set `SYSSTATE_PASSPHRASE`, or pass `--passphrase-file FILE`; the keys sysstate generates are kept in `{}` by repository id, and such a key file works as `--passphrase-file`",
            state_dir.join("keys").display()
        ))
}

/// The passphrase of a backup that nobody is there to type one for (the agent, a command
/// without a terminal): as [`find`]; for a target with no repository yet, a random key made and
/// kept in the state directory (true when it was made now). An existing repository without a
/// passphrase is [`missing`].
pub fn unattended(target: &str, passphrase_file: Option<&Path>, state_dir: &Path) -> Result<(Vec<u8>, bool)> {
    if let Some(found) = find(target, passphrase_file, state_dir)? {
        return Ok((found, false));
    }
    if crate::ops::exists(target)? {
        return Err(missing(target, state_dir));
    }
    let (passphrase, _) = generate(target, state_dir)?;
    Ok((passphrase, true))
}

/// Makes a random passphrase for a new target and keeps it in the state directory (0600).
pub fn generate(target: &str, state_dir: &Path) -> Result<(Vec<u8>, PathBuf)> {
    let path = stored_key_path(state_dir, target);
    let dir = path.parent().expect("key files live in a folder");
    let fail = |error: std::io::Error, what: &Path| {
        EngineError::new(
            ErrorCode::StateDirPermission,
            format!("cannot write the key file `{}`: {error}", what.display()),
        )
    };
    crate::paths::create_private_dir(dir).map_err(|e| fail(e, dir))?;
    let mut random = [0u8; 32];
    getrandom::getrandom(&mut random).expect("the kernel's random source is available");
    let passphrase = hex::encode(random).into_bytes();
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(|e| fail(e, &path))?;
    file.write_all(&passphrase).and_then(|_| file.sync_all()).map_err(|e| fail(e, &path))?;
    Ok((passphrase, path))
}
