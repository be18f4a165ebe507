//! What a queued request runs: each an ordinary job of the engine's runner, through the same
//! operations the CLI calls (`ops::backup`, `ops::upkeep::{forget, prune, check}`), its record
//! saying what started it. After a scheduled backup that succeeded, the retention policy runs as
//! a `forget` job of its own.

use crate::daemon::{say, Shared};
use serde::Serialize;
use std::sync::Arc;
use sysstate_engine::config::Config;
use sysstate_engine::jobs::{self, Job, JobKind, JobTrigger};
use sysstate_engine::ops::{self, upkeep, BackupRequest};
use sysstate_engine::schedule::ScheduledWork;
use sysstate_engine::{credentials, paths, Result};
use sysstate_repo::NoProgress;
use sysstate_shadow::ThawTrigger;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Work {
    /// A system state backup of these components (none: the config's).
    Backup {
        /// Components named.
        components: Vec<String>,
    },
    /// A prune.
    Prune,
    /// A check; with `read_data`, reading that percentage of the packs.
    Check {
        /// Percent of the packs read (none: the structure only).
        read_data: Option<u8>,
    },
}

impl Work {
    /// What a schedule runs, as the config says.
    pub fn scheduled(work: ScheduledWork, config: &Config) -> Work {
        match work {
            ScheduledWork::Backup => Work::Backup { components: Vec::new() },
            ScheduledWork::Prune => Work::Prune,
            ScheduledWork::Check => Work::Check { read_data: None },
            ScheduledWork::CheckReadData => {
                Work::Check { read_data: Some(config.schedule.read_data_sample().unwrap_or(5)) }
            }
        }
    }

    /// The kind of job it runs: one of each kind at a time.
    pub fn kind(&self) -> JobKind {
        match self {
            Work::Backup { .. } => JobKind::Backup,
            Work::Prune => JobKind::Prune,
            Work::Check { .. } => JobKind::Check,
        }
    }

    /// True when the job stops midway when cancelled. A backup does (its writers are thawed and
    /// nothing of it is stored); a prune or a check runs to its end.
    pub fn cancellable(&self) -> bool {
        matches!(self, Work::Backup { .. })
    }
}

/// A queued request.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Request {
    /// Its id (`GET /v1/requests/ID`).
    pub id: u64,
    /// What it runs.
    pub work: Work,
    /// What started it.
    pub trigger: JobTrigger,
    /// Who or what asked: a schedule, or an API caller.
    pub by: String,
}

/// Runs `request` as its job (and the retention policy after a scheduled backup), recording
/// its id with the agent as soon as it has one.
pub fn execute(shared: &Arc<Shared>, config: &Config, request: &Request, cancel: ThawTrigger) {
    let target =
        shared.options.target.clone().or_else(|| config.backup.target.clone()).unwrap_or_else(paths::default_target);
    let store = &shared.store;
    let kind = request.work.kind();
    let ran = std::cell::RefCell::new(Vec::new());
    let started = |job: &Job<'_>| {
        ran.borrow_mut().push(job.id().to_string());
        shared.started(request.id, job.id());
        crate::systemd::log(
            6,
            &format!("job {} started: {kind} ({}, asked by {})", job.id(), request.trigger, request.by),
            &[("SYSSTATE_JOB", job.id())],
        );
    };
    let passphrase_file = shared.options.passphrase_file.as_deref();
    let state_dir = paths::state_dir();
    let outcome: Result<Option<String>> = match &request.work {
        Work::Backup { components } => {
            let backup = BackupRequest {
                config: config.clone(),
                root: shared.options.root.clone(),
                target: target.clone(),
                components: components.clone(),
                tags: Vec::new(),
                threads: 0,
                wait: None,
                trigger: cancel,
                damage: None,
                journal: shared.journal.clone(),
            };
            let made = jobs::run_triggered(
                store,
                kind,
                request.trigger,
                Some(&target),
                components,
                &NoProgress,
                |job| {
                    started(job);
                    sysstate_engine::components::select(config, &shared.options.root, components)?;
                    let (passphrase, generated) = credentials::unattended(&target, passphrase_file, &state_dir)?;
                    let report = ops::backup(&backup, &passphrase, job)?;
                    if generated && report.created {
                        if let Some(key) = credentials::settle(&target, &state_dir) {
                            job.operation(&format!(
                            "no passphrase was given: the new repository is protected by a random key kept in `{}`; keep a copy of it somewhere safe",
                            key.display()
                        ));
                        }
                    }
                    Ok(report)
                },
            );
            match made {
                Ok(report) => {
                    let stats = &report.version.stats;
                    let figures = crate::metrics::BackupFigures {
                        bytes_total: stats.bytes_total,
                        bytes_read: stats.bytes_read,
                        bytes_added: stats.bytes_added,
                        bytes_stored: stats.bytes_stored,
                        files: stats.files,
                        freeze_window_ms: report.shadow.freeze_window_ms,
                    };
                    shared.counters().last_backup = Some(figures);
                    shared.counters().repository_bytes = repository_bytes(&target);
                    if request.trigger != JobTrigger::Api {
                        if let Some(forget) = retention(shared, config, &target, request, report.id) {
                            ran.borrow_mut().push(forget);
                        }
                    }
                    if let Some(replicated) = replicate(shared, config, &target, request) {
                        ran.borrow_mut().push(replicated);
                    }
                    Ok(Some(report.job))
                }
                Err(error) => Err(error),
            }
        }
        Work::Prune => jobs::run_triggered(store, kind, request.trigger, Some(&target), &[], &NoProgress, |job| {
            started(job);
            let passphrase = require(&target, passphrase_file)?;
            let repo = ops::open_with(&target, &passphrase, job.damage_hook(None), config)?;
            upkeep::prune(&repo, false, job)
        })
        .map(|_| None),
        Work::Check { read_data } => {
            jobs::run_triggered(store, kind, request.trigger, Some(&target), &[], &NoProgress, |job| {
                started(job);
                let passphrase = require(&target, passphrase_file)?;
                let repo = ops::open(&target, &passphrase)?.with_connections(config.connections()?);
                upkeep::check(&repo, read_data.map_or(upkeep::ReadData::None, upkeep::ReadData::Sample), job)
            })
            .map(|_| None)
        }
    };
    let job = shared.lock().running.as_ref().and_then(|r| r.job.clone()).unwrap_or_default();
    // Each job that ended badly is counted, and told as `[notify]` asks.
    let options = shared.doctor_options();
    for id in ran.into_inner() {
        let Ok(Some(record)) = store.job(&id) else { continue };
        if let (sysstate_engine::jobs::JobState::Failed, Some(error)) = (record.state, &record.error) {
            *shared.counters().failures.entry(error.code.clone()).or_default() += 1;
        }
        if let Some(notice) = crate::notify::for_job(store, &record, config, &options) {
            shared.tell(config, notice);
        }
    }
    match outcome {
        Ok(_) => crate::systemd::log(6, &format!("job {job} ({kind}) ended"), &[("SYSSTATE_JOB", &job)]),
        Err(error) => crate::systemd::log(
            if error.code == sysstate_types::ErrorCode::Cancelled { 4 } else { 3 },
            &format!("job {job} ({kind}) ended: error[{}]: {}", error.code, error.message),
            &[("SYSSTATE_JOB", &job), ("SYSSTATE_ERROR_CODE", error.code.as_str())],
        ),
    }
}

/// Copies the versions the vault lacks (`[vault] url`) from the local repository, the staging
/// area, as a `replicate` job (its id returned): what the vault has is not sent again, so a
/// replication that was stopped resumes where it was.
fn replicate(shared: &Arc<Shared>, config: &Config, target: &str, request: &Request) -> Option<String> {
    let vault = config.vault.url.clone()?;
    let passphrase_file = shared.options.passphrase_file.as_deref();
    let id = std::cell::RefCell::new(None);
    let ended = jobs::run_triggered(
        &shared.store,
        JobKind::Replicate,
        request.trigger,
        Some(&vault),
        &[],
        &NoProgress,
        |job| {
            *id.borrow_mut() = Some(job.id().to_string());
            job.operation(&format!("replicating new versions to {vault}"));
            let passphrase = require(target, passphrase_file)?;
            let to_passphrase = match &config.vault.passphrase_file {
                Some(file) => credentials::read_passphrase_file(file)?,
                None => passphrase.clone(),
            };
            let from = ops::open_with(target, &passphrase, job.damage_hook(None), config)?;
            let report = upkeep::replicate(
                &from,
                &upkeep::ReplicateRequest {
                    to: &vault,
                    to_passphrase: &to_passphrase,
                    versions: &[],
                    limit: upkeep::ReplicateRequest::limit_of(config.vault.bandwidth()?),
                },
            )?;
            let sent = report.versions.iter().filter(|v| v.to.is_some()).count();
            let how = match &report.packs {
                Some(packs) => format!(
                    "packs sent as they are: {} sent, {} there already, {} blobs packed anew",
                    packs.packs_sent, packs.packs_there, packs.blobs_repacked
                ),
                None if sent > 0 => "every blob sealed again: the local repository's key is not the vault's".into(),
                None => "nothing to send".into(),
            };
            job.operation(&format!(
                "replicated {sent} versions to {vault} ({} there already; {how})",
                report.versions.len() - sent
            ));
            Ok(report)
        },
    );
    match ended {
        Ok(_) => say(format!("replicated to {vault}")),
        Err(error) => say(format!("replication to {vault} failed: error[{}]: {}", error.code, error.message)),
    }
    id.into_inner()
}

/// The bytes of the repository's packs (one listing), for the metrics.
fn repository_bytes(target: &str) -> Option<u64> {
    let backend = ops::backend(target).ok()?;
    let packs = backend.list(sysstate_repo::backend::FileKind::Pack).ok()?;
    Some(packs.iter().map(|(_, size)| size).sum())
}

/// The passphrase of an existing repository, or the error that says how to give one.
fn require(target: &str, passphrase_file: Option<&std::path::Path>) -> Result<Vec<u8>> {
    let state_dir = paths::state_dir();
    credentials::find(target, passphrase_file, &state_dir)?.ok_or_else(|| credentials::missing(target, &state_dir))
}

/// Applies `[retention]` to this host's versions after a scheduled backup made `made`, as a
/// `forget` job (its id returned); refused (and nothing dropped) when it would drop `made` or
/// every version.
fn retention(
    shared: &Arc<Shared>,
    config: &Config,
    target: &str,
    request: &Request,
    made: sysstate_repo::Id,
) -> Option<String> {
    let policy = match config.retention.policy() {
        Ok(Some(policy)) => policy,
        Ok(None) => return None,
        Err(error) => {
            say(format!("retention not applied: {}", error.message));
            return None;
        }
    };
    let id = std::cell::RefCell::new(None);
    let passphrase_file = shared.options.passphrase_file.as_deref();
    let ended =
        jobs::run_triggered(&shared.store, JobKind::Forget, request.trigger, Some(target), &[], &NoProgress, |job| {
            *id.borrow_mut() = Some(job.id().to_string());
            job.operation("applying the retention policy");
            let passphrase = require(target, passphrase_file)?;
            let repo = ops::open_with(target, &passphrase, job.damage_hook(None), config)?;
            let (policy, group_by) = policy;
            let plan = upkeep::forget(
                &repo,
                &upkeep::ForgetRequest {
                    policy,
                    group_by,
                    filter: sysstate_repo::forget::Filter {
                        hosts: vec![sysstate_repo::lock::host_name()],
                        ..Default::default()
                    },
                    dry_run: false,
                    must_keep: vec![made],
                },
            )?;
            job.operation(&format!("retention: {} versions kept, {} dropped", plan.keep.len(), plan.drop.len()));
            Ok(plan)
        });
    match ended {
        Ok(plan) => say(format!("retention applied: {} versions kept, {} dropped", plan.keep.len(), plan.drop.len())),
        Err(error) => say(format!("retention refused: error[{}]: {}", error.code, error.message)),
    }
    id.into_inner()
}
