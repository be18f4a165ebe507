//! A system state backup: the components resolved, their locks checked and their commands
//! run, a shadow set taken, and the shadow copies read into a new version. Also the persistent
//! shadow copy (`sysstate shadows create`), which takes the same shadow set without a backup.

use crate::components::{self, Resolved};
use crate::config::Config;
use crate::error::{EngineError, Result};
use crate::jobs::{Job, JobOutput};
use std::path::{Path, PathBuf};
use sysstate_repo::archiver::{self, BackupOptions, Journaled, Selection};
use sysstate_repo::lock::Lease;
use sysstate_repo::version::{ComponentRecord, Version};
use sysstate_repo::{Id, Progress, Repository, Warning};
use sysstate_types::ErrorCode;

/// What a backup is asked to do.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    /// The loaded config.
    pub config: Config,
    /// The root (`/` for this machine).
    pub root: PathBuf,
    /// The target.
    pub target: String,
    /// Components named on the command line (empty: the config's or all).
    pub components: Vec<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Reader/sealer threads (0: one per core).
    pub threads: usize,
    /// How long to wait for another shadow set (`--wait`).
    pub wait: Option<std::time::Duration>,
    /// Fired by the binary's signal handler: thaws the writers at once.
    pub trigger: sysstate_shadow::ThawTrigger,
    /// Told each damaged repository file the backup passes over (beside the job's events).
    pub damage: Option<sysstate_repo::DamageHook>,
    /// A change journal kept since earlier backups (the agent's), with what they kept of the trees
    /// they met: the backup then costs what changed since the parent version.
    pub journal: Option<KeptJournal>,
}

/// A change journal kept across backups by a long-lived process (the agent), and what its
/// backups kept of the trees they met (their entry counts, the last version's trees decoded).
#[derive(Debug, Clone)]
pub struct KeptJournal {
    /// The journal, watching the components' filesystems.
    pub journal: std::sync::Arc<sysstate_shadow::journal::Journal>,
    /// Entry counts by tree, and the last version's trees decoded.
    pub counts: std::sync::Arc<sysstate_repo::archiver::KnownTrees>,
    /// The version the last backup with this journal made, and the position it was read at:
    /// the parent the next one compares with, whatever was backed up in between by others.
    pub made: std::sync::Arc<std::sync::Mutex<Option<(sysstate_shadow::journal::Position, Id)>>>,
}

/// What a backup did.
#[derive(Debug)]
pub struct BackupReport {
    /// The job it ran as.
    pub job: String,
    /// The new version.
    pub id: Id,
    /// Its manifest.
    pub version: Version,
    /// Files skipped or unreadable.
    pub warnings: Vec<Warning>,
    /// Default components left out because none of their paths exist here.
    pub skipped_components: Vec<String>,
    /// True when this backup created the repository.
    pub created: bool,
    /// What the shadow set did.
    pub shadow: sysstate_shadow::ShadowSetRecord,
}

impl JobOutput for BackupReport {
    fn version(&self) -> Option<String> {
        Some(self.id.to_hex())
    }

    fn warnings(&self) -> usize {
        self.warnings.len()
    }
}

/// Turns resolved components into the archiver's selections and the manifest's records.
fn selections(resolved: &[Resolved]) -> Result<(Vec<Selection>, Vec<ComponentRecord>)> {
    let mut selections = Vec::new();
    let mut records = Vec::new();
    for item in resolved {
        let exclude = if item.component.exclude.is_empty() {
            None
        } else {
            let mut builder = globset::GlobSetBuilder::new();
            for pattern in &item.component.exclude {
                // Patterns match paths relative to the root (`etc/ssl/private/*`) or entry names
                // (`*.tmp`); an absolute path, as administrators write it, is taken as relative.
                let relative = pattern.trim_start_matches('/');
                let glob = globset::GlobBuilder::new(relative).literal_separator(true).build().map_err(|error| {
                    EngineError::new(
                        ErrorCode::InvalidInput,
                        format!("component `{}`: exclude pattern `{pattern}`: {error}", item.component.name),
                    )
                })?;
                builder.add(glob);
            }
            Some(builder.build().map_err(|error| EngineError::new(ErrorCode::InvalidInput, error.to_string()))?)
        };
        for path in &item.present {
            selections.push(Selection { path: PathBuf::from(path), exclude: exclude.clone(), source: None });
        }
        records.push(ComponentRecord {
            name: item.component.name.clone(),
            paths: item.present.clone(),
            missing: item.missing.clone(),
            generated: Vec::new(),
        });
    }
    Ok((selections, records))
}

/// The backup's repository, open, under a shared lease, with its index loaded; whether this
/// backup created it; and the parent version (the newest of the same host and root), whose size
/// `progress` is told.
type Opened = (Repository, bool, Lease, Option<Id>);

/// Opens the backup's repository, or creates it when `create` and the target has none;
/// `Ok(None)` when it has none and `create` is false.
fn open_for_backup(request: &BackupRequest, passphrase: &[u8], job: &Job<'_>, create: bool) -> Result<Option<Opened>> {
    let backend = super::backend(&request.target)?;
    let exists = Repository::exists(&*backend)?;
    let (repo, created, lease) = match (exists, create) {
        // The key is derived (argon2) while the lease is taken: neither needs the other, and
        // on object storage the lease's listings are round trips worth hiding.
        (true, _) => std::thread::scope(|scope| -> Result<_> {
            let lease = scope.spawn(|| Lease::acquire(backend.clone(), false, "backup"));
            let repo = Repository::open(backend.clone(), passphrase);
            let lease = lease.join().expect("the lease thread does not panic");
            Ok((repo?, false, lease?))
        })?,
        (false, true) => {
            let (repo, created) = super::open_or_create_for(backend.clone(), passphrase, &request.config)?;
            (repo, created, Lease::acquire(backend, false, "backup")?)
        }
        (false, false) => return Ok(None),
    };
    let repo = super::cached(repo, &request.config)?.with_damage_hook(job.damage_hook(request.damage.clone()));
    // The index only once the lease holds (a prune cannot be deleting what it lists); the
    // versions beside it.
    let versions = std::thread::scope(|scope| -> Result<_> {
        let versions = scope.spawn(|| repo.versions());
        let indexed = repo.load_index();
        let versions = versions.join().expect("the versions thread does not panic");
        indexed?;
        Ok(versions?)
    })?;
    let host = sysstate_repo::lock::host_name();
    let root_path = request.root.display().to_string();
    let parent = versions.into_iter().rev().find(|(_, v)| v.host == host && v.root_path == root_path);
    if let Some((_, version)) = &parent {
        Progress::total(job, version.stats.bytes_total);
        Progress::total_files(job, version.stats.files);
    }
    Ok(Some((repo, created, lease, parent.map(|(id, _)| id))))
}

/// Runs the components' commands (package selection, disk layout, boot entries) into `dir`,
/// whose output goes into the version beside the files (read from there, not from the shadow
/// set); records them, and returns a warning for each that failed.
fn generate(records: &mut [ComponentRecord], root: &Path, dir: &Path) -> Vec<Warning> {
    let mut warnings = Vec::new();
    for record in records {
        let outputs = crate::generated::generate(&record.name, root, &dir.join(&record.name));
        if outputs.is_empty() {
            continue;
        }
        let path = format!("{}/{}", crate::generated::GENERATED_DIR, record.name);
        for output in outputs.iter().filter(|o| o.status.is_some_and(|s| s != 0)) {
            warnings.push(Warning {
                path: format!("{path}/{}", output.file),
                message: format!(
                    "`{}` exited with status {}: {}",
                    output.command.join(" "),
                    output.status.unwrap_or(-1),
                    output.stderr
                ),
            });
        }
        record.paths.push(path);
        record.generated = outputs.iter().map(|o| serde_json::to_value(o).expect("records encode")).collect();
    }
    warnings
}

/// Runs a backup as `job`: creates the repository if the target has none, takes a shared lease,
/// compares with the newest version of the same host and root, and stores a new version. The
/// shadow set's phases become the job's current operation and its warnings the job's events.
pub fn backup(request: &BackupRequest, passphrase: &[u8], job: &Job<'_>) -> Result<BackupReport> {
    crate::paths::require_private(&crate::paths::state_dir())?;
    let progress: &dyn Progress = job;
    let (resolved, skipped_components) = components::select(&request.config, &request.root, &request.components)?;
    job.components(&resolved.iter().map(|r| r.component.name.clone()).collect::<Vec<_>>());
    let (selections, records) = selections(&resolved)?;
    let served = crate::shadow::served_components(&request.config);
    // An existing repository opens (the key derivation takes a core for a tenth of a second,
    // the index loads) while the components' locks are checked and their commands run; the
    // shadow set waits for both, so no writer is frozen for a repository that cannot be opened.
    // A new one is created only once the checks passed: a refused backup leaves no repository.
    let generated_dir = crate::paths::state_dir().join("generated").join(format!(
        "{}-{}",
        std::process::id(),
        sysstate_repo::lock::now_ns()
    ));
    let _cleanup = RemoveOnDrop(generated_dir.clone());
    let mut records = records;
    let (opened, checked, generated_warnings) = std::thread::scope(|scope| {
        let opened = scope.spawn(|| open_for_backup(request, passphrase, job, false));
        let checked = crate::locks::check(&resolved, &request.root, &served);
        let warnings = if checked.is_ok() { generate(&mut records, &request.root, &generated_dir) } else { Vec::new() };
        (opened.join().expect("the thread opening the repository does not panic"), checked, warnings)
    });
    checked?;
    let (repo, created, _lease, parent) = match opened? {
        Some(opened) => opened,
        None => open_for_backup(request, passphrase, job, true)?.expect("a repository is created"),
    };

    // The point in time: a shadow set of every selected path, read instead of the live files.
    let names: Vec<String> = resolved.iter().map(|r| r.component.name.clone()).collect();
    let protected = crate::shadow::protected_paths(&request.config, &request.root, Some(&request.target))?;
    let writers = crate::shadow::writers(&request.config, &request.root, &names, "backup", &protected)?;
    let paths: Vec<PathBuf> = selections.iter().map(|s| s.path.clone()).collect();
    let mut selections = selections;
    if records.iter().any(|r| !r.generated.is_empty()) {
        selections.push(Selection {
            path: PathBuf::from(crate::generated::GENERATED_DIR),
            exclude: None,
            source: Some(generated_dir.clone()),
        });
    }
    let mut shadow_options = shadow_options(&request.config, &request.root, paths, request.wait, false)?;
    split_by_volume(&request.config, &request.root, &mut shadow_options)?;
    shadow_options.holder.job = Some(job.id().to_string());
    shadow_options.phase = Some(job.phase_hook());
    shadow_options.warning = Some(job.warning_hook());
    shadow_options.output = Some(job.output_hook());
    shadow_options.recovered = Some(job.recovered_hook());
    shadow_options.journal = request.journal.as_ref().map(|kept| kept.journal.clone());
    let selection_id = selection_id(&repo, &resolved);
    let mut options = BackupOptions {
        root: request.root.clone(),
        selections,
        components: records,
        parent: None,
        host: sysstate_repo::lock::host_name(),
        tags: request.tags.clone(),
        threads: request.threads,
        changed: None,
        counts: request.journal.as_ref().map(|kept| kept.counts.clone()),
        shadow: None,
        system: Some(serde_json::to_value(crate::system::SystemInfo::of(&request.root)).expect("records encode")),
        time_ns: 0,
        cancel: Some(request.trigger.flag()),
    };
    let mut session = archiver::Session::new(&repo, &options, progress);
    // With the agent's journal since the parent version, the files changed since are read live
    // before the freeze (a first pass), and only what changes while they are read is copied in
    // the freeze and read again from the copy (a second pass).
    let live_parent = request.journal.as_ref().and_then(|kept| live_parent(&repo, kept, &selection_id));
    let storages = std::iter::once(&shadow_options.storage).chain(shadow_options.extra.iter().map(|g| &g.storage));
    let live_source = sysstate_repo::source::TreeSource::live(&request.root, storages.map(|s| s.on.clone()).collect());
    let mut draft = None;
    let made = {
        let mut read = |before: &sysstate_shadow::BeforeFreeze<'_>| {
            let Some((parent, _)) = live_parent else { return };
            let dirs = with_generated(before.changed.to_vec());
            let changed = Journaled { dirs, whole: Vec::new(), names: before.names.clone(), reread: Vec::new() };
            let pass = archiver::Pass::of_version(&repo, &parent)
                .and_then(|parent| session.pass(&live_source, &options.selections, Some(&changed), Some(parent)));
            draft = Some(pass.map(|pass| (pass, before.changed.len())));
        };
        let live = live_parent.map(|(_, parent_at)| sysstate_shadow::LiveRead { parent_at, read: &mut read });
        sysstate_shadow::Coordinator::new(writers).create_reading_live(&shadow_options, &request.trigger, live)
    };
    let set = made.map_err(crate::shadow::shadow_error)?;
    for selection in &mut options.selections {
        selection.source = set.source_for(&selection.path).or(selection.source.take());
    }
    job.operation("reading shadow copies");
    let skipped: Vec<Warning> = set
        .skipped()
        .iter()
        .map(|(path, message)| Warning { path: path.display().to_string(), message: message.clone() })
        .collect();
    skipped.iter().for_each(|w| progress.warning(w));
    let source = crate::source::ShadowSource::new(&set, &request.root);
    let in_freeze = set
        .record()
        .journal
        .as_ref()
        .filter(|journal| journal.since.is_some() && journal.since == live_parent.map(|(_, at)| at))
        .and_then(|journal| journal.in_freeze.as_ref());
    let mut shadow = serde_json::to_value(set.record()).expect("records encode");
    let pass = match (draft, in_freeze) {
        (Some(Err(error)), _) => Err(error),
        (Some(Ok((draft, named))), Some(in_freeze)) => {
            options.parent = live_parent.map(|(id, _)| id);
            shadow["walk"] = serde_json::json!({
                "read": "journal",
                "folders-named": named,
                "read-live": true,
                "folders-named-in-freeze": in_freeze.changed.len(),
                "selection": selection_id,
            });
            let changed = Journaled {
                dirs: in_freeze.changed.clone(),
                whole: Vec::new(),
                names: in_freeze.names.clone(),
                reread: in_freeze.reread.clone(),
            };
            session.pass(&source, &options.selections, Some(&changed), Some(draft))
        }
        // Nothing read live, or the commit did not follow the journal (it then walked, and the
        // copy is whole): one pass over the copy, by the journal or whole.
        _ => {
            let (changed, walk, parent) =
                journal_walk(&repo, parent, set.record(), request.journal.as_ref(), &selection_id);
            shadow["walk"] = walk;
            options.parent = parent;
            parent
                .map(|id| archiver::Pass::of_version(&repo, &id))
                .transpose()
                .and_then(|parent| session.pass(&source, &options.selections, changed.as_ref(), parent))
        }
    };
    options.shadow = Some(shadow);
    // The version is of the moment the writers were frozen (in tests, by a clock that runs
    // ahead: a machine whose clock was wrong when it backed up).
    options.time_ns =
        set.record().frozen_at_ns + sysstate_types::failpoint::<i64>("CLOCK_AHEAD_S").unwrap_or(0) * 1_000_000_000;
    let outcome = pass
        .and_then(|pass| session.finish(&options, pass))
        .map_err(|e| incomplete(e, &options.components, &request.root));
    job.operation("releasing shadow copies");
    let record = set.complete(outcome.is_ok());
    let mut outcome = outcome?;
    if let (Some(kept), Some(journal)) = (&request.journal, &record.journal) {
        *kept.made.lock().expect("journal lock") = Some((journal.position, outcome.id));
    }
    outcome.warnings.extend(skipped);
    outcome.warnings.extend(generated_warnings);
    Ok(BackupReport {
        job: job.id().to_string(),
        id: outcome.id,
        version: outcome.version,
        warnings: outcome.warnings,
        skipped_components,
        created,
        shadow: record,
    })
}

/// An id of what the backup selects (components, paths, excludes), recorded beside the walk: a
/// subtree is taken from the parent version only when the parent selected the same.
fn selection_id(repo: &Repository, resolved: &[components::Resolved]) -> String {
    let selected: Vec<_> = resolved.iter().map(|r| (&r.component.name, &r.present, &r.component.exclude)).collect();
    repo.key().blob_id(format!("{selected:?}").as_bytes()).to_hex()[..16].to_string()
}

/// How the archiver walks: only what the shadow set's kept journal says changed since the
/// parent version was read, or everything. The parent is then the version the journal's last
/// backup made (a command's backup in between was not read at a journal position). Returns
/// the changed directories (with the generated files' folder, always read again) and the paths
/// read whole (volumes copied by snapshot or not watched), the record of the choice, with why
/// it walks, and the parent.
fn journal_walk(
    repo: &Repository,
    latest: Option<Id>,
    record: &sysstate_shadow::ShadowSetRecord,
    kept: Option<&KeptJournal>,
    selection: &str,
) -> (Option<Journaled>, serde_json::Value, Option<Id>) {
    let walk = |because: &str| {
        (None, serde_json::json!({ "read": "walk", "because": because, "selection": selection }), latest)
    };
    let Some(kept) = kept else {
        return walk("no change journal was kept since the parent version (the agent keeps one)");
    };
    let Some(journal) = &record.journal else { return walk("the shadow set kept no journal") };
    let Some(since) = journal.since else {
        let why: Vec<&str> = journal
            .unknown
            .as_deref()
            .into_iter()
            .chain(record.copies.iter().filter_map(|c| c.walked_because.as_deref()))
            .collect();
        return walk(&if why.is_empty() {
            "the base copy was not made at the journal's last position (the first backup since the agent started, or one in between)".to_string()
        } else {
            why.join("; ")
        });
    };
    let made = *kept.made.lock().expect("journal lock");
    let parent_id = made.filter(|(position, _)| *position == since).map(|(_, id)| id).or(latest);
    if let Err(why) = journal_parent(repo, parent_id, since, selection) {
        return walk(why);
    }
    // The folders above a path read whole are read too (the path is in them).
    let dirs = with_generated(journal.changed.iter().chain(&journal.whole).cloned().collect());
    let mut record =
        serde_json::json!({ "read": "journal", "folders-named": journal.changed.len(), "selection": selection });
    if !journal.whole.is_empty() {
        record["read-whole"] = serde_json::json!(journal.whole);
    }
    let names = journal.names.clone();
    (Some(Journaled { dirs, whole: journal.whole.clone(), names, reread: Vec::new() }), record, parent_id)
}

/// The agent's last version and the journal position it was read at, when the next backup may
/// read what changed since it live before the freeze: it selected the same, and was read where
/// the journal says. The shadow set checks that its base copy was made there too.
fn live_parent(
    repo: &Repository,
    kept: &KeptJournal,
    selection: &str,
) -> Option<(Id, sysstate_shadow::journal::Position)> {
    let (position, id) = (*kept.made.lock().expect("journal lock"))?;
    journal_parent(repo, Some(id), position, selection).ok().map(|()| (id, position))
}

/// Whether version `id` can be the parent of a backup read by the journal from position `at`
/// on: it was read at `at`, with the same selection. If not, why not.
fn journal_parent(
    repo: &Repository,
    id: Option<Id>,
    at: sysstate_shadow::journal::Position,
    selection: &str,
) -> std::result::Result<(), &'static str> {
    let parent = id.and_then(|id| repo.read_version(&id).ok()).ok_or("no parent version")?;
    let shadow = parent.shadow.unwrap_or_default();
    let read_at: Option<sysstate_shadow::journal::Position> = serde_json::from_value(shadow["journal"].clone()).ok();
    if read_at != Some(at) {
        return Err("the parent version was not read at the journal position the base copy was made at");
    }
    if shadow["walk"]["selection"].as_str() != Some(selection) {
        return Err("the selection (components, paths, excludes) changed since the parent version");
    }
    Ok(())
}

/// `dirs` with the generated components' folder, which every backup reads again, sorted.
fn with_generated(mut dirs: Vec<PathBuf>) -> Vec<PathBuf> {
    dirs.push(PathBuf::from(crate::generated::GENERATED_DIR));
    dirs.sort();
    dirs.dedup();
    dirs
}

/// The shadow set options for `paths` under `root`, from the config.
fn shadow_options(
    config: &Config,
    root: &Path,
    paths: Vec<PathBuf>,
    wait: Option<std::time::Duration>,
    persistent: bool,
) -> Result<sysstate_shadow::ShadowSetOptions> {
    let provider =
        sysstate_shadow::provider::ProviderChoice::parse(config.shadow.provider.as_deref().unwrap_or("auto"))
            .map_err(crate::shadow::shadow_error)?;
    let commit_timeout = match &config.shadow.commit_timeout {
        Some(text) => crate::shadow::parse_duration(text)
            .map_err(|e| EngineError::new(ErrorCode::InvalidInput, format!("`shadow.commit-timeout`: {e}")))?,
        None => crate::config::DEFAULT_COMMIT_TIMEOUT,
    };
    Ok(sysstate_shadow::ShadowSetOptions {
        runtime_dir: crate::paths::runtime_dir(),
        root: root.to_path_buf(),
        paths,
        provider,
        storage: crate::shadow::storage_for(config, &crate::paths::state_dir(), root)?,
        commit_timeout,
        holder: sysstate_shadow::LockHolder {
            pid: std::process::id(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            job: None,
            since_ns: sysstate_repo::lock::now_ns(),
        },
        wait,
        persistent,
        phase: None,
        extra: Vec::new(),
        warning: None,
        output: None,
        recovered: None,
        journal: None,
    })
}

/// `sysstate shadows create`: a persistent shadow copy of the components, kept for fast local
/// restore until deleted or pushed out by the storage limit.
pub fn create_persistent(
    config: &Config,
    root: &Path,
    components: &[String],
    trigger: sysstate_shadow::ThawTrigger,
) -> Result<sysstate_shadow::ShadowSetRecord> {
    let (resolved, _) = components::select(config, root, components)?;
    let (selections, _) = selections(&resolved)?;
    let names: Vec<String> = resolved.iter().map(|r| r.component.name.clone()).collect();
    let protected = crate::shadow::protected_paths(config, root, None)?;
    let writers = crate::shadow::writers(config, root, &names, "persistent", &protected)?;
    let options = shadow_options(config, root, selections.into_iter().map(|s| s.path).collect(), None, true)?;
    let set =
        sysstate_shadow::Coordinator::new(writers).create(&options, &trigger).map_err(crate::shadow::shadow_error)?;
    Ok(set.complete(true))
}

/// `sysstate shadows recover`: when the last shadow set's process died holding the machine's
/// shadow-set lock, thaws and aborts the writers it left frozen or prepared and deletes its
/// copies (every backup does the same when it takes the lock over). `None`: no set had died.
pub fn recover_shadow_set(
    config: &Config,
    root: &Path,
) -> Result<Option<(sysstate_shadow::LockHolder, sysstate_shadow::Recovery)>> {
    let names: Vec<String> = components::all(config)?.into_iter().map(|c| c.name).collect();
    let protected = crate::shadow::protected_paths(config, root, None)?;
    let writers = crate::shadow::writers(config, root, &names, "recovery", &protected)?;
    let mut options = shadow_options(config, root, Vec::new(), None, false)?;
    let areas = crate::shadow::storage_areas(config, &crate::paths::state_dir())?;
    options.extra = areas
        .into_iter()
        .filter(|area| area.on != options.storage.on)
        .map(|storage| sysstate_shadow::VolumeGroup { storage, paths: Vec::new() })
        .collect();
    sysstate_shadow::Coordinator::new(writers).recover(&options).map_err(crate::shadow::shadow_error)
}

/// Moves the paths that lie on a volume with its own `[[shadow.storage]]` into a group of their
/// own, so their copies go to (and are counted against) that volume's storage.
fn split_by_volume(config: &Config, root: &Path, options: &mut sysstate_shadow::ShadowSetOptions) -> Result<()> {
    let areas = crate::shadow::storage_areas(config, &crate::paths::state_dir())?;
    let mut primary = Vec::new();
    let mut groups: Vec<sysstate_shadow::VolumeGroup> = Vec::new();
    for path in std::mem::take(&mut options.paths) {
        let volume = crate::shadow::mount_point(&components::under_root(root, &path.display().to_string()));
        match areas.iter().find(|a| a.for_volume == volume && a.on != options.storage.on) {
            Some(area) => match groups.iter_mut().find(|g| g.storage.on == area.on) {
                Some(group) => group.paths.push(path),
                None => groups.push(sysstate_shadow::VolumeGroup { storage: area.clone(), paths: vec![path] }),
            },
            None => primary.push(path),
        }
    }
    options.paths = primary;
    options.extra = groups;
    Ok(())
}

/// The `component-incomplete` error of selected paths the shadow copy did not hold, naming
/// their components; other errors as they are.
fn incomplete(error: sysstate_repo::RepoError, components: &[ComponentRecord], root: &Path) -> EngineError {
    let sysstate_repo::RepoError::Unread { paths } = &error else { return error.into() };
    let owner = |path: &str| {
        components
            .iter()
            .flat_map(|c| c.paths.iter().map(move |p| (c, p)))
            .filter(|(_, p)| Path::new(path).starts_with(p.as_str()))
            .max_by_key(|(_, p)| p.len())
            .map_or_else(|| "?".to_string(), |(c, _)| c.name.clone())
    };
    let named: Vec<String> = paths.iter().map(|path| format!("`{path}` (component `{}`)", owner(path))).collect();
    EngineError::new(
        ErrorCode::ComponentIncomplete,
        format!(
            "{} exist on the system, but the shadow copy the backup read holds nothing of them: no version was saved",
            named.join(", ")
        ),
    )
    .with_data(serde_json::json!({
        "root": root,
        "paths": paths,
        "components": paths.iter().map(|p| owner(p)).collect::<Vec<_>>(),
    }))
}

/// Removes a temporary folder when dropped, on every path out of a function.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
