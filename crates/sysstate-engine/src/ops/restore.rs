//! Restore to an alternate root: a version, or some of its components, written beneath a
//! directory that stands for `/`.

use crate::error::{EngineError, Result};
use crate::jobs::JobOutput;
use std::path::PathBuf;
use sysstate_repo::restorer::{self, RestoreOptions, RestoreStats};
use sysstate_repo::version::Version;
use sysstate_repo::{Id, Progress, Repository, Warning};
use sysstate_types::ErrorCode;

/// What to restore, and where.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// `latest` or an id prefix.
    pub version: String,
    /// Components (empty: the whole version).
    pub components: Vec<String>,
    /// The directory that stands for `/`.
    pub to: PathBuf,
    /// Writer threads (0: one per core).
    pub threads: usize,
}

/// What a restore did.
#[derive(Debug)]
pub struct RestoreReport {
    /// The version restored.
    pub id: Id,
    /// Counters.
    pub stats: RestoreStats,
    /// Entries that could not be restored (everything else was).
    pub warnings: Vec<Warning>,
    /// Those of them that the repository's damage kept out: the restore failed.
    pub damaged: Vec<Warning>,
    /// The target (named in the failure).
    pub target: String,
    /// Why the repository was read without a lease (read-only, or `--no-lock`).
    pub read_without_lease: Option<String>,
}

impl JobOutput for RestoreReport {
    fn warnings(&self) -> usize {
        self.warnings.len()
    }

    /// Files the repository cannot give back whole fail the restore (everything else is
    /// restored): a restore that lacks files is not a success with warnings.
    fn failure(&self) -> Option<EngineError> {
        const NAMED: usize = 10;
        (!self.damaged.is_empty()).then(|| {
            let mut names: Vec<&str> = self.damaged.iter().take(NAMED).map(|w| w.path.as_str()).collect();
            if self.damaged.len() > NAMED {
                names.push("…");
            }
            EngineError::new(
                ErrorCode::RepositoryCorrupt,
                format!(
                    "version {} cannot be restored whole from `{}`: {} entries lack data in the repository ({}); everything else was restored",
                    self.id.short(),
                    self.target,
                    self.damaged.len(),
                    names.join(", ")
                ),
            )
            .with_cause("repository files were damaged or lost after the backup")
            .with_resolution("`sysstate check` names the repair to run; another version may hold these files whole (`sysstate versions`)")
        })
    }
}

/// Restores a version (or some of its components) beneath `request.to`, under a shared lease.
pub fn restore_to(repo: &Repository, request: &RestoreRequest, progress: &dyn Progress) -> Result<RestoreReport> {
    let (id, manifest) = repo.find_version_holding(&request.version, &request.components)?;
    let (include, exclude) = component_scope(&manifest, &id, &request.components)?;
    if request.components.is_empty() {
        progress.total(manifest.stats.bytes_total);
    }
    let lease = repo.read_lease("restore")?;
    let options =
        RestoreOptions { target: request.to.clone(), include, exclude, threads: request.threads, owners: true };
    let outcome = restorer::restore(repo, &id, &options, Some(progress))?;
    Ok(RestoreReport {
        id,
        stats: outcome.stats,
        warnings: outcome.warnings,
        damaged: outcome.damaged,
        target: repo.location(),
        read_without_lease: lease.without(),
    })
}

/// The version's paths of the components `names`, and the paths of other components nested in
/// them (left out: restoring `boot` leaves the ESP to `efi`).
pub fn component_scope(manifest: &Version, id: &Id, names: &[String]) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut include = Vec::new();
    for name in names {
        let record = manifest.components.iter().find(|c| &c.name == name).ok_or_else(|| {
            EngineError::new(ErrorCode::ComponentMissing, format!("version `{}` has no component `{name}`", id.short()))
                .with_resolution(format!(
                    "choose among the version's components: {}",
                    manifest.components.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
                ))
        })?;
        include.extend(record.paths.iter().map(PathBuf::from));
    }
    // A path belongs to the component with the longest path above it: restoring `boot` leaves
    // out the ESP, which is `efi`'s.
    let exclude = manifest
        .components
        .iter()
        .filter(|c| !names.contains(&c.name))
        .flat_map(|c| c.paths.iter().map(PathBuf::from))
        .filter(|other| include.iter().any(|p| other.starts_with(p) && other != p))
        .collect();
    Ok((include, exclude))
}
