//! Every operation on a repository, as Options → (Plan) → Report (rustic_core's model): the
//! binary, the doctor and the agent call these and print or record what they return. Each takes
//! the lease it needs itself; none prints.
//!
//! - [`backup`]: a shadow set of the components, read into a new version;
//! - [`restore`]: a version to an alternate root (in place: [`crate::inplace`]);
//! - [`upkeep`]: check, forget (plan, then execute), prune (plan, then execute), copy;
//! - [`keys`]: list, add, remove, change the passphrase;
//! - [`read`]: versions and the items of one.

pub mod backup;
pub mod keys;
pub mod read;
pub mod restore;
pub mod upkeep;

pub use backup::{backup, create_persistent, recover_shadow_set, BackupReport, BackupRequest, KeptJournal};
pub use restore::{component_scope, restore_to, RestoreReport, RestoreRequest};

use crate::error::{EngineError, Result};
use std::sync::Arc;
use sysstate_repo::backend::{self, Backend};
use sysstate_repo::keys::KdfParams;
use sysstate_repo::{DamageHook, Repository};

/// Opens the backend of a target.
pub fn backend(target: &str) -> Result<Arc<dyn Backend>> {
    if target.starts_with("vault://") {
        return crate::vault::backend(target);
    }
    backend::open_target(target).map_err(|e| EngineError::from(sysstate_repo::RepoError::from(e)))
}

/// Opens the repository at `target` and loads its index, reading the repository itself (a
/// check or a repair: never through the cache; a remote one through a scratch cache this
/// command fills from the repository, so that trees are read a pack at a time).
pub fn open(target: &str, passphrase: &[u8]) -> Result<Repository> {
    let repo = Repository::open(backend(target)?, passphrase)?;
    let repo = match repo.backend().is_remote() {
        true => {
            let base = crate::paths::state_dir().join("cache");
            let scratch = sysstate_repo::cache::Cache::scratch(&base, &repo.config().id)
                .inspect_err(|error| tracing::warn!("no scratch cache in `{}`: {error}", base.display()))
                .ok();
            repo.with_cache(scratch)
        }
        false => repo,
    };
    repo.load_index()?;
    Ok(repo)
}

/// Opens the repository at `target`, through its local cache when it is remote (see
/// [`cache_for`]), and loads its index, telling `hook` each damaged file passed over (now and
/// later).
pub fn open_with(
    target: &str,
    passphrase: &[u8],
    hook: DamageHook,
    config: &crate::config::Config,
) -> Result<Repository> {
    let repo = cached(Repository::open(backend(target)?, passphrase)?, config)?.with_damage_hook(hook);
    repo.load_index()?;
    Ok(repo)
}

/// The local cache for `repo` when its storage is remote and the config keeps one (see
/// `sysstate_repo::cache`), in the state folder. A cache that cannot be made is a warning in the
/// log: the repository is read without it.
fn cache_for(repo: &Repository, config: &crate::config::Config) -> Result<Option<sysstate_repo::cache::Cache>> {
    let Some(max_bytes) = config.cache_max_bytes()? else { return Ok(None) };
    if !repo.backend().is_remote() {
        return Ok(None);
    }
    let base = crate::paths::state_dir().join("cache");
    match sysstate_repo::cache::Cache::open(&base, &repo.config().id, max_bytes) {
        Ok(cache) => Ok(Some(cache)),
        Err(error) => {
            tracing::warn!("no local cache for `{}`: cannot make `{}`: {error}", repo.location(), base.display());
            Ok(None)
        }
    }
}

/// `repo` as the config says to reach its storage: through its cache (see [`cache_for`]), with
/// `[storage] connections` requests at once.
pub fn cached(repo: Repository, config: &crate::config::Config) -> Result<Repository> {
    let cache = cache_for(&repo, config)?;
    Ok(repo.with_cache(cache).with_connections(config.connections()?))
}

/// Opens the repository of `backend`, or creates it when the target has none (of concurrent
/// creators one wins; the others open its repository). True when this call created it.
pub fn open_or_create(backend: Arc<dyn Backend>, passphrase: &[u8]) -> Result<(Repository, bool)> {
    if !Repository::exists(&*backend)? {
        match Repository::init(backend.clone(), passphrase, KdfParams::default()) {
            Err(sysstate_repo::RepoError::AlreadyExists { .. }) => {}
            created => return Ok((created?, true)),
        }
    }
    Ok((Repository::open(backend, passphrase)?, false))
}

/// [`open_or_create`], but a repository made here takes the key of the vault this host
/// replicates to (`[vault] url`) when the vault holds a repository already (opened with
/// `[vault] passphrase-file`, else `passphrase`), so that replication sends packs as they are.
/// A vault that cannot be reached or opened leaves the new repository a key of its own: its
/// replication then seals every blob again (the job says `re-encrypted`).
pub fn open_or_create_for(
    backend: Arc<dyn Backend>,
    passphrase: &[u8],
    config: &crate::config::Config,
) -> Result<(Repository, bool)> {
    if Repository::exists(&*backend)? {
        return Ok((Repository::open(backend, passphrase)?, false));
    }
    let vault = config.vault.url.as_deref().and_then(|url| {
        let vault_passphrase = match &config.vault.passphrase_file {
            Some(file) => crate::credentials::read_passphrase_file(file).ok()?,
            None => passphrase.to_vec(),
        };
        let vault_backend = crate::vault::backend(url).ok()?;
        Repository::open(vault_backend, &vault_passphrase).ok()
    });
    match vault {
        Some(vault) => open_or_create_like(backend, &vault, passphrase),
        None => open_or_create(backend, passphrase),
    }
}

/// Opens the repository at `backend`, or creates it with `like`'s key and parameters
/// ([`Repository::init_like`]); true when created here (another creator may have come first).
pub fn open_or_create_like(
    backend: Arc<dyn Backend>,
    like: &Repository,
    passphrase: &[u8],
) -> Result<(Repository, bool)> {
    if Repository::exists(&*backend)? {
        return Ok((Repository::open(backend, passphrase)?, false));
    }
    match Repository::init_like(backend.clone(), like, passphrase, KdfParams::default()) {
        Err(sysstate_repo::RepoError::AlreadyExists { .. }) => Ok((Repository::open(backend, passphrase)?, false)),
        created => Ok((created?, true)),
    }
}

/// Creates a repository at `target` (`sysstate init`): refused where one stands already, and
/// where the target is no place for one (see `docs/FORMAT.md`, "Creating a repository").
pub fn init(target: &str, passphrase: &[u8]) -> Result<Repository> {
    Ok(Repository::init(backend(target)?, passphrase, KdfParams::default())?)
}

/// True when `target` holds a repository.
pub fn exists(target: &str) -> Result<bool> {
    Ok(Repository::exists(&*backend(target)?)?)
}
