//! `sysstate restore`: to an alternate root, in place (with its dry run), and `--undo`.

use super::{Context, Outcome};
use crate::cli::RestoreArgs;
use crate::output::{bytes, print_json};
use serde_json::json;
use std::path::Path;
use sysstate_engine::inplace::{Identity, InPlaceReport, InPlaceRequest};
use sysstate_engine::jobs::{JobKind, JobOutput};
use sysstate_engine::ops::{self, RestoreRequest};
use sysstate_engine::{EngineError, ErrorCode, Result};
use sysstate_repo::inplace::{Change, Difference};

pub fn restore(context: &Context<'_>, args: &RestoreArgs) -> Result<Outcome> {
    if let Some(job) = &args.undo {
        return undo(context, job);
    }
    if args.in_place {
        return in_place(context, args);
    }
    let to = args.to.as_ref().ok_or_else(|| {
        EngineError::new(ErrorCode::InvalidInput, "restore needs `--to DIR`, `--in-place` or `--undo JOB`")
    })?;
    if args.dry_run {
        return dry_run_to(context, args, to);
    }
    let request = RestoreRequest {
        version: args.version.clone(),
        components: args.components.clone(),
        to: to.clone(),
        threads: args.threads,
    };
    let started = std::time::Instant::now();
    let report = context.run_job(JobKind::Restore, &args.components, "restoring", |job| {
        ops::restore_to(&context.open(Some(job))?, &request, job)
    })?;
    let stats = &report.stats;
    let failure = report.failure();
    context.note_unleased(report.read_without_lease.as_ref());
    if context.json() {
        let value = json!({
            "version": report.id.to_hex(),
            "to": to.display().to_string(),
            "files": stats.files, "dirs": stats.dirs, "others": stats.others, "bytes": stats.bytes,
            "warnings": report.warnings.iter().map(|w| json!({"path": w.path, "message": w.message})).collect::<Vec<_>>(),
            "damaged": report.damaged.iter().map(|w| w.path.as_str()).collect::<Vec<_>>(),
        });
        return Ok(super::json_report(value, failure.as_ref(), context.warned(report.warnings.len())));
    } else {
        context.say(format!(
            "restored version {} to `{}`: {} files, {} dirs, {} others, {} in {:.2} s",
            report.id.short(),
            to.display(),
            stats.files,
            stats.dirs,
            stats.others,
            bytes(stats.bytes),
            started.elapsed().as_secs_f64()
        ));
    }
    // What the repository could not give back is listed with --quiet too: it is the failure.
    if context.cli.global.quiet {
        for damaged in &report.damaged {
            sysstate_engine::errln!("not restored: {}: {}", damaged.path, damaged.message);
        }
    }
    if let Some(error) = failure {
        return Err(error);
    }
    if !report.warnings.is_empty() && context.shows_text() {
        sysstate_engine::errln!(
            "{} entries could not be restored (listed above); everything else was",
            report.warnings.len()
        );
    }
    Ok(context.warned(report.warnings.len()))
}

fn in_place(context: &Context<'_>, args: &RestoreArgs) -> Result<Outcome> {
    let kind = if args.dry_run { JobKind::RestoreDryRun } else { JobKind::RestoreInPlace };
    let root = context.cli.global.root();
    let report = context.run_job(kind, &args.components, "restoring", |job| {
        let request = InPlaceRequest {
            root: root.clone(),
            version: args.version.clone(),
            components: args.components.clone(),
            dry_run: args.dry_run,
            apply_packages: args.apply_packages,
            identity: args.identity.as_deref().map(|mode| match mode {
                "leave" => Identity::Leave,
                _ => Identity::Keep,
            }),
            job: job.id().to_string(),
        };
        sysstate_engine::inplace::restore_in_place(&context.open(Some(job))?, &request, &context.config)
    })?;
    context.note_unleased(report.read_without_lease.as_ref());
    if context.json() {
        print_json(&serde_json::to_value(&report).expect("reports encode"));
        return Ok(context.outcome());
    }
    print_in_place(context, &root, &report);
    Ok(context.outcome())
}

fn print_in_place(context: &Context<'_>, root: &Path, report: &InPlaceReport) {
    for difference in &report.differences {
        context.say(describe(difference));
    }
    let count = |change| report.differences.iter().filter(|d| d.change == change).count();
    let (added, changed, removed) = (count(Change::Add), count(Change::Change), count(Change::Remove));
    let short = report.version.get(..12).unwrap_or(&report.version);
    if report.dry_run {
        context.say(format!(
            "version {short} against `{}`: {added} to add, {changed} to change, {removed} to remove (dry run: nothing was changed)",
            root.display()
        ));
    } else if report.differences.is_empty() {
        context.say(format!("`{}` already equals version {short}: nothing to restore", root.display()));
    } else if let Some(job) = &report.undo {
        context.say(format!(
            "restored version {short} in place: {added} added, {changed} changed, {removed} removed; every replaced entry is kept: `sysstate restore --undo {job}` puts them back"
        ));
    }
    if report.identity.mode == Identity::Leave {
        context.say(format!(
            "identity: `{}` keeps its own host name, machine-id, SSH host keys and network configuration",
            root.display()
        ));
    } else if report.identity.other_machine {
        context.say(format!(
            "identity: `{}` takes the version's host name, machine-id, SSH host keys and network configuration",
            root.display()
        ));
    }
    for component in &report.next_boot {
        context.say(format!("component `{component}` changed: it takes effect at the next boot"));
    }
    if let Some(packages) = &report.packages {
        context.say(format!(
            "packages: {} to install, {} to remove to match the version{}",
            packages.to_install.len(),
            packages.to_remove.len(),
            match &packages.selections {
                Some(file) => format!("; its selection is in `{file}`"),
                None => String::new(),
            }
        ));
        if packages.applied {
            context.say("packages: the package set was reconciled");
        } else if !packages.to_install.is_empty() || !packages.to_remove.is_empty() {
            context.say("packages: to reconcile the package set, run (or restore again with --apply-packages):");
            for command in &packages.commands {
                context.say(format!("  {command}"));
            }
        }
    }
}

/// A difference as the CLI prints it: `+ path`, `~ path (what)`, `- path`.
fn describe(difference: &Difference) -> String {
    let count = if difference.entries > 1 { format!(" ({} entries)", difference.entries) } else { String::new() };
    match difference.change {
        Change::Add => format!("+ {}{count}", difference.path),
        Change::Remove => format!("- {}{count}", difference.path),
        Change::Change => format!("~ {} ({}){count}", difference.path, difference.what.join(", ")),
    }
}

fn undo(context: &Context<'_>, job: &str) -> Result<Outcome> {
    let report = context.run_job(JobKind::Undo, &[], "undoing", |_| {
        sysstate_engine::inplace::undo(
            job,
            context.cli.global.root.as_ref().map(|_| context.cli.global.root()).as_deref(),
        )
    })?;
    if context.json() {
        print_json(&serde_json::to_value(&report).expect("reports encode"));
    } else {
        for difference in &report.differences {
            context.say(describe(difference));
        }
        context.say(format!(
            "undid the in-place restore {job}: {} entries put back as they were",
            report.differences.len()
        ));
    }
    Ok(Outcome::Success)
}

/// `restore --to DIR --dry-run`: what the restore would write beneath DIR; writes nothing.
fn dry_run_to(context: &Context<'_>, args: &RestoreArgs, to: &Path) -> Result<Outcome> {
    let items = sysstate_engine::ops::read::items(&context.open(None)?, &args.version, &args.components)?;
    let files = items.entries.iter().filter(|e| e.kind == "f");
    let (count, size) = files.fold((0, 0), |(n, b), e| (n + 1, b + e.size));
    if context.json() {
        print_json(&json!({
            "version": items.version,
            "to": to.display().to_string(),
            "dry-run": true,
            "files": count,
            "bytes": size,
            "entries": items.entries,
        }));
        return Ok(context.outcome());
    }
    for entry in &items.entries {
        context.say(format!("+ {} {}", entry.kind, to.join(entry.path.trim_start_matches('/')).display()));
    }
    context.say(format!(
        "would restore version {} to `{}`: {} entries, {count} files, {} (dry run: nothing was written)",
        &items.version[..8],
        to.display(),
        items.entries.len(),
        bytes(size)
    ));
    Ok(context.outcome())
}
