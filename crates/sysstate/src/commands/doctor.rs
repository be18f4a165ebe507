//! `sysstate doctor` and `sysstate services`: printing what `sysstate-doctor` finds.

use super::Outcome;
use crate::cli::Cli;
use crate::output::print_json;
use sysstate_doctor::services::StartType;
use sysstate_doctor::Status;
use sysstate_engine::{credentials, paths, Result};

/// Runs the checks and the diagnosis; exit 2 when a check failed or a failure stands, 1 when a
/// check warns.
pub fn doctor(cli: &Cli, fix: bool, validate: bool) -> Result<Outcome> {
    let config_file = cli.global.config.clone().unwrap_or_else(paths::config_file);
    // The passphrase lets the doctor open the repository; the config may be broken (that is a
    // check), so it is read here only to find the target.
    let config = sysstate_engine::config::Config::load(&config_file, cli.global.config.is_some()).ok();
    let target = cli
        .global
        .target
        .clone()
        .or_else(|| config.as_ref().and_then(|c| c.backup.target.clone()))
        .unwrap_or_else(paths::default_target);
    let passphrase =
        credentials::find(&target, cli.global.passphrase_file.as_deref(), &paths::state_dir()).ok().flatten();
    let options = sysstate_doctor::Options {
        config_file,
        config_required: cli.global.config.is_some(),
        root: cli.global.root(),
        target: cli.global.target.clone(),
        passphrase,
        fix,
        validate,
    };
    let report = sysstate_doctor::run(&options);
    if cli.global.json {
        print_json(&serde_json::to_value(&report).expect("reports encode"));
    } else if !cli.global.quiet || report.failed() {
        for check in &report.checks {
            if cli.global.quiet && check.status != Status::Failed {
                continue;
            }
            let status = match check.status {
                Status::Ok => "ok",
                Status::Warning => "warning",
                Status::Failed => "FAILED",
            };
            crate::outln!("{status:<8} {:<30} {}", check.id, check.found);
            if let Some(fixed) = &check.fixed {
                crate::outln!("{:<8} {:<30} fixed: {fixed}", "", "");
            }
            if let (Some(resolution), true) = (&check.resolution, check.status != Status::Ok) {
                crate::outln!("{:<8} {:<30} resolution: {resolution}", "", "");
            }
        }
        for diagnosis in &report.diagnoses {
            crate::outln!();
            crate::outln!(
                "job {} ({}, ended {}) failed: error[{}]: {}",
                diagnosis.job,
                diagnosis.kind,
                diagnosis.ended.as_deref().unwrap_or("?"),
                diagnosis.code,
                diagnosis.message
            );
            crate::outln!("  cause: {}", diagnosis.cause);
            crate::outln!("  how we know: {}", diagnosis.tell);
            for specific in &diagnosis.specifics {
                crate::outln!("  - {specific}");
            }
            crate::outln!("  resolution: {}", diagnosis.resolution);
        }
        let count = |status| report.checks.iter().filter(|c| c.status == status).count();
        crate::outln!();
        crate::outln!(
            "{} checks: {} ok, {} warnings, {} failed; {} failed jobs diagnosed",
            report.checks.len(),
            count(Status::Ok),
            count(Status::Warning),
            count(Status::Failed),
            report.diagnoses.len()
        );
    }
    let warnings = report.checks.iter().filter(|c| c.status == Status::Warning).count();
    Ok(if report.failed() { Outcome::Failed } else { Outcome::warned(warnings) })
}

/// The parts of the service and their state.
pub fn services(cli: &Cli, config: &sysstate_engine::config::Config) -> Result<Outcome> {
    let parts =
        sysstate_doctor::services::parts(config, &cli.global.root(), &paths::state_dir(), &paths::runtime_dir());
    if cli.global.json {
        print_json(&serde_json::to_value(&parts).expect("parts encode"));
    } else {
        crate::outln!("{:<22} {:<11} status", "part", "start type");
        for part in &parts {
            let start = match part.start_type {
                StartType::AlwaysOn => "always-on",
                StartType::OnDemand => "on-demand",
            };
            crate::outln!("{:<22} {start:<11} {}", part.name, part.status);
        }
    }
    Ok(if parts.iter().all(|p| p.healthy) { Outcome::Success } else { Outcome::Failed })
}
