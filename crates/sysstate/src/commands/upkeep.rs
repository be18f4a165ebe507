//! Repository upkeep: `check`, `forget`, `prune`, `copy`.

use super::{Context, Outcome};
use crate::cli::{ForgetArgs, RepairCommand};
use crate::output::{bytes, print_json};
use std::path::Path;
use sysstate_engine::jobs::{JobKind, JobOutput};
use sysstate_engine::ops::upkeep::{self, RepairOutcome, RepairPart, ReplicateRequest};
use sysstate_engine::{credentials, EngineError, ErrorCode, Result};
use sysstate_repo::Id;

pub fn check(context: &Context<'_>, read_data: bool, sample: Option<&str>) -> Result<Outcome> {
    let read = match (read_data, sample) {
        (true, _) => upkeep::ReadData::All,
        (false, Some(text)) => upkeep::ReadData::Sample(
            sysstate_engine::schedule::parse_percent(text)
                .map_err(|e| EngineError::new(ErrorCode::InvalidInput, format!("`--read-data-sample`: {e}")))?,
        ),
        (false, None) => upkeep::ReadData::None,
    };
    let read_data = read != upkeep::ReadData::None;
    let outcome =
        context.run_job(JobKind::Check, &[], "checking", |job| upkeep::check(&context.open_unhooked()?, read, job))?;
    let report = &outcome.report;
    let failure = outcome.failure();
    context.note_unleased(outcome.read_without_lease.as_ref());
    if context.json() {
        let value = serde_json::to_value(report).expect("report encodes");
        return Ok(super::json_report(value, failure.as_ref(), Outcome::warned(report.warnings.len())));
    }
    for warning in &report.warnings {
        sysstate_engine::errln!("warning: {warning}");
    }
    for error in &report.errors {
        sysstate_engine::errln!("damage: {error}");
    }
    for file in &report.damaged_files {
        sysstate_engine::errln!("cannot be restored whole: {file}");
    }
    context.say(format!(
        "checked {} versions, {} packs, {} blobs{}: {}",
        report.versions,
        report.packs,
        report.blobs,
        if read_data { format!(", read {}", bytes(report.bytes_read)) } else { String::new() },
        if report.is_clean() { "no damage found" } else { "DAMAGE FOUND" }
    ));
    match failure {
        Some(error) => Err(error),
        None => Ok(Outcome::warned(report.warnings.len())),
    }
}

pub fn forget(context: &Context<'_>, args: &ForgetArgs) -> Result<Outcome> {
    let within = args
        .keep_within
        .as_deref()
        .map(|text| {
            sysstate_engine::shadow::parse_duration(text)
                .map(|d| d.as_nanos() as i64)
                .map_err(|e| EngineError::new(ErrorCode::InvalidInput, format!("`--keep-within`: {e}")))
        })
        .transpose()?;
    let group_by = sysstate_repo::forget::GroupBy::parse(&args.group_by)
        .map_err(|e| EngineError::new(ErrorCode::InvalidInput, format!("`--group-by`: {e}")))?;
    let request = upkeep::ForgetRequest {
        policy: sysstate_repo::forget::Policy {
            last: args.keep_last,
            daily: args.keep_daily,
            weekly: args.keep_weekly,
            monthly: args.keep_monthly,
            yearly: args.keep_yearly,
            within_ns: within,
            tags: args.keep_tag.clone(),
        },
        group_by,
        filter: args.filter.filter(),
        dry_run: args.dry_run,
        must_keep: Vec::new(),
    };
    let policy = &request.policy;
    let plan = context.run_job(JobKind::Forget, &[], "forgetting", |job| {
        if !args.versions.is_empty() {
            return upkeep::forget_named(&context.open(Some(job))?, &args.versions, args.dry_run);
        }
        upkeep::require_rule(policy)?;
        let repo = context.open(Some(job))?;
        super::require_known_components(&context.config, &repo, &request.filter.components)?;
        upkeep::forget(&repo, &request)
    })?;
    if context.json() {
        print_json(&serde_json::to_value(&plan).expect("plans encode"));
        return Ok(context.outcome());
    }
    for id in &plan.drop {
        context.say(format!("{} version {}", if plan.dry_run { "would drop" } else { "dropped" }, id.short()));
    }
    context.say(format!(
        "{} versions kept, {} {}; run `sysstate prune` to free their space",
        plan.keep.len(),
        plan.drop.len(),
        if plan.dry_run { "would be dropped" } else { "dropped" }
    ));
    Ok(context.outcome())
}

pub fn prune(context: &Context<'_>, dry_run: bool) -> Result<Outcome> {
    let outcome = context
        .run_job(JobKind::Prune, &[], "pruning", |job| upkeep::prune(&context.open(Some(job))?, dry_run, job))?;
    if context.json() {
        // The report as before, and the plan beside it.
        let mut value = match &outcome.done {
            Some(done) => serde_json::to_value(done).expect("reports encode"),
            None => serde_json::json!({}),
        };
        value["plan"] = serde_json::to_value(&outcome.plan).expect("plans encode");
        print_json(&value);
        return Ok(Outcome::Success);
    }
    let plan = &outcome.plan;
    match &outcome.done {
        None => context.say(format!(
            "would prune: {} blobs kept, {} dropped; {} packs deleted, {} repacked ({} to read), {} packs and {} temporary files left by interrupted backups deleted; about {} freed (dry run: nothing was changed)",
            plan.blobs_used,
            plan.blobs_unused,
            plan.delete.len(),
            plan.repack.len(),
            bytes(plan.bytes_to_repack),
            plan.orphans.len(),
            plan.temporaries.len(),
            bytes(plan.bytes_to_free),
        )),
        Some(report) => context.say(format!(
            "pruned: {} blobs kept, {} dropped; {} packs deleted, {} repacked, {} packs and {} temporary files left by interrupted backups deleted; {} freed, {} written",
            report.blobs_used,
            report.blobs_dropped,
            report.packs_deleted,
            report.packs_repacked,
            report.orphan_packs_deleted,
            report.temporaries_deleted,
            bytes(report.bytes_freed),
            bytes(report.bytes_written)
        )),
    }
    Ok(Outcome::Success)
}

pub fn copy(
    context: &Context<'_>,
    to: &str,
    to_passphrase_file: Option<&Path>,
    versions: &[String],
    bandwidth: Option<&str>,
) -> Result<Outcome> {
    let limit = match bandwidth {
        Some(text) => {
            let rate = sysstate_engine::schedule::parse_rate(text)
                .map_err(|e| EngineError::new(ErrorCode::InvalidInput, format!("`--bandwidth`: {e}")))?;
            ReplicateRequest::limit_of(sysstate_engine::schedule::Bandwidth { outside: Some(rate), work: None })
        }
        None => None,
    };
    let report = context.run_job(JobKind::Copy, &[], "copying", |job| {
        let from = context.open(Some(job))?;
        // The file given wins over the environment, as for every passphrase.
        let to_passphrase = match (to_passphrase_file, std::env::var_os("SYSSTATE_TO_PASSPHRASE")) {
            (Some(path), _) => credentials::read_passphrase_file(path)?,
            (None, Some(value)) => credentials::not_empty(
                std::os::unix::ffi::OsStrExt::as_bytes(value.as_os_str()).to_vec(),
                "`SYSSTATE_TO_PASSPHRASE`",
            )?,
            (None, None) => context.passphrase()?,
        };
        upkeep::replicate(
            &from,
            &ReplicateRequest { to, to_passphrase: &to_passphrase, versions, limit: limit.clone() },
        )
    })?;
    let short = |id: &str| Id::from_hex(id).map(|id| id.short()).unwrap_or_else(|| id.to_string());
    let mut copied = Vec::new();
    for version in &report.versions {
        match &version.to {
            None => context.say(format!("version {} is already in `{to}`", short(&version.from))),
            Some(new) => {
                context.say(format!("copied version {} to `{to}` as {}", short(&version.from), short(new)));
                copied.push(serde_json::json!({"from": version.from, "to": new}));
            }
        }
    }
    match &report.packs {
        Some(packs) if !copied.is_empty() => context.say(format!(
            "packs sent as they are (one key): {} sent ({}), {} there already from a replication that stopped, {} blobs packed anew",
            packs.packs_sent,
            crate::output::bytes(packs.bytes_sent),
            packs.packs_there,
            packs.blobs_repacked
        )),
        None if !copied.is_empty() => context.say("every blob opened and sealed again under the destination's key (another key)"),
        _ => {}
    }
    if context.json() {
        print_json(&serde_json::json!({"copied": copied, "mode": report.mode, "packs": report.packs}));
    }
    Ok(context.outcome())
}

pub fn repair(context: &Context<'_>, part: &RepairCommand) -> Result<Outcome> {
    let (which, dry_run) = match *part {
        RepairCommand::Index { dry_run } => (RepairPart::Index, dry_run),
        RepairCommand::Blobs { dry_run } => (RepairPart::Blobs, dry_run),
        RepairCommand::Versions { dry_run } => (RepairPart::Versions, dry_run),
    };
    // The repair reads what is damaged itself: the index and manifests it mends are not
    // warnings here.
    let outcome = context.run_job(JobKind::Repair, &[], "repairing", |job| {
        upkeep::repair(&context.open_unhooked()?, which, dry_run, job)
    })?;
    let warnings = outcome.warnings();
    if context.json() {
        print_json(&serde_json::to_value(&outcome).expect("repairs encode"));
        return Ok(Outcome::warned(warnings));
    }
    let would = |done: &str, planned: &str| if dry_run { planned.to_string() } else { done.to_string() };
    match &outcome {
        RepairOutcome::Index(report) => {
            for pack in &report.unreadable {
                sysstate_engine::errln!("warning: the header of pack {pack}");
            }
            for stray in &report.strays {
                context.say(format!("{} `{stray}` (not a repository file)", would("removed", "would remove")));
            }
            context.say(format!(
                "{} from the headers of {} packs: {} blobs; {} packs no index listed are found again; {} index files {}{}",
                would("index rebuilt", "the index would be rebuilt"),
                report.packs,
                report.blobs,
                report.packs_found.len(),
                report.replaced.len(),
                would("replaced", "would be replaced"),
                if report.unreadable.is_empty() {
                    String::new()
                } else {
                    format!("; {} packs have an unreadable header: run `sysstate repair blobs`", report.unreadable.len())
                }
            ));
        }
        RepairOutcome::Blobs(report) => {
            for pack in &report.damaged {
                context.say(format!("damaged pack {pack}"));
            }
            for file in &report.files_lacking {
                sysstate_engine::errln!("lacks data: {file}");
            }
            context.say(format!(
                "read {} packs ({}): {} damaged; {} intact blobs {}, {} blobs lost{}",
                report.packs,
                bytes(report.bytes_read),
                report.damaged.len(),
                report.salvaged,
                would("moved to new packs", "would be moved to new packs"),
                report.lost.len(),
                if report.versions_lacking.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; versions lacking data: {}. Run `sysstate backup`: every file whose content this machine still has is stored again, and each version that names it is whole again",
                        report.versions_lacking.join(", ")
                    )
                }
            ));
        }
        RepairOutcome::Versions(report) => {
            for renamed in &report.renamed {
                context.say(format!(
                    "{} {renamed} (stored under another version's name)",
                    would("renamed", "would rename")
                ));
            }
            for removed in &report.removed {
                context.say(format!("{} versions/{removed}", would("removed", "would remove")));
            }
            if report.renamed.is_empty() && report.removed.is_empty() {
                context.say("every version manifest is sound: nothing to repair");
            }
        }
    }
    Ok(Outcome::warned(warnings))
}

pub fn protect(context: &Context<'_>, version: &str, protect: bool) -> Result<Outcome> {
    let id = upkeep::protect(&context.open(None)?, version, protect)?;
    if context.json() {
        print_json(&serde_json::json!({"version": id.to_hex(), "protected": protect}));
    } else if protect {
        context.say(format!(
            "version {} is protected: forget leaves it until `sysstate unprotect {}`",
            id.short(),
            id.short()
        ));
    } else {
        context.say(format!("version {} is no longer protected", id.short()));
    }
    Ok(context.outcome())
}
