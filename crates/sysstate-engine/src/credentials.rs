//! Passphrases: from a passphrase file (`--passphrase-file`, which wins when both are given),
//! `SYSSTATE_PASSPHRASE`, or a key file that sysstate made in the state directory for a target
//! created without any passphrase (mode 0600). An empty passphrase is refused wherever it comes
//! from: it would protect nothing.

use crate::error::{EngineError, Result};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use sysstate_types::ErrorCode;

/// The state-directory key file for a target.
pub fn stored_key_path(state_dir: &Path, target: &str) -> PathBuf {
    let digest = sysstate_repo::Id::of_stored(target.as_bytes());
    state_dir.join("keys").join(format!("{}.key", &digest.to_hex()[..16]))
}

/// Reads a passphrase file (one trailing newline is dropped).
pub fn read_passphrase_file(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = std::fs::read(path).map_err(|error| {
        EngineError::new(
            ErrorCode::WrongPassphrase,
            format!("cannot read the passphrase file `{}`: {error}", path.display()),
        )
        .with_resolution("check the path given with `--passphrase-file`")
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
    let stored = stored_key_path(state_dir, target);
    if stored.exists() {
        return read_passphrase_file(&stored).map(Some);
    }
    Ok(None)
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
