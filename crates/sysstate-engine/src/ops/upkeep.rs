//! Repository upkeep: check, forget, prune, copy. Forget and prune decide first and act second:
//! their plan is a value that a dry run shows and a real run executes.

use crate::error::{EngineError, Result};
use crate::jobs::JobOutput;
use serde::Serialize;
use sysstate_repo::backend::FileKind;
use sysstate_repo::check::CheckReport;
use sysstate_repo::forget::{Filter, GroupBy, Policy};
use sysstate_repo::lock::Lease;
use sysstate_repo::prune::{PrunePlan, PruneReport};
use sysstate_repo::version::Version;
use sysstate_repo::{Id, Progress, Repository};
use sysstate_types::ErrorCode;

/// What a check found, in the repository at `target`.
#[derive(Debug)]
pub struct CheckOutcome {
    /// The target checked (named in the failure).
    pub target: String,
    /// What was found.
    pub report: CheckReport,
    /// Why the repository was read without a lease (read-only, or `--no-lock`).
    pub read_without_lease: Option<String>,
}

impl JobOutput for CheckOutcome {
    fn warnings(&self) -> usize {
        self.report.warnings.len()
    }

    fn failure(&self) -> Option<EngineError> {
        let report = &self.report;
        (!report.is_clean()).then(|| {
            EngineError::new(
                ErrorCode::RepositoryCorrupt,
                format!(
                    "the repository at `{}` is damaged: {} problems in packs {}; versions affected: {}",
                    self.target,
                    report.errors.len(),
                    report.damaged_packs.iter().map(|p| p.get(..8).unwrap_or(p)).collect::<Vec<_>>().join(", "),
                    report.damaged_versions.join(", ")
                ),
            )
            .with_cause(
                "repository files were changed or lost after they were written (disk or storage fault, or tampering)",
            )
            .with_resolution(format!(
                "run, in this order: {}; then `sysstate check --read-data` again",
                report.repairs.iter().map(|r| format!("`{r}`")).collect::<Vec<_>>().join(", ")
            ))
        })
    }
}

pub use sysstate_repo::check::ReadData;

/// Checks the repository's structure under a shared lease, and reads as much of its data as
/// `read` says.
/// Damage is not an error here: it is in the outcome (its [`JobOutput::failure`]), so the caller
/// can show everything that was found.
pub fn check(repo: &Repository, read: ReadData, progress: &dyn Progress) -> Result<CheckOutcome> {
    let lease = repo.read_lease("check")?;
    let report = sysstate_repo::check::check(repo, read, progress)?;
    Ok(CheckOutcome { target: repo.location(), report, read_without_lease: lease.without() })
}

/// What `forget` is asked: a policy for the versions a filter selects, in groups.
#[derive(Debug, Clone, Default)]
pub struct ForgetRequest {
    /// What to keep.
    pub policy: Policy,
    /// What makes a group.
    pub group_by: GroupBy,
    /// Which versions are looked at (the others are left alone).
    pub filter: Filter,
    /// Plan only.
    pub dry_run: bool,
    /// Versions the plan must keep (the agent's newest successful backup): a plan that drops
    /// one of them, or keeps none of the versions selected, is refused and nothing is dropped.
    pub must_keep: Vec<Id>,
}

/// The versions a retention policy keeps and drops.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ForgetPlan {
    /// Kept, by id (protected ones among them).
    pub keep: Vec<Id>,
    /// Dropped (or to drop), by id.
    pub drop: Vec<Id>,
    /// True when nothing was dropped: the plan was only shown.
    pub dry_run: bool,
}

impl JobOutput for ForgetPlan {}

/// Refuses a policy without a rule: it would drop every version. (Callers check it before they
/// ask for a passphrase; [`forget`] checks it again.)
pub fn require_rule(policy: &Policy) -> Result<()> {
    if !policy.is_empty() {
        return Ok(());
    }
    Err(EngineError::new(ErrorCode::InvalidInput, "forget needs at least one `--keep-…` option")
        .with_cause("without a rule every version would be dropped")
        .with_resolution("for example `sysstate forget --keep-daily 7 --keep-weekly 4`"))
}

/// Applies a retention policy to the versions the filter selects, group by group: plans which
/// go and, unless a dry run, drops them (their data stays until `prune`). Protected versions are
/// kept. An empty policy is refused: it would drop every version.
pub fn forget(repo: &Repository, request: &ForgetRequest) -> Result<ForgetPlan> {
    require_rule(&request.policy)?;
    let _lease = Lease::acquire(repo.backend().clone(), false, "forget")?;
    let selected: Vec<(Id, Version)> =
        repo.versions()?.into_iter().filter(|(_, version)| request.filter.matches(version)).collect();
    let protected = repo.protected()?;
    let (keep, drop) = sysstate_repo::forget::plan(&selected, &request.policy, request.group_by, &protected);
    let lost = request.must_keep.iter().find(|id| drop.contains(id));
    if lost.is_some() || (!request.must_keep.is_empty() && keep.is_empty() && !drop.is_empty()) {
        let what = match lost {
            Some(id) => format!("version {}, the last successful backup", id.short()),
            None => format!("all {} versions", drop.len()),
        };
        return Err(EngineError::new(
            ErrorCode::RetentionRefused,
            format!("the retention policy would drop {what}: nothing was dropped"),
        ));
    }
    if !request.dry_run {
        for id in &drop {
            repo.forget_version(id)?;
        }
    }
    Ok(ForgetPlan { keep, drop, dry_run: request.dry_run })
}

/// Protects a version (never forgotten until unprotected), or lifts its protection; returns
/// its id.
pub fn protect(repo: &Repository, version: &str, protect: bool) -> Result<Id> {
    let _lease = Lease::acquire(repo.backend().clone(), false, "protect")?;
    let (id, _) = repo.find_version(version)?;
    repo.protect(&id, protect)?;
    Ok(id)
}

/// Drops the versions named (unique id prefixes), readable or damaged: a damaged manifest is
/// dropped by its name.
pub fn forget_named(repo: &Repository, names: &[String], dry_run: bool) -> Result<ForgetPlan> {
    let _lease = Lease::acquire(repo.backend().clone(), false, "forget")?;
    let drop = sysstate_repo::repair::forget_by_name(repo, names, &repo.protected()?, dry_run)?;
    Ok(ForgetPlan { keep: Vec::new(), drop: drop.iter().filter_map(|n| Id::from_hex(n)).collect(), dry_run })
}

/// Which part of the repository `repair` mends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairPart {
    /// A new index from the packs' headers.
    Index,
    /// Damaged packs read, their intact blobs moved, their damaged blobs out of the index.
    Blobs,
    /// Misnamed manifests renamed, damaged ones removed.
    Versions,
}

/// What a repair found and did.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum RepairOutcome {
    /// `repair index`.
    Index(sysstate_repo::repair::IndexRepair),
    /// `repair blobs`.
    Blobs(sysstate_repo::repair::BlobRepair),
    /// `repair versions`.
    Versions(sysstate_repo::repair::VersionRepair),
}

impl JobOutput for RepairOutcome {
    /// What a repair could not mend (unreadable pack headers, lost blobs) ends its job with
    /// warnings: the repository is usable, and not whole.
    fn warnings(&self) -> usize {
        match self {
            RepairOutcome::Index(report) => report.unreadable.len(),
            RepairOutcome::Blobs(report) => report.lost.len(),
            RepairOutcome::Versions(_) => 0,
        }
    }
}

/// Repairs one part of the repository under an exclusive lease (see
/// [`sysstate_repo::repair`]); with `dry_run`, says what it would do.
pub fn repair(repo: &Repository, part: RepairPart, dry_run: bool, progress: &dyn Progress) -> Result<RepairOutcome> {
    let _lease = Lease::acquire(repo.backend().clone(), true, "repair")?;
    Ok(match part {
        RepairPart::Index => RepairOutcome::Index(sysstate_repo::repair::index(repo, dry_run, progress)?),
        RepairPart::Blobs => RepairOutcome::Blobs(sysstate_repo::repair::blobs(repo, dry_run, progress)?),
        RepairPart::Versions => RepairOutcome::Versions(sysstate_repo::repair::versions(repo, dry_run)?),
    })
}

/// What prune planned and, unless a dry run, did.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PruneOutcome {
    /// What was to be done.
    pub plan: PrunePlan,
    /// What was done (none in a dry run).
    pub done: Option<PruneReport>,
}

impl JobOutput for PruneOutcome {}

/// Removes data no version needs, under an exclusive lease: plans, then (unless `dry_run`)
/// executes the plan.
pub fn prune(repo: &Repository, dry_run: bool, progress: &dyn Progress) -> Result<PruneOutcome> {
    let _lease = Lease::acquire(repo.backend().clone(), true, "prune")?;
    let mut plan = sysstate_repo::prune::plan(repo)?;
    let done = if dry_run { None } else { Some(plan.execute(repo, progress)?) };
    Ok(PruneOutcome { plan, done })
}

/// Where `copy` sends versions.
pub struct ReplicateRequest<'a> {
    /// The destination repository (created when the target has none).
    pub to: &'a str,
    /// Its passphrase.
    pub to_passphrase: &'a [u8],
    /// Versions to copy (empty: every version).
    pub versions: &'a [String],
    /// The most bytes per second to send, asked before each write (`None`: no limit).
    pub limit: Option<sysstate_repo::backend::Limit>,
}

impl std::fmt::Debug for ReplicateRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicateRequest")
            .field("to", &self.to)
            .field("versions", &self.versions)
            .field("limited", &self.limit.is_some())
            .finish_non_exhaustive()
    }
}

impl ReplicateRequest<'_> {
    /// The limit of a bandwidth schedule (`[vault] bandwidth`, …), or none when it never limits.
    pub fn limit_of(schedule: crate::schedule::Bandwidth) -> Option<sysstate_repo::backend::Limit> {
        (!schedule.is_unlimited()).then(|| {
            std::sync::Arc::new(move || schedule.limit_at(&chrono::Local::now())) as sysstate_repo::backend::Limit
        })
    }

    /// True when a destination made by this replication takes the source's key: a vault's
    /// (one key domain, `docs/vault.md`), so that packs go as they are. Any other new
    /// destination gets a key of its own, as `sysstate copy` promises.
    fn shares_key(&self) -> bool {
        self.to.starts_with("vault://")
    }
}

/// One version replicated, or found already there.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Replicated {
    /// Its id in the source.
    pub from: String,
    /// Its id in the destination (none when it was already there).
    pub to: Option<String>,
}

/// What replication (`sysstate copy`) did.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReplicationReport {
    /// Each version chosen, in order.
    pub versions: Vec<Replicated>,
    /// How: `packs` (one key: packs sent as they are) or `re-encrypted` (another key: every blob
    /// opened and sealed again).
    pub mode: &'static str,
    /// What went, when packs were sent as they are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packs: Option<sysstate_repo::replicate::PackStats>,
}

impl JobOutput for ReplicationReport {}

/// Replicates (`sysstate copy`) the versions the destination lacks (same time, host and root)
/// under shared leases on both repositories. A vault with no repository is made with the
/// source's key ([`Repository::init_like`]), so that packs go as they are; between repositories
/// of one key they do ([`sysstate_repo::replicate::PackSender`]), else every blob is sealed again.
pub fn replicate(from: &Repository, request: &ReplicateRequest<'_>) -> Result<ReplicationReport> {
    let mut backend = super::backend(request.to)?;
    if let Some(limit) = &request.limit {
        backend = std::sync::Arc::new(sysstate_repo::backend::ThrottledBackend::new(backend, limit.clone()));
    }
    let destination = if request.shares_key() {
        super::open_or_create_like(backend, from, request.to_passphrase)?.0
    } else {
        super::open_or_create(backend, request.to_passphrase)?.0
    };
    let missing_of = |chosen: &[(Id, Version)]| -> Result<Vec<Id>> {
        let existing: Vec<(i64, String, String)> =
            destination.versions()?.into_iter().map(|(_, v)| (v.time_ns, v.host, v.root_path)).collect();
        Ok(chosen
            .iter()
            .filter(|(_, v)| !existing.contains(&(v.time_ns, v.host.clone(), v.root_path.clone())))
            .map(|(id, _)| *id)
            .collect())
    };
    let chosen: Vec<(Id, Version)> = if request.versions.is_empty() {
        from.versions()?
    } else {
        request.versions.iter().map(|v| from.find_version(v)).collect::<std::result::Result<_, _>>()?
    };
    // Nothing to send is found by reading alone, with no lease and no index: the agent
    // replicates after every backup, and most find the vault up to date.
    let mut missing = missing_of(&chosen)?;
    let _leases = if missing.is_empty() {
        None
    } else {
        destination.load_index()?;
        let leases = (from.read_lease("copy")?, Lease::acquire(destination.backend().clone(), false, "copy")?);
        missing = missing_of(&chosen)?; // again under the leases: what is there now counts
        Some(leases)
    };
    let same_key = sysstate_repo::replicate::same_key(from, &destination);
    let mut packs = None;
    if same_key && !missing.is_empty() {
        let there: std::collections::HashSet<Id> = destination
            .backend()
            .list(FileKind::Pack)?
            .into_iter()
            .filter_map(|(name, _)| Id::from_hex(&name))
            .collect();
        let saver = sysstate_repo::saver::BlobSaver::new(&destination);
        let mut sender = sysstate_repo::replicate::PackSender::new(from, there);
        for id in &missing {
            sender.send(&saver, id)?;
        }
        saver.finish()?;
        // The manifests last: a version appears only once all it needs is stored and indexed.
        for id in &missing {
            sysstate_repo::replicate::send_manifest(from, &destination, id)?;
        }
        packs = Some(sender.stats);
    }
    let mut report =
        ReplicationReport { versions: Vec::new(), mode: if same_key { "packs" } else { "re-encrypted" }, packs };
    for (id, _) in chosen {
        let to = match (missing.contains(&id), same_key) {
            (false, _) => None,
            (true, true) => Some(id.to_hex()),
            (true, false) => Some(sysstate_repo::replicate::replicate_version(from, &destination, &id)?.to_hex()),
        };
        report.versions.push(Replicated { from: id.to_hex(), to });
    }
    Ok(report)
}
