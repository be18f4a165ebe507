//! The vault's own jobs, each recorded in the vault's job store (`sysstate.db` in its folder)
//! with its events, as a host's are: `verify` (every index file and manifest read and checked
//! against its name, and every pack or a rotating sample of them), `retention` (soft-deletes what the policies
//! drop) and `purge` (versions soft-deleted longer ago than the window). `sysstate vault serve`
//! runs them every day; `sysstate vault verify|retention apply|purge` runs one now.

use crate::Vault;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use sysstate_engine::jobs::{self, JobKind, JobOutput, JobStore, JobTrigger, Source};
use sysstate_engine::{EngineError, ErrorCode, Result};
use sysstate_repo::backend::{ErrorKind, FileKind};
use sysstate_repo::{Id, NoProgress};

/// The vault's job store.
pub fn store(dir: &Path) -> Result<Arc<JobStore>> {
    Ok(Arc::new(JobStore::open(dir)?))
}

/// What a verify found.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyReport {
    /// Files read.
    pub checked: usize,
    /// Packs in the storage (a sample reads some of them).
    pub packs: usize,
    /// Packs read.
    pub packs_checked: usize,
    /// Bytes read.
    pub bytes: u64,
    /// Files whose bytes do not match their names (or that could not be read), with why.
    pub damaged: Vec<String>,
}

impl JobOutput for VerifyReport {
    fn failure(&self) -> Option<EngineError> {
        (!self.damaged.is_empty()).then(|| {
            EngineError::new(
                ErrorCode::RepositoryCorrupt,
                format!(
                    "{} files of the vault's storage are damaged: {}",
                    self.damaged.len(),
                    self.damaged.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
                ),
            )
            .with_resolution(
                "the hosts still hold their local repositories: replicate again from them (`sysstate copy --to vault://…` sends what the vault lacks once the damaged files are moved away), and check the vault's disks or object store",
            )
        })
    }
}

/// Which packs a verify of `percent` reads on day `day`: a window of the sorted names that
/// moves on each day, so that every pack is read within `100 / percent` days.
fn sample(packs: &[String], percent: u8, day: i64) -> Vec<&String> {
    if percent >= 100 || packs.is_empty() {
        return packs.iter().collect();
    }
    let size = (packs.len() * percent as usize).div_ceil(100).max(1);
    let start = (day.rem_euclid(packs.len().div_ceil(size) as i64) as usize) * size;
    packs.iter().skip(start).take(size).collect()
}

/// Reads every index file and manifest, and every pack (or a rotating `sample` percent of them),
/// each checked against its name (a hash of its bytes: the vault needs no key for it). Keys and
/// the config are not named by their bytes, and are not checked.
pub fn verify(vault: &Vault, sample_percent: u8, job: &jobs::Job<'_>) -> Result<VerifyReport> {
    let storage = &vault.storage;
    let listing = |kind| storage.list(kind).map_err(|e| EngineError::from(sysstate_repo::RepoError::from(e)));
    let packs: Vec<String> = listing(FileKind::Pack)?.into_iter().map(|(name, _)| name).collect();
    let day = crate::now().div_euclid(86_400 * 1_000_000_000);
    let chosen = sample(&packs, sample_percent, day);
    let mut report =
        VerifyReport { checked: 0, packs: packs.len(), packs_checked: chosen.len(), bytes: 0, damaged: Vec::new() };
    let mut files: Vec<(FileKind, String)> = Vec::new();
    for kind in [FileKind::Index, FileKind::Version] {
        files.extend(listing(kind)?.into_iter().map(|(name, _)| (kind, name)));
    }
    files.extend(chosen.into_iter().map(|name| (FileKind::Pack, name.clone())));
    job.operation(&format!("reading {} files ({} of {} packs)", files.len(), report.packs_checked, packs.len()));
    for (kind, name) in files {
        let path = kind.path(&name);
        match storage.read(kind, &name) {
            Ok(bytes) => {
                report.checked += 1;
                report.bytes += bytes.len() as u64;
                if Id::from_hex(&name) != Some(Id::of_stored(&bytes)) {
                    let message = format!("`{path}`: its bytes do not match its name");
                    job.warn(Source::Repository, ErrorCode::RepositoryCorrupt, &message);
                    report.damaged.push(message);
                }
            }
            // Purged or pruned since the listing.
            Err(error) if error.kind == ErrorKind::NotFound => {}
            Err(error) => {
                let message = format!("`{path}`: {error}");
                job.warn(Source::Repository, ErrorCode::RepositoryCorrupt, &message);
                report.damaged.push(message);
            }
        }
    }
    Ok(report)
}

/// Runs one of the vault's jobs now; its report, or why it failed.
pub fn run<T: JobOutput>(
    vault: &Vault,
    kind: JobKind,
    trigger: JobTrigger,
    work: impl FnOnce(&jobs::Job<'_>) -> Result<T>,
) -> Result<T> {
    let store = store(&vault.dir)?;
    jobs::run_triggered(&store, kind, trigger, Some(&vault.config.storage), &[], &NoProgress, work)
}

/// The versions a retention job soft-deleted.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Dropped {
    /// Each with its host.
    pub versions: Vec<crate::HostVersion>,
    /// Only said, not done.
    pub dry_run: bool,
}

impl JobOutput for Dropped {}

/// The versions a purge deleted.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Purged {
    /// Their ids.
    pub purged: Vec<String>,
}

impl JobOutput for Purged {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_moves_on_each_day_and_reads_every_pack_in_turn() {
        let packs: Vec<String> = (0..10).map(|n| format!("{n:02}")).collect();
        let mut seen = std::collections::BTreeSet::new();
        for day in 0..4 {
            let chosen = sample(&packs, 30, day);
            assert_eq!(chosen.len(), if day == 3 { 1 } else { 3 });
            seen.extend(chosen.into_iter().cloned());
        }
        assert_eq!(seen.len(), 10, "four days of 30 % read every pack");
        assert_eq!(sample(&packs, 100, 7).len(), 10);
    }
}
