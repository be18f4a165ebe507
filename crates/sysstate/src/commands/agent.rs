//! The agent: `sysstate agent` (the daemon), `agent status`, `job cancel ID` and
//! `backup --now`, which ask the agent through its API when it runs.

use super::{Context, Outcome};
use crate::output::print_json;
use serde_json::{json, Value};
use std::time::Duration;
use sysstate_agent::client::Client;
use sysstate_engine::jobs::JobState;
use sysstate_engine::{EngineError, ErrorCode, Result};

/// `sysstate agent`: runs the agent in the foreground until SIGTERM.
pub fn run(context: &Context<'_>) -> Result<Outcome> {
    let global = &context.cli.global;
    sysstate_agent::run(sysstate_agent::AgentOptions {
        config_file: global.config.clone().unwrap_or_else(sysstate_engine::paths::config_file),
        config_required: global.config.is_some(),
        root: global.root(),
        target: global.target.clone(),
        passphrase_file: global.passphrase_file.clone(),
    })?;
    Ok(Outcome::Success)
}

/// The agent of this machine, or the error that says it does not run.
fn agent() -> Result<Client> {
    Client::find().ok_or_else(|| {
        EngineError::new(
            ErrorCode::TargetUnavailable,
            format!("no agent runs on this machine (nothing answers on `{}`)", sysstate_agent::socket_path().display()),
        )
        .with_cause("the agent is not started, or it stopped")
        .with_resolution("start it: `systemctl enable --now sysstate-agent` (or `sysstate agent` in the foreground)")
    })
}

/// `sysstate agent status`.
pub fn status(context: &Context<'_>) -> Result<Outcome> {
    let status = agent()?.get("/v1/status")?.into_result()?;
    if context.json() {
        print_json(&status);
        return Ok(Outcome::Success);
    }
    let agent = &status["agent"];
    crate::outln!(
        "agent: running (pid {}, version {}, since {})",
        agent["pid"],
        agent["version"].as_str().unwrap_or("?"),
        agent["started"].as_str().unwrap_or("?")
    );
    if let Some(error) = agent["config-error"].as_str() {
        crate::outln!("   the last reload was refused, the agent keeps its config: {error}");
    }
    match status["running"].as_object() {
        Some(running) => crate::outln!(
            "running: job {} ({}, asked by {})",
            running["job"].as_str().unwrap_or("starting"),
            running["request"]["work"]["kind"].as_str().unwrap_or("?"),
            running["request"]["by"].as_str().unwrap_or("?")
        ),
        None => crate::outln!("running: nothing"),
    }
    for queued in status["queue"].as_array().into_iter().flatten() {
        crate::outln!(
            "queued: request {} ({}, asked by {})",
            queued["id"],
            queued["work"]["kind"].as_str().unwrap_or("?"),
            queued["by"].as_str().unwrap_or("?")
        );
    }
    let schedules = status["schedules"].as_array().cloned().unwrap_or_default();
    if schedules.is_empty() {
        crate::outln!("schedules: none (`[schedule]` in the config sets them)");
    }
    for schedule in &schedules {
        let entries: Vec<&str> =
            schedule["entries"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        crate::outln!(
            "schedule {}: {} — next run {}",
            schedule["name"].as_str().unwrap_or("?"),
            entries.join(", "),
            schedule["next-run"].as_str().unwrap_or("never")
        );
    }
    for (kind, last) in status["last"].as_object().into_iter().flatten() {
        let brief = |value: &Value| match value.as_object() {
            None => "never".to_string(),
            Some(job) => format!(
                "job {} at {}{}",
                job["job"].as_str().unwrap_or("?"),
                job["ended"].as_str().unwrap_or("?"),
                job["error"]["code"].as_str().map(|c| format!(" (error[{c}])")).unwrap_or_default()
            ),
        };
        crate::outln!("last {kind}: success {}; failure {}", brief(&last["success"]), brief(&last["failure"]));
    }
    Ok(Outcome::Success)
}

/// `sysstate job cancel ID`: the agent's job through its API; a command's by SIGTERM to its
/// process, which thaws its writers and stops.
pub fn cancel(context: &Context<'_>, id: &str) -> Result<Outcome> {
    if let Some(client) = Client::find() {
        let answer = client.post(&format!("/v1/jobs/{id}/cancel"), &json!({}))?;
        if answer.status != 409 || answer.body["error"]["code"] != "not-the-agents" {
            answer.into_result()?;
            context.say(format!("job {id}: cancelling (the agent thaws its writers and stores nothing of it)"));
            return Ok(Outcome::Success);
        }
    }
    let store = context.job_store()?;
    let job = store.job(id)?.ok_or_else(|| {
        EngineError::new(ErrorCode::InvalidInput, format!("no job `{id}`"))
            .with_resolution("`sysstate job` shows the running jobs and their ids")
    })?;
    if job.state != JobState::Running || store.running()?.iter().all(|j| j.id != id) {
        return Err(EngineError::new(
            ErrorCode::InvalidInput,
            format!("job {id} is not running: it ended {}", job.state),
        )
        .with_resolution("nothing to cancel"));
    }
    let pid = rustix::process::Pid::from_raw(job.pid as i32)
        .ok_or_else(|| EngineError::new(ErrorCode::Internal, format!("job {id} records no process id")))?;
    rustix::process::kill_process(pid, rustix::process::Signal::Term).map_err(|error| {
        EngineError::new(
            ErrorCode::StateDirPermission,
            format!("cannot signal process {} running job {id}: {error}", job.pid),
        )
        .with_resolution("run `sysstate job cancel` as root or as the user who started the job")
    })?;
    context.say(format!("job {id}: sent SIGTERM to its process {} (it thaws its writers and stops)", job.pid));
    Ok(Outcome::Success)
}

/// `sysstate backup --now`: the agent backs up now (one queue for the machine) and this
/// command follows the job to its end; without an agent, the backup runs here.
pub fn backup_now(context: &Context<'_>, components: &[String]) -> Result<Outcome> {
    let Some(client) = Client::find() else {
        if !context.cli.global.quiet {
            sysstate_engine::errln!("note: no agent runs on this machine: backing up in this process");
        }
        return super::backup::backup(context, components, &[], 0, None);
    };
    let queued = client.post("/v1/jobs", &json!({"kind": "backup", "components": components}))?.into_result()?;
    let request = queued["request"].as_u64().unwrap_or(0);
    let mut said = false;
    // Looked at often at first (a backup that finds nothing changed ends in a tenth of a second,
    // one of a few changes in one or two: a look every 50 ms adds 25 ms on average to the
    // wait), then less: every 250 ms once it has run half a minute.
    let mut pause = Duration::from_millis(5);
    let started = std::time::Instant::now();
    let mut wait = || {
        std::thread::sleep(pause);
        let most = if started.elapsed() < Duration::from_secs(30) { 50 } else { 250 };
        pause = (pause * 2).min(Duration::from_millis(most));
    };
    let job = loop {
        let state = client.get(&format!("/v1/requests/{request}"))?.into_result()?;
        if let Some(job) = state["job"].as_str() {
            break job.to_string();
        }
        if state["state"] == "queued" && !said {
            context.say(format!("queued behind {} other job(s) of the agent", state["position"]));
            said = true;
        }
        wait();
    };
    context.say(format!("the agent runs job {job}; following it (Ctrl-C stops following, not the job)"));
    let mut operation = String::new();
    let store = context.job_store()?;
    let record = loop {
        // The job's record from the agent; from the job store when the agent went away (a
        // stop cancels its job: the record then says how it ended).
        // The agent answers once the job ended or its operation changed (or five seconds
        // passed): its end is seen within milliseconds, not at the next look.
        let record = match client.get(&format!("/v1/jobs/{job}?wait=5000")) {
            Ok(answer) => answer.into_result()?,
            Err(_) => serde_json::to_value(store.job(&job)?).expect("jobs encode"),
        };
        if record["state"] != "running" {
            break record;
        }
        match record["current-operation"].as_str().filter(|now| *now != operation) {
            Some(now) => {
                context.say(format!("   {now}"));
                operation = now.to_string();
            }
            // Nothing new: the wait passed (or an agent that does not wait answered at once).
            None => wait(),
        }
    };
    if context.json() {
        print_json(&record);
    } else {
        context.say(format!(
            "job {job} (backup): {}{}",
            record["state"].as_str().unwrap_or("?"),
            record["version"].as_str().map(|v| format!(", version {}", &v[..8.min(v.len())])).unwrap_or_default()
        ));
    }
    let error = &record["error"];
    if let Some(code) = error["code"].as_str() {
        sysstate_engine::errln!("error[{code}]: {}", error["message"].as_str().unwrap_or(""));
        sysstate_engine::errln!("  cause: {}", error["cause"].as_str().unwrap_or(""));
        sysstate_engine::errln!("  resolution: {}", error["resolution"].as_str().unwrap_or(""));
    }
    Ok(match record["state"].as_str() {
        Some("succeeded") => Outcome::Success,
        Some("succeeded-with-warnings") => Outcome::Warnings,
        _ => Outcome::Failed,
    })
}

/// `sysstate notify test`: a test message to every target, each delivery reported.
pub fn notify_test(context: &Context<'_>) -> Result<Outcome> {
    let section = &context.config.notify;
    if !section.has_targets() {
        return Err(EngineError::new(ErrorCode::InvalidInput, "`[notify]` names no target: nothing to test")
            .with_resolution("add `webhook = \"https://…\"` or `mail = { to = \"root@localhost\", smtp = \"127.0.0.1:25\" }` to `[notify]` (docs/config.md)"));
    }
    let deliveries = sysstate_agent::notify::deliver(section, &sysstate_agent::notify::test_notice());
    let failed = deliveries.iter().filter(|d| d.result.is_err()).count();
    if context.json() {
        let rows: Vec<Value> = deliveries
            .iter()
            .map(|d| json!({"target": d.target, "delivered": d.result.is_ok(), "error": d.result.as_ref().err()}))
            .collect();
        print_json(&json!(rows));
    } else {
        for delivery in &deliveries {
            match &delivery.result {
                Ok(()) => crate::outln!("{}: delivered", delivery.target),
                Err(why) => crate::outln!("{}: NOT delivered: {why}", delivery.target),
            }
        }
    }
    if failed > 0 {
        return Err(EngineError::new(
            ErrorCode::NotificationFailed,
            format!("{failed} of {} targets did not take the test message", deliveries.len()),
        ));
    }
    Ok(Outcome::Success)
}
