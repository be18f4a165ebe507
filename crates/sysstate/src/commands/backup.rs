//! `sysstate backup`.

use super::{Context, Outcome};
use crate::output::{bytes, print_json};
use serde_json::json;
use sysstate_engine::jobs::JobKind;
use sysstate_engine::ops::{self, BackupRequest};
use sysstate_engine::{EngineError, ErrorCode, Result};

/// A system state backup as a job: the shadow set's phases as its current operation, the
/// archiver's progress, the shadow set's warnings as events as they happen.
pub fn backup(
    context: &Context<'_>,
    components: &[String],
    tags: &[String],
    threads: usize,
    wait: Option<&str>,
) -> Result<Outcome> {
    let global = &context.cli.global;
    let target = &context.target;
    let wait = wait
        .map(|text| {
            sysstate_engine::shadow::parse_duration(text)
                .map_err(|e| EngineError::new(ErrorCode::InvalidInput, format!("`--wait`: {e}")))
        })
        .transpose()?;
    let request = BackupRequest {
        config: context.config.clone(),
        root: global.root(),
        target: target.clone(),
        components: components.to_vec(),
        tags: tags.to_vec(),
        threads,
        wait,
        trigger: super::shadow::signal_trigger(),
        damage: Some(context.damage_printer()),
        journal: None,
    };
    let generated = std::cell::Cell::new(false);
    let report = context.run_job(JobKind::Backup, components, "backing up", |job| {
        // Refuse unknown or missing components before anything is created (a key file, a
        // repository).
        sysstate_engine::components::select(&context.config, &global.root(), components)?;
        let (passphrase, made) =
            crate::passphrase::for_backup(target, global.passphrase_file.as_deref(), global.quiet)?;
        generated.set(made);
        ops::backup(&request, &passphrase, job)
    })?;
    let stats = &report.version.stats;
    // A key generated for the new repository is filed under its id.
    let generated_key = (generated.get() && report.created)
        .then(|| sysstate_engine::credentials::settle(target, &sysstate_engine::paths::state_dir()))
        .flatten();
    if let Some(key) = &generated_key {
        crate::passphrase::note_generated_key(target, key);
    }
    if context.json() {
        print_json(&json!({
            "job": report.job,
            "version": report.id.to_hex(),
            "created-repository": report.created,
            "components": report.version.components,
            "skipped-components": report.skipped_components,
            "stats": stats,
            "warnings": report.warnings.iter().map(|w| json!({"path": w.path, "message": w.message})).collect::<Vec<_>>(),
        }));
    } else {
        if report.created {
            context.say(format!("created a new repository at `{target}`"));
        }
        if !report.skipped_components.is_empty() {
            context.say(format!("left out (not on this machine): {}", report.skipped_components.join(", ")));
        }
        context.say(format!(
            "version {} saved: {} files, {} dirs, {} ({} read, {} files unchanged), {} added, {} stored, in {:.2} s",
            report.id.short(),
            stats.files,
            stats.dirs,
            bytes(stats.bytes_total),
            bytes(stats.bytes_read),
            stats.files_unchanged,
            bytes(stats.bytes_added),
            bytes(stats.bytes_stored),
            stats.duration_ms as f64 / 1000.0
        ));
    }
    if !report.warnings.is_empty() && context.shows_text() {
        sysstate_engine::errln!(
            "{} entries could not be backed up (listed above); the version holds everything else",
            report.warnings.len()
        );
    }
    Ok(context.warned(report.warnings.len()))
}
