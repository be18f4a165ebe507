//! The vault (`sysstate vault …`) and a host's registration with one (`sysstate agent register`).

use super::{Context, Outcome};
use crate::cli::{VaultCommand, VaultHostsCommand, VaultImmutabilityCommand, VaultRetentionCommand};
use crate::output::print_json;
use serde_json::json;
use std::path::{Path, PathBuf};
use sysstate_engine::jobs::JobTrigger;
use sysstate_engine::{EngineError, ErrorCode, Result};
use sysstate_vault::state::{Immutability, Retention};

pub fn vault(context: &Context<'_>, dir: &Path, command: &VaultCommand) -> Result<Outcome> {
    match command {
        VaultCommand::Init { storage, url, listen } => {
            let made = sysstate_vault::init(dir, storage, listen, url)?;
            if context.json() {
                print_json(&serde_json::to_value(&made).expect("reports encode"));
            } else {
                context.say(format!(
                    "vault made in `{}`: storage `{storage}`, serving on {listen} as {url}; its certificate is good for {}",
                    made.dir.display(),
                    made.names.join(", ")
                ));
                context.say("next: `sysstate vault serve` (or `systemctl enable --now sysstate-vault`), then `sysstate vault credentials --host NAME` for each host");
            }
            Ok(Outcome::Success)
        }
        VaultCommand::Serve => {
            sysstate_vault::server::serve(dir)?;
            Ok(Outcome::Success)
        }
        VaultCommand::Credentials { host, expires, output } => {
            let valid = sysstate_engine::shadow::parse_duration(expires)
                .map_err(|e| EngineError::new(ErrorCode::InvalidInput, format!("`--expires`: {e}")))?;
            let out = output.clone().unwrap_or_else(|| PathBuf::from(format!("{host}.vault-credentials")));
            let file = sysstate_vault::credentials(dir, host, valid, &out)?;
            if context.json() {
                print_json(&json!({"file": out, "host": file.host, "vault": file.vault, "expires": file.expires}));
            } else {
                context.say(format!(
                    "credentials for host `{host}` written to `{}` (0600): good for one registration until {}; copy it to the host and run `sysstate agent register {}` there",
                    out.display(),
                    file.expires,
                    out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
                ));
            }
            Ok(Outcome::Success)
        }
        VaultCommand::Hosts { command: None } => {
            let hosts = sysstate_vault::hosts(dir)?;
            if context.json() {
                print_json(&json!(hosts));
            } else if hosts.is_empty() {
                crate::outln!(
                    "no host is registered: `sysstate vault credentials --host NAME` makes a credentials file for one"
                );
            } else {
                for host in &hosts {
                    crate::outln!(
                        "{}: registered {}{}, {} versions{}",
                        host["name"].as_str().unwrap_or("?"),
                        host["registered"].as_str().unwrap_or("?"),
                        host["revoked"].as_str().map(|r| format!(", REVOKED {r}")).unwrap_or_default(),
                        host["versions"],
                        host["may-read"]
                            .as_array()
                            .filter(|a| !a.is_empty())
                            .map(|a| format!(
                                ", may read the versions of {}",
                                a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
                            ))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(Outcome::Success)
        }
        VaultCommand::Hosts { command: Some(VaultHostsCommand::Revoke { name }) } => {
            sysstate_vault::revoke(dir, name)?;
            context.say(format!("host `{name}` revoked: its token is refused from now on"));
            Ok(Outcome::Success)
        }
        VaultCommand::Versions => {
            let versions = sysstate_vault::versions(dir)?;
            if context.json() {
                print_json(&json!(versions));
            } else if versions.is_empty() {
                crate::outln!("the vault holds no version yet");
            } else {
                for version in &versions {
                    let id = version["id"].as_str().unwrap_or("?");
                    crate::outln!(
                        "{}  {}  received {}{}",
                        &id[..8.min(id.len())],
                        version["host"].as_str().unwrap_or("?"),
                        version["received"].as_str().unwrap_or("?"),
                        version["soft-deleted"]
                            .as_str()
                            .map(|at| format!(
                                "  SOFT-DELETED {at}, undeletable until {}",
                                version["purge-after"].as_str().unwrap_or("?")
                            ))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(Outcome::Success)
        }
        VaultCommand::Forget { version } => {
            let id = sysstate_vault::forget(dir, version)?;
            context.say(format!("version {id} soft-deleted: hidden from its host; `sysstate vault undelete --version {}` brings it back until it is purged", &id[..8]));
            Ok(Outcome::Success)
        }
        VaultCommand::Undelete { version } => {
            let id = sysstate_vault::undelete(dir, version)?;
            context.say(format!("version {id} is back"));
            Ok(Outcome::Success)
        }
        VaultCommand::Purge => {
            let purged = sysstate_vault::purge(dir, JobTrigger::Command)?.purged;
            if context.json() {
                print_json(&json!({"purged": purged}));
            } else {
                context.say(format!("{} versions purged (soft-deleted longer ago than the window)", purged.len()));
            }
            Ok(Outcome::Success)
        }
        VaultCommand::Verify { sample } => {
            let report = sysstate_vault::verify(dir, *sample, JobTrigger::Command)?;
            if context.json() {
                print_json(&serde_json::to_value(&report).expect("reports encode"));
            } else {
                for damaged in &report.damaged {
                    crate::outln!("DAMAGED {damaged}");
                }
                context.say(format!(
                    "{} files read ({} of {} packs), {} bytes: {}",
                    report.checked,
                    report.packs_checked,
                    report.packs,
                    report.bytes,
                    if report.damaged.is_empty() {
                        "every one matches its name".to_string()
                    } else {
                        format!("{} damaged", report.damaged.len())
                    }
                ));
            }
            Ok(if report.damaged.is_empty() { Outcome::Success } else { Outcome::Failed })
        }
        VaultCommand::Report => {
            let report = sysstate_vault::report(dir)?;
            if context.json() {
                print_json(&report);
            } else {
                for host in report["hosts"].as_array().into_iter().flatten() {
                    crate::outln!(
                        "{}: {} versions kept, {} soft-deleted, {} added in {} packs, last received {}{}{}; retention {}",
                        host["name"].as_str().unwrap_or("?"),
                        host["versions"],
                        host["soft-deleted"],
                        sysstate_types::units::bytes(host["added-bytes"].as_u64().unwrap_or(0)),
                        host["added-packs"],
                        host["last-received"].as_str().unwrap_or("never"),
                        if host["overdue"] == true { ", OVERDUE (none in 26 h)" } else { "" },
                        host["revoked"].as_str().map(|r| format!(", REVOKED {r}")).unwrap_or_default(),
                        host["retention"].as_str().unwrap_or("?"),
                    );
                }
                let storage = &report["storage"];
                crate::outln!(
                    "storage `{}`: {} packs, {}; immutability {}",
                    storage["location"].as_str().unwrap_or("?"),
                    storage["packs"],
                    sysstate_types::units::bytes(storage["pack-bytes"].as_u64().unwrap_or(0)),
                    report["immutability"].as_str().unwrap_or("?")
                );
                for (kind, job) in report["jobs"].as_object().into_iter().flatten() {
                    crate::outln!(
                        "last {kind}: {} at {}",
                        job["state"].as_str().unwrap_or("?"),
                        job["started"].as_str().unwrap_or("?")
                    );
                }
            }
            Ok(Outcome::Success)
        }
        VaultCommand::Grant { restore_from, to } => {
            sysstate_vault::grant(dir, restore_from, to)?;
            context.say(format!("host `{to}` may read the versions of `{restore_from}` (to restore them onto itself, with its passphrase)"));
            Ok(Outcome::Success)
        }
        VaultCommand::Retention { command: None } => {
            let policies = sysstate_vault::retention(dir)?;
            if context.json() {
                print_json(&json!(policies
                    .iter()
                    .map(|(scope, policy, since)| json!({"host": scope, "policy": policy, "since": sysstate_types::time::format_utc(*since)}))
                    .collect::<Vec<_>>()));
            } else if policies.is_empty() {
                crate::outln!("no retention policy: the vault keeps every version (`sysstate vault retention set --daily 14 --weekly 8` sets one)");
            } else {
                for (scope, policy, since) in &policies {
                    let whose = if scope == "*" { "every host".to_string() } else { format!("host `{scope}`") };
                    crate::outln!(
                        "{whose}: {} (since {})",
                        policy.describe(),
                        sysstate_types::time::format_utc(*since)
                    );
                }
            }
            Ok(Outcome::Success)
        }
        VaultCommand::Retention {
            command: Some(VaultRetentionCommand::Set { host, last, daily, weekly, monthly, yearly, within }),
        } => {
            let within_s = match within {
                Some(text) => sysstate_engine::shadow::parse_duration(text)
                    .map_err(|e| EngineError::new(ErrorCode::InvalidInput, format!("`--within`: {e}")))?
                    .as_secs(),
                None => 0,
            };
            let policy =
                Retention { last: *last, daily: *daily, weekly: *weekly, monthly: *monthly, yearly: *yearly, within_s };
            sysstate_vault::set_retention(dir, host.as_deref(), &policy)?;
            let whose = host.as_ref().map_or("every host".to_string(), |h| format!("host `{h}`"));
            context.say(format!("retention of {whose}: {}", policy.describe()));
            Ok(Outcome::Success)
        }
        VaultCommand::Retention { command: Some(VaultRetentionCommand::Apply { dry_run }) } => {
            let dropped = sysstate_vault::apply_retention(dir, *dry_run, JobTrigger::Command)?.versions;
            if context.json() {
                print_json(&json!({"dry-run": dry_run, "soft-deleted": dropped}));
            } else {
                for version in &dropped {
                    let id = &version.id;
                    crate::outln!(
                        "{} {}  {}",
                        if *dry_run { "would soft-delete" } else { "soft-deleted" },
                        &id[..8.min(id.len())],
                        version.host
                    );
                }
                context.say(format!(
                    "{} versions {}",
                    dropped.len(),
                    if *dry_run { "would be soft-deleted" } else { "soft-deleted" }
                ));
            }
            Ok(Outcome::Success)
        }
        VaultCommand::Immutability { command } => {
            if let Some(command) = command {
                sysstate_vault::set_immutability(
                    dir,
                    match command {
                        VaultImmutabilityCommand::Enable => Immutability::Enabled,
                        VaultImmutabilityCommand::Disable => Immutability::Disabled,
                        VaultImmutabilityCommand::Lock => Immutability::Locked,
                    },
                )?;
            }
            let (state, since) = sysstate_vault::immutability(dir)?;
            if context.json() {
                print_json(
                    &json!({"immutability": state.as_str(), "since": (since > 0).then(|| sysstate_types::time::format_utc(since))}),
                );
            } else {
                let what = match state {
                    Immutability::Disabled => "disabled: retention can be changed and versions soft-deleted at will",
                    Immutability::Enabled => "enabled: retention cannot be reduced, nor a version deleted before its retention drops it (`sysstate vault immutability disable` allows it again)",
                    Immutability::Locked => "locked: retention cannot be reduced, nor a version deleted before its retention drops it, ever",
                };
                let since = if since > 0 {
                    format!(" (since {})", sysstate_types::time::format_utc(since))
                } else {
                    String::new()
                };
                crate::outln!("immutability {what}{since}");
            }
            Ok(Outcome::Success)
        }
    }
}

/// `sysstate agent register FILE`.
pub fn register(context: &Context<'_>, file: &Path) -> Result<Outcome> {
    let credentials = sysstate_vault::register(file)?;
    let kept = sysstate_engine::vault::save(&credentials)?;
    if context.json() {
        print_json(&json!({"host": credentials.host, "vault": credentials.vault, "credentials": kept}));
    } else {
        context.say(format!(
            "registered as `{}` with {}: the token is kept in `{}` (0600); back up to the vault with `--target {}`",
            credentials.host,
            credentials.vault,
            kept.display(),
            credentials.vault
        ));
    }
    Ok(Outcome::Success)
}
