//! Restore in place: a version's components over the live system, staged, journaled, and
//! undoable with `sysstate restore --undo JOB`.
//!
//! The order makes every failure recoverable:
//! 1. plan the differences (all `--dry-run` does);
//! 2. keep what will be replaced or removed: a small local repository per job in
//!    `<state>/undo/<job>/` holds those entries as they are now, with all their metadata;
//! 3. write the journal (the paths, the undo version, the staging tag);
//! 4. stage every new entry beside its live name and sync — a failure up to here changed nothing;
//! 5. under the account database's lock, rename the staged entries into place; a failure here
//!    is undone at once from step 2; a process killed here is undone by `restore --undo JOB`.
//!
//! `packages` is not restored over dpkg's database: the version's package selection is written
//! out with the commands that reconcile the package set, run only with `--apply-packages`.

use crate::components;
use crate::config::Config;
use crate::error::{EngineError, Result};
use crate::system::SystemInfo;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use sysstate_repo::archiver::{self, BackupOptions, Selection};
use sysstate_repo::inplace::{self, Difference, Scope};
use sysstate_repo::keys::KdfParams;
use sysstate_repo::tree::NodeKind;
use sysstate_repo::version::{ComponentRecord, Version};
use sysstate_repo::NoProgress;
use sysstate_repo::{Id, Repository};
use sysstate_shadow::{Phase, Writer};
use sysstate_types::ErrorCode;

/// Components that take effect only when the machine boots again.
const NEXT_BOOT: &[&str] = &["boot", "efi", "bootloader"];

/// An in-place restore as asked on the command line.
#[derive(Debug, Clone)]
pub struct InPlaceRequest {
    /// The live root (`/`, or `--root`), absolute: the journal records it for the undo.
    pub root: PathBuf,
    /// `latest` or an id prefix.
    pub version: String,
    /// Components (empty: every component of the version).
    pub components: Vec<String>,
    /// Only list the differences.
    pub dry_run: bool,
    /// Run the package commands.
    pub apply_packages: bool,
    /// Whose identity the root ends with; `None` when not said (refused onto another machine).
    pub identity: Option<Identity>,
    /// The job this restore runs as: names the undo folder.
    pub job: String,
}

/// What identifies a machine, when a version is restored onto another one (`--identity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Identity {
    /// The root takes the version's host name, machine-id, SSH host keys and network
    /// configuration: it replaces the machine the version is of.
    Keep,
    /// The root keeps its own: a clone of the version's system state beside the original.
    Leave,
}

/// The files that identify a machine: host name, machine-id, SSH host keys, network
/// configuration. `--identity leave` restores none of them.
pub const IDENTITY_PATHS: &[&str] = &[
    "/etc/hostname",
    "/etc/hosts",
    "/etc/mailname",
    "/etc/machine-id",
    "/var/lib/dbus/machine-id",
    "/etc/ssh/ssh_host_rsa_key",
    "/etc/ssh/ssh_host_rsa_key.pub",
    "/etc/ssh/ssh_host_ecdsa_key",
    "/etc/ssh/ssh_host_ecdsa_key.pub",
    "/etc/ssh/ssh_host_ed25519_key",
    "/etc/ssh/ssh_host_ed25519_key.pub",
    "/etc/ssh/ssh_host_dsa_key",
    "/etc/ssh/ssh_host_dsa_key.pub",
    "/etc/network/interfaces",
    "/etc/network/interfaces.d",
    "/etc/netplan",
    "/etc/systemd/network",
    "/etc/NetworkManager/system-connections",
    "/etc/resolv.conf",
    "/etc/udev/rules.d/70-persistent-net.rules",
];

/// The identity an in-place restore gave the root.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct IdentityReport {
    /// `keep` or `leave`.
    pub mode: Identity,
    /// True when the root is another machine than the version's (their machine-ids differ).
    pub other_machine: bool,
    /// The identity files left as the root has them (`leave`).
    pub left: Vec<String>,
}

/// What an in-place restore found and did.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct InPlaceReport {
    /// The version restored.
    pub version: String,
    /// Nothing was changed.
    pub dry_run: bool,
    /// The differences (made, or that would be made).
    pub differences: Vec<Difference>,
    /// Components changed that take effect at the next boot.
    pub next_boot: Vec<String>,
    /// The package set, when `packages` was restored.
    pub packages: Option<PackagesReport>,
    /// The job to name to `restore --undo`, when something changed.
    pub undo: Option<String>,
    /// Whose identity the root has now.
    pub identity: IdentityReport,
    /// Why the repository was read without a lease (read-only, or `--no-lock`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_without_lease: Option<String>,
}

/// How the package set differs from the version's, and what reconciles it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PackagesReport {
    /// Where the version's selection list was written (none in a dry run).
    pub selections: Option<String>,
    /// Packages the version selects that are not installed here.
    pub to_install: Vec<String>,
    /// Packages installed here that the version does not select.
    pub to_remove: Vec<String>,
    /// The commands that reconcile the package set.
    pub commands: Vec<String>,
    /// True when they were run (`--apply-packages`).
    pub applied: bool,
}

/// The journal of one in-place restore, in `<state>/undo/<job>/journal.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Journal {
    job: String,
    root: PathBuf,
    version: String,
    /// Names staged entries: `.sysstate-TAG-N`.
    tag: String,
    /// Every path the restore changes, in plan order.
    paths: Vec<PathBuf>,
    /// The version of the undo repository that holds those paths as they were.
    undo_version: String,
    owners: bool,
    /// `staged`, `committed`, `rolled-back`, `undone`.
    state: String,
}

fn undo_dir(job: &str) -> PathBuf {
    crate::paths::state_dir().join("undo").join(job)
}

impl Journal {
    fn load(job: &str) -> Result<Journal> {
        let path = undo_dir(job).join("journal.json");
        let bytes = std::fs::read(&path).map_err(|error| {
            EngineError::new(ErrorCode::InvalidInput, format!("no in-place restore `{job}` to undo ({error})"))
                .with_cause(format!("`{}` does not exist or cannot be read", path.display()))
                .with_resolution("name the job of an in-place restore: `sysstate job --previous 20` lists the jobs")
        })?;
        serde_json::from_slice(&bytes).map_err(|error| {
            EngineError::new(ErrorCode::Internal, format!("the journal `{}` is damaged: {error}", path.display()))
        })
    }

    fn save(&self) -> Result<()> {
        let dir = undo_dir(&self.job);
        let bytes = serde_json::to_vec_pretty(self).expect("journals encode");
        crate::paths::write_durably(&dir.join("journal.json"), &bytes)
            .map_err(|error| EngineError::new(ErrorCode::Internal, format!("cannot write the journal: {error}")))
    }

    fn open_undo_repository(&self) -> Result<Repository> {
        let dir = undo_dir(&self.job);
        let key = std::fs::read(dir.join("key")).map_err(|error| {
            EngineError::new(ErrorCode::Internal, format!("the undo key of `{}` cannot be read: {error}", self.job))
        })?;
        crate::ops::open(&dir.join("repo").display().to_string(), &key)
    }
}

/// What an in-place restore will do, decided before anything changes: a dry run shows it
/// ([`InPlacePlan::into_report`]), a real run carries it out ([`InPlacePlan::execute`]).
#[derive(Debug)]
pub struct InPlacePlan {
    manifest: Version,
    /// The differences to make, with the scope they were found in.
    plan: inplace::Plan,
    owners: bool,
    /// The report, with every field but the differences already known.
    report: InPlaceReport,
    /// The version's package selection, to write out beside the undo data.
    selections: Option<PackageSelection>,
}

/// Plans an in-place restore: the version's components against the live root (`packages` as
/// the difference of the package sets). Reads the repository and the live tree; changes nothing.
pub fn plan(repo: &Repository, request: &InPlaceRequest, config: &Config) -> Result<InPlacePlan> {
    let (id, manifest) = repo.find_version_holding(&request.version, &request.components)?;
    let names: Vec<String> = if request.components.is_empty() {
        manifest.components.iter().map(|c| c.name.clone()).collect()
    } else {
        request.components.clone()
    };
    let owners = rustix::process::geteuid().is_root();
    check_release(&manifest, &id, &request.root)?;
    let identity = identity(repo, &manifest, &id, request)?;
    let mut scope = file_scope(&manifest, &id, &names, config, owners)?;
    scope.exclude.extend(identity.left.iter().map(PathBuf::from));
    let plan = if scope.include.is_empty() {
        inplace::Plan::default()
    } else {
        inplace::plan(repo, &manifest.tree, &request.root, &scope)?
    };
    let next_boot = next_boot(&manifest, &names, &plan);
    let (packages, selections) = match names.iter().any(|n| n == "packages") {
        true => plan_packages(repo, &manifest, request)?.unzip(),
        false => (None, None),
    };
    let report = InPlaceReport {
        read_without_lease: None,
        version: id.to_hex(),
        dry_run: request.dry_run,
        differences: Vec::new(),
        next_boot,
        packages,
        undo: None,
        identity,
    };
    Ok(InPlacePlan { manifest, plan, owners, report, selections })
}

/// Restores `request.components` of a version over the live root under a shared lease, or —
/// with `dry_run` — lists the differences.
pub fn restore_in_place(repo: &Repository, request: &InPlaceRequest, config: &Config) -> Result<InPlaceReport> {
    if request.root.is_relative() {
        // The journal must name the root whatever folder its undo is run from.
        return Err(EngineError::new(
            ErrorCode::InvalidInput,
            format!("the root of an in-place restore must be an absolute path, not `{}`", request.root.display()),
        ));
    }
    let lease = repo.read_lease("restore")?;
    let plan = plan(repo, request, config)?;
    let mut report = if request.dry_run { plan.into_report() } else { plan.execute(repo, request, config)? };
    report.read_without_lease = lease.without();
    Ok(report)
}

/// Refuses a version of a newer release (or of another distribution) than the system at `root`:
/// its configuration and package set would not fit the older system (as the seed refuses to
/// restore system state onto an older OS). A version or root that does not say is let through.
fn check_release(manifest: &Version, id: &Id, root: &Path) -> Result<()> {
    let Some(recorded) = manifest.system.clone().and_then(|v| serde_json::from_value::<SystemInfo>(v).ok()) else {
        return Ok(());
    };
    let live = SystemInfo::of(root);
    if recorded.distribution.is_empty() || live.distribution.is_empty() {
        return Ok(());
    }
    let describe = |s: &SystemInfo| match s.codename.is_empty() {
        true => format!("{} {}", s.distribution, s.release),
        false => format!("{} {} ({})", s.distribution, s.release, s.codename),
    };
    let newer = compare_releases(&recorded.release, &live.release) == std::cmp::Ordering::Greater;
    if recorded.distribution == live.distribution && !newer {
        return Ok(());
    }
    Err(EngineError::new(
        ErrorCode::ReleaseMismatch,
        format!(
            "version {} is of {} and `{}` is {}: {}",
            id.short(),
            describe(&recorded),
            root.display(),
            describe(&live),
            match newer && recorded.distribution == live.distribution {
                true => "system state of a newer release is not applied onto an older one",
                false => "system state of one distribution is not applied onto another",
            }
        ),
    )
    .with_resolution(format!(
        "upgrade `{}` to {} first, or restore to a folder (`--to DIR`) and take what is needed by hand",
        root.display(),
        describe(&recorded)
    )))
}

/// Orders two `VERSION_ID`s (`12`, `24.04`, `12.5`) part by part, numbers as numbers; an empty
/// one (a rolling release) is equal to anything.
fn compare_releases(a: &str, b: &str) -> std::cmp::Ordering {
    if a.is_empty() || b.is_empty() {
        return std::cmp::Ordering::Equal;
    }
    let parts = |s: &str| -> Vec<u64> { s.split(['.', '-']).map(|p| p.parse().unwrap_or(0)).collect() };
    parts(a).cmp(&parts(b))
}

/// Decides whose identity the root ends with. Onto another machine than the version's (their
/// machine-ids differ), the choice must be said: a restore that silently turned a clone into
/// a second copy of a server (same host name, same SSH host keys) is worse than a refusal.
fn identity(repo: &Repository, manifest: &Version, id: &Id, request: &InPlaceRequest) -> Result<IdentityReport> {
    let theirs =
        version_file(repo, &manifest.tree, "/etc/machine-id")?.map(|b| String::from_utf8_lossy(&b).trim().to_string());
    let ours = std::fs::read_to_string(request.root.join("etc/machine-id")).ok().map(|t| t.trim().to_string());
    let other_machine = matches!((&theirs, &ours), (Some(a), Some(b)) if a != b && !a.is_empty() && !b.is_empty());
    let mode = match (request.identity, other_machine) {
        (Some(mode), _) => mode,
        (None, false) => Identity::Keep,
        (None, true) => {
            return Err(EngineError::new(
                ErrorCode::InvalidInput,
                format!(
                    "`{}` is another machine than version {}'s (machine-id {} here, {} in the version): say whose identity it ends with",
                    request.root.display(),
                    id.short(),
                    ours.unwrap_or_default(),
                    theirs.unwrap_or_default()
                ),
            )
            .with_resolution("`--identity keep` makes it the version's machine (host name, machine-id, SSH host keys, network: a replacement server); `--identity leave` keeps its own (a clone)"))
        }
    };
    let left = match mode {
        Identity::Keep => Vec::new(),
        Identity::Leave => IDENTITY_PATHS.iter().map(|p| p.to_string()).collect(),
    };
    Ok(IdentityReport { mode, other_machine, left })
}

/// The paths an in-place restore compares: the components' own, without dpkg's database (the
/// package set is reconciled by apt, never written under dpkg) or the generated files.
fn file_scope(manifest: &Version, id: &Id, names: &[String], config: &Config, owners: bool) -> Result<Scope> {
    let (include, exclude) = crate::ops::component_scope(manifest, id, names)?;
    let packages_paths: Vec<PathBuf> = manifest
        .components
        .iter()
        .filter(|c| c.name == "packages")
        .flat_map(|c| c.paths.iter().map(PathBuf::from))
        .collect();
    let include = include
        .into_iter()
        .filter(|p| !packages_paths.contains(p) && !p.starts_with(crate::generated::GENERATED_DIR))
        .collect();
    Ok(Scope { include, exclude, keep: keep_patterns(config, names)?, owners })
}

/// The paths of the version's component `name`.
fn component_paths<'a>(manifest: &'a Version, name: &'a str) -> impl Iterator<Item = &'a String> {
    manifest.components.iter().filter(move |c| c.name == name).flat_map(|c| c.paths.iter())
}

/// True when the plan changes something of component `name`.
fn changes_component(manifest: &Version, name: &str, plan: &inplace::Plan) -> bool {
    component_paths(manifest, name).any(|p| plan.differences.iter().any(|d| Path::new(&d.path).starts_with(p)))
}

/// The restored components that take effect only at the next boot.
fn next_boot(manifest: &Version, names: &[String], plan: &inplace::Plan) -> Vec<String> {
    NEXT_BOOT
        .iter()
        .filter(|name| names.iter().any(|n| n == *name) && changes_component(manifest, name, plan))
        .map(|name| name.to_string())
        .collect()
}

impl InPlacePlan {
    /// The report of a dry run: the differences that would be made.
    pub fn into_report(mut self) -> InPlaceReport {
        self.report.differences = self.plan.differences;
        self.report
    }

    /// Carries the plan out as job `request.job`: reconciles the package set as asked, keeps
    /// what will be replaced, journals, stages, and commits under the account database's lock.
    /// A failure before the commit changes nothing live; one during it is undone at once.
    pub fn execute(mut self, repo: &Repository, request: &InPlaceRequest, config: &Config) -> Result<InPlaceReport> {
        if let (Some(packages), Some(selections)) = (&mut self.report.packages, &self.selections) {
            apply_packages(packages, selections, request)?;
        }
        if self.plan.differences.is_empty() {
            return Ok(self.into_report());
        }
        let mut journal = self.keep_and_journal(request)?;
        self.stage(repo, &mut journal)?;
        self.commit(config, request, &mut journal)?;
        journal.state = "committed".into();
        journal.save()?;
        self.report.undo = Some(request.job.clone());
        Ok(self.into_report())
    }

    /// Keeps everything that will be replaced or removed, as it is now, and writes the journal.
    fn keep_and_journal(&self, request: &InPlaceRequest) -> Result<Journal> {
        let undo_version = keep_for_undo(&self.plan, &request.root, &undo_dir(&request.job))?;
        let journal = Journal {
            job: request.job.clone(),
            root: request.root.clone(),
            version: self.report.version.clone(),
            tag: request.job.rsplit('-').next().unwrap_or(&request.job).to_string(),
            paths: self.plan.paths(),
            undo_version: undo_version.to_hex(),
            owners: self.owners,
            state: "staged".into(),
        };
        journal.save()?;
        Ok(journal)
    }

    /// Writes every new entry beside its live name; on failure removes what was staged.
    fn stage(&self, repo: &Repository, journal: &mut Journal) -> Result<()> {
        let staged = inplace::stage(repo, &self.plan, &journal.root, &journal.tag, self.owners, &NoProgress);
        let Err(error) = staged else { return Ok(()) };
        // Nothing was renamed into place; this removes what was staged and puts back the
        // directories' times.
        let _ = undo_journal(journal, "rolled-back");
        Err(EngineError::new(ErrorCode::RestoreFailed, format!("cannot stage the restored files: {error}"))
            .with_cause("a file of the version could not be written beside its live name; nothing live was changed")
            .with_resolution(
                "fix what the message names (space, permissions, the repository) and run the restore again",
            ))
    }

    /// Renames the staged entries into place, under the account database's lock when account
    /// files change; on failure undoes every change made.
    fn commit(&self, config: &Config, request: &InPlaceRequest, journal: &mut Journal) -> Result<()> {
        let touches_accounts = changes_component(&self.manifest, "accounts", &self.plan);
        let lock = match touches_accounts.then(|| lock_accounts(config, &request.root)).transpose() {
            Ok(lock) => lock,
            Err(error) => {
                // Nothing is in place yet: remove what was staged.
                let _ = undo_journal(journal, "rolled-back");
                return Err(error);
            }
        };
        let kill_after = failpoint_kill_after();
        let mut done = 0usize;
        let result = inplace::commit(&self.plan, &request.root, &journal.tag, self.owners, &mut |_| {
            done += 1;
            if kill_after == Some(done) {
                let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::Kill);
            }
        });
        let Err(error) = result else { return Ok(()) };
        let rollback = undo_journal(journal, "rolled-back");
        drop(lock);
        let undone = match rollback {
            Ok(_) => "every change it made was undone: the system is as it was".to_string(),
            Err(undo_error) => format!(
                "undoing it failed too ({undo_error}); run `sysstate restore --undo {}` once the cause is fixed",
                request.job
            ),
        };
        Err(EngineError::new(ErrorCode::RestoreFailed, format!("the in-place restore stopped midway: {error}"))
            .with_cause(format!("an entry could not be put in place; {undone}"))
            .with_resolution(
                "fix what the message names (a mount over the file, an immutable flag, space) and run the restore again",
            ))
    }
}

/// What `restore --undo` did.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct UndoReport {
    /// The in-place restore undone.
    pub job: String,
    /// What was put back.
    pub differences: Vec<Difference>,
}

impl crate::jobs::JobOutput for UndoReport {}

impl crate::jobs::JobOutput for InPlaceReport {
    fn version(&self) -> Option<String> {
        Some(self.version.clone())
    }
}

/// Puts back what the in-place restore `job` replaced or removed, and removes what it added —
/// also after a restore that was killed midway — under the root the restore ran on, wherever
/// the undo is run from. A `root` given that is not that one is refused.
pub fn undo(job: &str, root: Option<&Path>) -> Result<UndoReport> {
    let mut journal = Journal::load(job)?;
    match root {
        Some(root) if journal.root.is_relative() => {
            // A journal of an older version, which kept the root as it was typed.
            journal.root = root.to_path_buf();
        }
        Some(root) if root != journal.root => {
            return Err(EngineError::new(
                ErrorCode::InvalidInput,
                format!(
                    "the in-place restore `{job}` was of the root `{}`, not `{}`",
                    journal.root.display(),
                    root.display()
                ),
            )
            .with_resolution(format!("run the undo without `--root`, or with `--root {}`", journal.root.display())));
        }
        None if journal.root.is_relative() => {
            return Err(EngineError::new(
                ErrorCode::InvalidInput,
                format!(
                    "the in-place restore `{job}` recorded its root as `{}`, relative to a folder it did not record",
                    journal.root.display()
                ),
            )
            .with_resolution("run the undo with `--root` and the absolute path of that root"));
        }
        _ => {}
    }
    if journal.state == "undone" || journal.state == "rolled-back" {
        return Err(EngineError::new(
            ErrorCode::InvalidInput,
            format!("the in-place restore `{job}` was already undone"),
        )
        .with_cause(format!("its journal says `{}`", journal.state))
        .with_resolution("nothing to do: the system already has what it had before that restore"));
    }
    let differences = undo_journal(&mut journal, "undone")?;
    Ok(UndoReport { job: job.to_string(), differences })
}

fn undo_journal(journal: &mut Journal, state: &str) -> Result<Vec<Difference>> {
    let repo = journal.open_undo_repository()?;
    let id = Id::from_hex(&journal.undo_version)
        .ok_or_else(|| EngineError::new(ErrorCode::Internal, "the journal's undo version is not an id"))?;
    let manifest = repo.read_version(&id)?;
    // What a killed restore left staged goes first.
    inplace::clean_staged(&journal.root, &journal.paths, &journal.tag)?;
    let plan = inplace::plan_paths(&repo, &manifest.tree, &journal.root, &journal.paths, journal.owners)?;
    let tag = format!("{}u", journal.tag);
    if let Err(error) = inplace::stage(&repo, &plan, &journal.root, &tag, journal.owners, &NoProgress) {
        let _ = inplace::clean_staged(&journal.root, &plan.paths(), &tag);
        return Err(error.into());
    }
    inplace::commit(&plan, &journal.root, &tag, journal.owners, &mut |_| {})?;
    // Staging and cleaning changed the parents' times too, also where nothing else changed.
    let parents = journal.paths.iter().filter_map(|p| p.strip_prefix("/").ok()?.parent().map(Path::to_path_buf));
    inplace::put_back_dir_times(&plan, &journal.root, parents)?;
    journal.state = state.into();
    journal.save()?;
    Ok(plan.differences)
}

/// Saves the live entries the plan replaces or removes into a new local repository in `dir`.
fn keep_for_undo(plan: &inplace::Plan, root: &Path, dir: &Path) -> Result<Id> {
    let fail = |what: &str, error: String| {
        EngineError::new(ErrorCode::RestoreFailed, format!("cannot keep the replaced files for undo: {what}: {error}"))
            .with_cause("the in-place restore keeps every entry it replaces first; nothing live was changed")
            .with_resolution(format!("make room or fix `{}`, and run the restore again", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(&dir.display().to_string(), e.to_string()))?;
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key).expect("the kernel's random source is available");
    let key = hex::encode(key);
    crate::paths::write_durably(&dir.join("key"), key.as_bytes()).map_err(|e| fail("key", e.to_string()))?;
    let backend: Arc<dyn sysstate_repo::backend::Backend> =
        crate::ops::backend(&dir.join("repo").display().to_string())?;
    // The key is random: the key derivation adds nothing.
    let cheap = KdfParams { memory_kib: 8, iterations: 1, parallelism: 1 };
    let repo = Repository::init(backend, key.as_bytes(), cheap)?;
    repo.load_index()?;
    let everything = globset::GlobSetBuilder::new()
        .add(globset::Glob::new("*").expect("a valid glob"))
        .build()
        .expect("a valid glob set");
    let selections = plan
        .differences
        .iter()
        .filter_map(Difference::keep)
        .map(|(path, whole)| Selection { path, exclude: (!whole).then(|| everything.clone()), source: None })
        .collect();
    let options = BackupOptions {
        root: root.to_path_buf(),
        selections,
        components: vec![ComponentRecord {
            name: "undo".into(),
            paths: Vec::new(),
            missing: Vec::new(),
            generated: Vec::new(),
        }],
        parent: None,
        host: sysstate_repo::lock::host_name(),
        tags: vec!["undo".into()],
        threads: 0,
        shadow: None,
        system: None,
        time_ns: 0,
        cancel: None,
        changed: None,
        counts: None,
    };
    let outcome = archiver::backup(&repo, &options, &sysstate_repo::source::TreeSource::new(root), &NoProgress)?;
    if let Some(warning) = outcome.warnings.first() {
        return Err(fail(&warning.path, warning.message.clone()));
    }
    Ok(outcome.id)
}

/// The components' exclude patterns: live entries they match were left out of the version on
/// purpose and are kept.
fn keep_patterns(config: &Config, names: &[String]) -> Result<Option<globset::GlobSet>> {
    let mut builder = globset::GlobSetBuilder::new();
    let mut any = false;
    for component in components::all(config)?.iter().filter(|c| names.contains(&c.name)) {
        for pattern in &component.exclude {
            let glob = globset::GlobBuilder::new(pattern).literal_separator(true).build().map_err(|error| {
                EngineError::new(
                    ErrorCode::InvalidInput,
                    format!("component `{}`: exclude pattern `{pattern}`: {error}", component.name),
                )
            })?;
            builder.add(glob);
            any = true;
        }
    }
    if !any {
        return Ok(None);
    }
    Ok(Some(builder.build().map_err(|error| EngineError::new(ErrorCode::InvalidInput, error.to_string()))?))
}

/// Takes the account database's lock (`/etc/.pwd.lock`, as `lckpwdf(3)`) through the
/// `accounts` writer — the built-in one, or the config's with its `prepare-timeout` — so no
/// `passwd` or `useradd` runs while the account files are replaced; released when dropped.
fn lock_accounts(config: &Config, root: &Path) -> Result<Box<dyn Writer>> {
    let writers = crate::shadow::writers(config, root, &["accounts".to_string()], "restore", &[])?;
    let Some(mut writer) = writers.into_iter().find(|w| w.kind() == "accounts") else {
        return Err(EngineError::new(
            ErrorCode::InvalidInput,
            "no `accounts` writer to take the account database's lock",
        )
        .with_resolution(
            "remove the `[[writer]]` named `accounts` of another kind, or give it `kind = \"accounts\"`",
        ));
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
    writer.handle(Phase::PrepareSnapshot, deadline).map_err(|error| {
        let file = root.join("etc/.pwd.lock");
        let holder = sysstate_fs::file_lockers(&file).ok().and_then(|h| h.into_iter().next());
        let data = serde_json::json!({
            "component": "accounts", "file": file.display().to_string(),
            "pid": holder.as_ref().map(|h| h.pid), "command": holder.as_ref().map(|h| h.command.clone()), "how": "lock",
        });
        EngineError::new(ErrorCode::ComponentLocked, format!("component `accounts` is locked: {}", error.message))
            .with_data(data)
            .with_cause("a tool that changes accounts (passwd, useradd, chpasswd …) holds the account database's lock")
            .with_resolution("let that process finish, or stop it, then run the restore again; nothing was changed")
    })?;
    Ok(writer)
}

/// `SYSSTATE_FAILPOINT_KILL_AFTER_COMMITS=N`: the process kills itself after putting N entries
/// in place (crash tests).
fn failpoint_kill_after() -> Option<usize> {
    sysstate_types::failpoint("KILL_AFTER_COMMITS")
}

/// Reads a file of the version by its absolute path.
pub(crate) fn version_file(repo: &Repository, tree: &Id, path: &str) -> Result<Option<Vec<u8>>> {
    let mut tree = *tree;
    let mut parts = path.trim_start_matches('/').split('/').peekable();
    while let Some(part) = parts.next() {
        let Some(node) = repo.read_tree(&tree)?.get(part.as_bytes()).cloned() else { return Ok(None) };
        match node.kind {
            NodeKind::Dir { subtree } if parts.peek().is_some() => tree = subtree,
            NodeKind::File(content) if parts.peek().is_none() => {
                let mut data = Vec::new();
                for blob in &content.blobs {
                    data.extend(repo.read_blob(blob)?);
                }
                return Ok(Some(data));
            }
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// A version's package selection, as stored in its generated files.
#[derive(Debug)]
pub(crate) struct PackageSelection {
    /// `dpkg --get-selections`.
    pub selections: Vec<u8>,
    /// `apt-mark showmanual`, when the version has it.
    pub manual: Option<Vec<u8>>,
}

impl PackageSelection {
    /// The packages selected for install (or held).
    pub fn wanted(&self) -> std::collections::BTreeSet<String> {
        selected(&String::from_utf8_lossy(&self.selections))
    }
}

/// The packages a `dpkg --get-selections` listing selects for install (or holds).
fn selected(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let (name, state) = (fields.next()?, fields.next()?);
            (state == "install" || state == "hold").then(|| name.to_string())
        })
        .collect()
}

/// The version's package selection; `None` when it has none.
pub(crate) fn package_selection(repo: &Repository, manifest: &Version) -> Result<Option<PackageSelection>> {
    let generated = format!("{}/packages", crate::generated::GENERATED_DIR);
    let Some(selections) = version_file(repo, &manifest.tree, &format!("{generated}/{SELECTIONS_FILE}"))? else {
        return Ok(None);
    };
    let manual = version_file(repo, &manifest.tree, &format!("{generated}/{MANUAL_FILE}"))?;
    Ok(Some(PackageSelection { selections, manual }))
}

/// The package set: the version's selection against the root's, and the commands that
/// reconcile them. `None` when the version has no selection.
fn plan_packages(
    repo: &Repository,
    manifest: &Version,
    request: &InPlaceRequest,
) -> Result<Option<(PackagesReport, PackageSelection)>> {
    let Some(selection) = package_selection(repo, manifest)? else { return Ok(None) };
    let wanted = selection.wanted();
    let admindir = format!("--admindir={}", request.root.join("var/lib/dpkg").display());
    let current = sysstate_fs::command("dpkg")
        .args([admindir.as_str(), "--get-selections"])
        .output()
        .map(|o| selected(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default();
    let dir = undo_dir(&request.job);
    let chroot =
        if request.root == Path::new("/") { String::new() } else { format!("chroot {} ", request.root.display()) };
    let mut commands = vec![
        // dpkg takes selections only of packages it knows (apt does not tell it).
        format!("{chroot}apt-cache dumpavail | {chroot}dpkg --merge-avail"),
        format!("{chroot}dpkg --clear-selections"),
        format!("{chroot}dpkg --set-selections < {}", dir.join(SELECTIONS_FILE).display()),
        format!("{chroot}apt-get -y dselect-upgrade"),
    ];
    if selection.manual.is_some() {
        commands.push(format!("{chroot}xargs -a {} apt-mark manual", dir.join(MANUAL_FILE).display()));
    }
    let report = PackagesReport {
        selections: None,
        to_install: wanted.difference(&current).cloned().collect(),
        to_remove: current.difference(&wanted).cloned().collect(),
        commands,
        applied: false,
    };
    Ok(Some((report, selection)))
}

const SELECTIONS_FILE: &str = "dpkg-selections.txt";
const MANUAL_FILE: &str = "apt-manual.txt";

/// Writes the version's selection out beside the job's undo data and, with `apply_packages`,
/// runs the commands that reconcile the package set.
fn apply_packages(report: &mut PackagesReport, files: &PackageSelection, request: &InPlaceRequest) -> Result<()> {
    let dir = undo_dir(&request.job);
    let file = dir.join(SELECTIONS_FILE);
    let io = |e: std::io::Error| {
        EngineError::new(ErrorCode::RestoreFailed, format!("cannot write `{}`: {e}", file.display()))
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    crate::paths::write_durably(&file, &files.selections).map_err(io)?;
    if let Some(manual) = &files.manual {
        crate::paths::write_durably(&dir.join(MANUAL_FILE), manual).map_err(io)?;
    }
    report.selections = Some(file.display().to_string());
    if !request.apply_packages {
        return Ok(());
    }
    for command in &report.commands {
        let status = sysstate_fs::command("sh").args(["-c", command]).status();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            return Err(EngineError::new(
                ErrorCode::RestoreFailed,
                format!("`{command}` failed ({})", status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())),
            )
            .with_cause("the package manager could not reconcile the package set")
            .with_resolution(
                "read apt's output above, fix the cause (a mirror, a held package), and run the commands again",
            ));
        }
    }
    report.applied = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::compare_releases;
    use std::cmp::Ordering::*;

    #[test]
    fn releases_compare_part_by_part_as_numbers() {
        assert_eq!(compare_releases("12", "11"), Greater);
        assert_eq!(compare_releases("12", "12"), Equal);
        assert_eq!(compare_releases("9", "10"), Less, "not as text");
        assert_eq!(compare_releases("24.04", "22.04"), Greater);
        assert_eq!(compare_releases("22.10", "22.04"), Greater);
        assert_eq!(compare_releases("12.5", "12"), Greater);
        assert_eq!(compare_releases("", "12"), Equal, "a rolling release says nothing");
    }
}
