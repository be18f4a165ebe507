//! `sysstate recover`: a version rebuilt onto a blank disk, or its plan (`--dry-run`).

use super::{Context, Outcome};
use crate::cli::RecoverArgs;
use crate::output::{bytes, print_json};
use sysstate_engine::jobs::JobKind;
use sysstate_engine::recover::{RecoverPlan, RecoverReport, RecoverRequest};
use sysstate_engine::Result;

pub fn recover(context: &Context<'_>, args: &RecoverArgs) -> Result<Outcome> {
    let kind = if args.dry_run { JobKind::RecoverDryRun } else { JobKind::Recover };
    let report = context.run_job(kind, &args.components, "recovering", |job| {
        let request = RecoverRequest {
            version: args.version.clone(),
            disk: args.disk.clone(),
            dry_run: args.dry_run,
            overwrite: args.overwrite,
            mirror: args.mirror.clone(),
            base_tarball: args.base_tarball.clone(),
            components: args.components.clone(),
            job: job.id().to_string(),
        };
        sysstate_engine::recover::recover(&context.open(Some(job))?, &request, job)
    })?;
    if context.json() {
        print_json(&serde_json::to_value(&report).expect("reports encode"));
        return Ok(context.warned(report.warnings.len()));
    }
    print_plan(context, &report.plan);
    print_report(context, &report);
    Ok(context.warned(report.warnings.len()))
}

fn print_plan(context: &Context<'_>, plan: &RecoverPlan) {
    let system = &plan.system;
    let name = if system.name.is_empty() {
        format!("{} {}", system.distribution, system.release)
    } else {
        system.name.clone()
    };
    context.say(format!(
        "version {} of `{}`: {name} ({}), booting by {}",
        &plan.version[..12],
        system.hostname,
        system.architecture,
        plan.firmware
    ));
    context.say(format!(
        "disk `{}`: {} ({} bytes, {}-byte sectors); the partitions need {} bytes",
        plan.disk.path,
        bytes(plan.disk.size_bytes),
        plan.disk.size_bytes,
        plan.disk.sector_size,
        plan.needed_bytes
    ));
    context.say(format!("1. partition table: {} {}", plan.table, plan.table_id));
    for p in &plan.partitions {
        context.say(format!(
            "   partition {}: sectors {}+{} type {} {} {}",
            p.number, p.start, p.size, p.kind, p.uuid, p.name
        ));
    }
    context.say("2. filesystems:");
    for fs in &plan.filesystems {
        let at = if fs.mountpoint.is_empty() { String::new() } else { format!(", mounted at {}", fs.mountpoint) };
        context.say(format!("   partition {}: {}{at}: {}", fs.partition, fs.kind, fs.command.join(" ")));
    }
    context.say(format!("3. base system: debootstrap {} from {}", system.codename, plan.base));
    context.say(format!("4. packages: the version's {} with apt from {}", plan.packages, plan.mirror));
    context.say(format!("5. restore: {}", plan.components.join(", ")));
    context.say(format!("6. boot loader: initramfs, grub.cfg, GRUB for {}", plan.firmware));
    for note in &plan.notes {
        context.say(format!("note: {note}"));
    }
}

fn print_report(context: &Context<'_>, report: &RecoverReport) {
    if report.dry_run {
        context.say("dry run: nothing was written");
        return;
    }
    for step in &report.steps {
        context.say(format!("  {}: {:.1} s", step.name, step.seconds));
    }
    for warning in &report.warnings {
        context.say(format!("warning: {warning}"));
    }
    context.say(format!(
        "recovered version {} onto `{}`: {} files restored over a new {} system; it boots from that disk",
        &report.plan.version[..12],
        report.plan.disk.path,
        report.restored_files,
        report.plan.system.codename
    ));
}
