//! The shadow copy service's commands: `writers`, `providers`, `shadows`, `shadowstorage`, and
//! the signal handler that thaws writers.

use super::{Context, Outcome};
use crate::cli::{ShadowsCommand, StorageCommand};
use crate::output::{bytes, print_json};
use serde_json::json;
use sysstate_engine::shadow::{self, CopySelector, StorageSetting};
use sysstate_engine::{paths, EngineError, ErrorCode, Result};
use sysstate_shadow::ThawTrigger;

/// A thaw trigger fired by SIGINT and SIGTERM. On a signal, frozen writers are thawed at once
/// (by the coordinator's watchdog) and the running backup is told to stop; if it has not ended
/// 30 s later, the process exits anyway.
pub fn signal_trigger() -> ThawTrigger {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let trigger = ThawTrigger::default();
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        tracing::warn!("cannot install the signal handler: a signal during the freeze would not thaw the writers");
        return trigger;
    };
    let fired = trigger.clone();
    let _ = std::thread::Builder::new().name("sysstate-signals".into()).spawn(move || {
        if let Some(signal) = signals.forever().next() {
            sysstate_engine::errln!("sysstate: signal {signal}: thawing writers and stopping");
            fired.fire(signal);
            fired.wait_thawed(std::time::Duration::from_secs(60));
            std::thread::sleep(std::time::Duration::from_secs(30));
            std::process::exit(128 + signal);
        }
    });
    trigger
}

pub fn writers(context: &Context<'_>) -> Result<Outcome> {
    let states = sysstate_shadow::state::read_states(&paths::runtime_dir());
    let rows: Vec<serde_json::Value> = sysstate_engine::shadow::writer_entries(&context.config)
        .iter()
        .map(|writer| {
            let status = states.iter().find(|s| s.name == writer.name);
            json!({
                "name": writer.name,
                "kind": writer.kind,
                "components": writer.components,
                "built-in": writer.builtin,
                "state": status.map(|s| s.state.to_string()).unwrap_or_else(|| "stable".into()),
                "last-error": status.and_then(|s| s.last_error.clone()),
                "set": status.and_then(|s| s.set.clone()),
                "updated": status.map(|s| sysstate_types::time::format_utc(s.updated_ns)),
            })
        })
        .collect();
    if context.json() {
        print_json(&json!(rows));
    } else {
        for row in &rows {
            let origin = if row["built-in"] == true { ", built in" } else { "" };
            crate::outln!(
                "writer `{}` ({}{origin}) for {}",
                row["name"].as_str().unwrap_or(""),
                row["kind"].as_str().unwrap_or(""),
                match row["components"].as_array().filter(|c| !c.is_empty()) {
                    Some(components) => components.iter().filter_map(|c| c.as_str()).collect::<Vec<_>>().join(", "),
                    None => "every backup".into(),
                }
            );
            crate::outln!("   state: {}", row["state"].as_str().unwrap_or(""));
            crate::outln!("   last error: {}", row["last-error"].as_str().unwrap_or("no error"));
        }
    }
    Ok(Outcome::Success)
}

pub fn providers(context: &Context<'_>) -> Result<Outcome> {
    let holder = sysstate_shadow::lock::current_holder(&paths::runtime_dir());
    let state = match &holder {
        Some(holder) => format!("in use by {holder}"),
        None => "idle".into(),
    };
    let rows: Vec<serde_json::Value> = sysstate_shadow::provider::PROVIDERS
        .iter()
        .map(|(name, needs)| json!({"name": name, "needs": needs, "start-type": "on-demand", "state": state}))
        .collect();
    if context.json() {
        print_json(&json!(rows));
    } else {
        for row in &rows {
            crate::outln!(
                "provider `{}`: {} ({})",
                row["name"].as_str().unwrap_or(""),
                row["state"].as_str().unwrap_or(""),
                row["needs"].as_str().unwrap_or("")
            );
        }
    }
    Ok(Outcome::Success)
}

fn copy_json(
    area: &sysstate_shadow::storage::StorageArea,
    copy: &sysstate_shadow::storage::CopyMeta,
) -> serde_json::Value {
    json!({
        "id": copy.id, "for": copy.for_volume, "on": area.on.display().to_string(), "provider": copy.provider,
        "created": sysstate_types::time::format_utc(copy.created_ns), "bytes": copy.bytes, "files": copy.files,
        "persistent": copy.persistent, "paths": copy.paths,
    })
}

pub fn shadows(context: &Context<'_>, command: Option<&ShadowsCommand>) -> Result<Outcome> {
    let global = &context.cli.global;
    match command.unwrap_or(&ShadowsCommand::List) {
        ShadowsCommand::List => {
            let areas = shadow::storage_areas(&context.config, &paths::state_dir())?;
            let rows: Vec<_> =
                areas.iter().flat_map(|a| a.copies().into_iter().map(move |c| copy_json(a, &c))).collect();
            if global.json {
                print_json(&json!(rows));
            } else if rows.is_empty() {
                crate::outln!("no shadow copies");
            } else {
                for row in &rows {
                    crate::outln!(
                        "{}  {}  {}  {} entries  {}  {}",
                        row["id"].as_str().unwrap_or(""),
                        row["created"].as_str().unwrap_or(""),
                        row["provider"].as_str().unwrap_or(""),
                        row["files"],
                        bytes(row["bytes"].as_u64().unwrap_or(0)),
                        row["on"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(Outcome::Success)
        }
        ShadowsCommand::Create { components } => {
            let record =
                sysstate_engine::ops::create_persistent(&context.config, &global.root(), components, signal_trigger())?;
            if global.json {
                print_json(&serde_json::to_value(&record).expect("records encode"));
            } else if !global.quiet {
                crate::outln!(
                    "shadow copy {} created: {} entries, {} in `{}`, frozen {} ms",
                    record.id,
                    record.files,
                    bytes(record.bytes),
                    record.storage,
                    record.freeze_window_ms
                );
            }
            Ok(Outcome::Success)
        }
        ShadowsCommand::Recover => {
            let recovered = sysstate_engine::ops::recover_shadow_set(&context.config, &global.root())?;
            // The dead set's job, if it was one here, is told in its record.
            if let Some((sysstate_shadow::LockHolder { job: Some(dead), .. }, recovery)) = &recovered {
                context.job_store()?.recovered(dead, "`sysstate shadows recover`", &recovery.to_string())?;
            }
            if global.json {
                print_json(&match &recovered {
                    Some((holder, recovery)) => json!({
                        "recovered": true, "holder": holder, "thawed": recovery.thawed, "aborted": recovery.aborted,
                        "failed": recovery.failed, "deleted": recovery.deleted,
                    }),
                    None => json!({"recovered": false}),
                });
            } else if !global.quiet {
                match &recovered {
                    Some((holder, recovery)) => crate::outln!("the shadow set of {holder} had died: {recovery}"),
                    None => crate::outln!("no shadow set had died: nothing to recover"),
                }
            }
            match recovered {
                Some((_, recovery)) if !recovery.failed.is_empty() => Ok(Outcome::warned(recovery.failed.len())),
                _ => Ok(Outcome::Success),
            }
        }
        ShadowsCommand::Delete { id, oldest, all } => {
            let selector = match (id, oldest, all) {
                (_, _, true) => CopySelector::All,
                (_, true, _) => CopySelector::Oldest,
                (Some(id), _, _) => CopySelector::Id(id.clone()),
                (None, false, false) => {
                    return Err(EngineError::new(
                        ErrorCode::InvalidInput,
                        "say which copies: `--id ID`, `--oldest` or `--all`",
                    ))
                }
            };
            let deleted = shadow::delete_copies(&context.config, &paths::state_dir(), &selector)?;
            if global.json {
                print_json(&json!({"deleted": deleted}));
            } else if !global.quiet {
                crate::outln!("deleted {} shadow copies", deleted.len());
            }
            Ok(Outcome::Success)
        }
    }
}

pub fn storage(context: &Context<'_>, command: Option<&StorageCommand>) -> Result<Outcome> {
    let state_dir = paths::state_dir();
    if let Some(StorageCommand::Resize { for_volume, on, max_size }) = command {
        let setting = StorageSetting { for_volume: for_volume.clone(), on: on.clone(), max_size: max_size.clone() };
        for warning in shadow::resize(&state_dir, setting)? {
            sysstate_engine::errln!("warning[shadow-storage-oldest-deleted]: {warning}");
        }
        if !context.json() {
            crate::outln!("shadow storage for `{for_volume}` on `{on}`: max size {max_size}");
        }
    }
    let rows: Vec<serde_json::Value> = shadow::storage_areas(&context.config, &state_dir)?
        .iter()
        .map(|area| {
            let (limit, free) = area.limit_and_free().unwrap_or((None, 0));
            json!({"for": area.for_volume.display().to_string(), "on": area.on.display().to_string(), "max-size": area.max_size.to_string(), "max-bytes": limit, "used": area.used(), "free": free, "copies": area.copies().len()})
        })
        .collect();
    if context.json() {
        print_json(&json!(rows));
    } else {
        for row in &rows {
            crate::outln!(
                "for `{}` on `{}`: max {} ({}), used {}, {} copies, {} free on its volume",
                row["for"].as_str().unwrap_or(""),
                row["on"].as_str().unwrap_or(""),
                row["max-size"].as_str().unwrap_or(""),
                row["max-bytes"].as_u64().map(bytes).unwrap_or_else(|| "unbounded".into()),
                bytes(row["used"].as_u64().unwrap_or(0)),
                row["copies"],
                bytes(row["free"].as_u64().unwrap_or(0))
            );
        }
    }
    Ok(Outcome::Success)
}
