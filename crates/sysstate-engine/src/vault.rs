//! This host's side of a vault: the credentials `sysstate agent register` keeps (in the state
//! folder, 0600), and the backend of a `vault://` target made from them.

use crate::error::{EngineError, Result};
use std::path::PathBuf;
use std::sync::Arc;
use sysstate_repo::backend::vault::VaultCredentials;
use sysstate_repo::backend::Backend;
use sysstate_types::ErrorCode;

/// Where this host keeps its vault credentials.
pub fn credentials_path() -> PathBuf {
    crate::paths::state_dir().join("vault").join("credentials.json")
}

/// This host's credentials for `vault` (`vault://HOST:PORT`).
pub fn credentials(vault: &str) -> Result<VaultCredentials> {
    let path = credentials_path();
    let text = std::fs::read(&path).map_err(|error| {
        EngineError::new(
            ErrorCode::VaultForbidden,
            format!("this host is not registered with a vault: cannot read `{}`: {error}", path.display()),
        )
        .with_resolution("register it: `sysstate vault credentials --host NAME` on the vault, then `sysstate agent register FILE` here")
    })?;
    let credentials: VaultCredentials = serde_json::from_slice(&text).map_err(|error| {
        EngineError::new(ErrorCode::InvalidInput, format!("`{}` is not vault credentials: {error}", path.display()))
            .with_resolution("register the host again (`sysstate agent register FILE`)")
    })?;
    if credentials.vault.trim_end_matches('/') != vault.trim_end_matches('/') {
        return Err(EngineError::new(
            ErrorCode::VaultForbidden,
            format!("this host is registered with `{}`, not with `{vault}`", credentials.vault),
        )
        .with_resolution(format!("use `--target {}`, or register with that vault", credentials.vault)));
    }
    Ok(credentials)
}

/// Keeps `credentials` (0600, replacing what was there).
pub fn save(credentials: &VaultCredentials) -> Result<PathBuf> {
    let path = credentials_path();
    let dir = path.parent().expect("the credentials live in a folder");
    crate::paths::create_private_dir(dir).map_err(|error| {
        EngineError::new(ErrorCode::StateDirPermission, format!("cannot create `{}`: {error}", dir.display()))
    })?;
    let text = serde_json::to_vec_pretty(credentials).expect("credentials encode");
    crate::paths::write_durably(&path, &text).map_err(|error| {
        EngineError::new(ErrorCode::StateDirPermission, format!("cannot write `{}`: {error}", path.display()))
    })?;
    Ok(path)
}

/// The backend of a `vault://` target.
pub fn backend(target: &str) -> Result<Arc<dyn Backend>> {
    let credentials = credentials(target)?;
    sysstate_repo::backend::open_vault(&credentials).map_err(|e| EngineError::from(sysstate_repo::RepoError::from(e)))
}
