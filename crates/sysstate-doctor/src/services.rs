//! `sysstate services`: the parts of the service and their state, like the seed's table of
//! dependent services (RPC, EventSystem, SENS always on; VSS and its provider on demand).

use serde::Serialize;
use std::path::Path;
use sysstate_engine::config::Config;
use sysstate_engine::generated::installed;

/// How a part is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartType {
    /// Runs all the time (a daemon).
    AlwaysOn,
    /// Started by the job that needs it, ended with it.
    OnDemand,
}

/// One part of the service.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Part {
    /// `api`, `event-log`, `provider copy`, `writer postgres` …
    pub name: String,
    /// What it is.
    pub role: String,
    /// Always on, or on demand.
    pub start_type: StartType,
    /// `running`, `idle`, `in use by …`, `responds`, `not installed`, or what is wrong.
    pub status: String,
    /// False when the part is broken (a backup needing it would fail).
    pub healthy: bool,
}

fn part(name: impl Into<String>, role: &str, start_type: StartType, status: String, healthy: bool) -> Part {
    Part { name: name.into(), role: role.into(), start_type, status, healthy }
}

/// The parts: the agent and what it serves (API, notifications, metrics), the event log, the
/// shadow copy coordinator, each provider, and each writer (asked to identify itself).
pub fn parts(config: &Config, root: &Path, state_dir: &Path, runtime_dir: &Path) -> Vec<Part> {
    use StartType::*;
    let mut parts = agent_parts(config);
    parts.insert(1, event_log(state_dir));
    let holder = sysstate_shadow::lock::current_holder(runtime_dir);
    let in_use = match &holder {
        Some(holder) => format!("in use by {holder}"),
        None => "idle".into(),
    };
    parts.push(part(
        "coordinator",
        "the shadow copy coordinator (one shadow set at a time)",
        OnDemand,
        in_use.clone(),
        true,
    ));
    for (name, needs) in sysstate_shadow::provider::PROVIDERS {
        let (status, healthy) = match *name {
            // Unavailable matters only when the config asks for it.
            "btrfs" if !installed("btrfs") => (
                format!("unavailable: `btrfs` (btrfs-progs) is not installed; {needs}"),
                config.shadow.provider.as_deref() != Some("btrfs"),
            ),
            _ => (in_use.clone(), true),
        };
        parts.push(part(format!("provider {name}"), needs, OnDemand, status, healthy));
    }
    parts.extend(writers(config, root, runtime_dir));
    parts
}

/// The agent, its API, its notifications and its metrics: running or stopped. Stopped is a
/// fault only when the config has schedules (then nothing backs up on its own).
fn agent_parts(config: &Config) -> Vec<Part> {
    use StartType::AlwaysOn;
    let status = crate::agent::status().filter(|s| s["http-status"] == 200);
    let wanted = config.schedule.schedules().is_ok_and(|s| !s.is_empty());
    let socket = sysstate_engine::paths::agent_socket();
    let (agent, api) = match &status {
        Some(status) => {
            let running = match status["running"]["job"].as_str() {
                Some(job) => format!("running job {job}"),
                None => "idle".to_string(),
            };
            (
                (
                    format!(
                        "running (pid {}, since {}): {running}",
                        status["agent"]["pid"],
                        status["agent"]["started"].as_str().unwrap_or("?")
                    ),
                    true,
                ),
                (format!("running on `{}`", socket.display()), true),
            )
        }
        None => {
            let why = if wanted {
                "stopped, and the config has schedules: `systemctl enable --now sysstate-agent`"
            } else {
                "stopped (no schedule in the config: backups run from the command line)"
            };
            ((why.to_string(), !wanted), (format!("stopped: nothing answers on `{}`", socket.display()), !wanted))
        }
    };
    let targets: Vec<String> = [
        config.notify.webhook.as_ref().map(|url| format!("webhook {url}")),
        config.notify.mail.as_ref().map(|mail| format!("mail to {}", mail.to)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let notifications = match (targets.is_empty(), status.is_some()) {
        (true, _) => ("none configured (`[notify]`): failures are in `sysstate events`".to_string(), true),
        (false, true) => (format!("running: {}", targets.join(", ")), true),
        (false, false) => (format!("stopped with the agent: {}", targets.join(", ")), !wanted),
    };
    let metrics_where: Vec<String> =
        [config.metrics.listen.as_ref().map(|a| format!("http://{a}/metrics")), config.metrics.textfile.clone()]
            .into_iter()
            .flatten()
            .collect();
    let metrics = match (metrics_where.is_empty(), status.is_some()) {
        (true, _) => ("none configured (`[metrics]`)".to_string(), true),
        (false, true) => (format!("running: {}", metrics_where.join(", ")), true),
        (false, false) => (format!("stopped with the agent: {}", metrics_where.join(", ")), !wanted),
    };
    vec![
        part(
            "agent",
            "the agent: schedules, retention, the queue of jobs (`sysstate agent`)",
            AlwaysOn,
            agent.0,
            agent.1,
        ),
        part(
            "api",
            "the agent's API on a unix socket (`sysstate agent status`, `backup --now`)",
            AlwaysOn,
            api.0,
            api.1,
        ),
        part("notifications", "mail and webhook notices of failed jobs", AlwaysOn, notifications.0, notifications.1),
        part("metrics", "metrics for Prometheus", AlwaysOn, metrics.0, metrics.1),
    ]
}

fn event_log(state_dir: &Path) -> Part {
    let role = "the job store and event log (SQLite in the state directory)";
    let (status, healthy) = match sysstate_engine::jobs::JobStore::open(state_dir).and_then(|store| store.health()) {
        Ok(summary) => (format!("running: {summary}"), true),
        Err(error) => (format!("failed: {error}"), false),
    };
    part("event-log", role, StartType::AlwaysOn, status, healthy)
}

fn writers(config: &Config, root: &Path, runtime_dir: &Path) -> Vec<Part> {
    let states = sysstate_shadow::state::read_states(runtime_dir);
    let names: Vec<String> = sysstate_engine::components::all(config)
        .map(|all| all.into_iter().map(|c| c.name).collect())
        .unwrap_or_default();
    let writers = match sysstate_engine::shadow::writers(config, root, &names, "services", &[]) {
        Ok(writers) => writers,
        Err(error) => {
            return vec![part(
                "writers",
                "the configured writers",
                StartType::OnDemand,
                format!("cannot be set up: {error}"),
                false,
            )]
        }
    };
    let mut parts = Vec::new();
    for mut writer in writers {
        let name = writer.name().to_string();
        let last = states.iter().find(|s| s.name == name);
        let missing: Vec<String> = config
            .writers
            .iter()
            .filter(|w| w.name == name)
            .flat_map(|w| [&w.prepare, &w.freeze, &w.thaw, &w.abort, &w.command])
            .filter_map(|argv| argv.as_ref().and_then(|a| a.first()).cloned())
            .filter(|program| !installed(program))
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let (mut status, healthy) = if let Some(program) = missing.first() {
            (format!("does not respond: its program `{program}` is not installed"), false)
        } else {
            match writer.handle(sysstate_shadow::Phase::Identify, deadline) {
                Ok(()) => ("responds".to_string(), true),
                Err(error) => (format!("does not respond to identify: {}", error.message), false),
            }
        };
        if let Some(last) = last {
            status.push_str(&format!("; last state `{}`", last.state));
            if let Some(error) = &last.last_error {
                status.push_str(&format!(" ({error})"));
            }
        }
        let role = format!("{} writer", writer.kind());
        parts.push(part(format!("writer {name}"), &role, StartType::OnDemand, status, healthy));
    }
    parts
}
