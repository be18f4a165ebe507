//! Notifications (`[notify]`): a failed job (critical), a job with warnings (warning), and no
//! successful backup for too long (critical: fires even when the failure is that no job ran). A
//! job the administrator cancelled is not told. Each notice carries the error code, the message
//! that names the culprit, the resolution and the doctor's diagnosis for this machine, and goes
//! to every target: a webhook (a JSON POST, tried three times) and mail (SMTP, or the local
//! `sendmail`). A delivery that fails is an event (`notification-failed`), never a failed job.

use serde_json::{json, Value};
use std::time::Duration;
use sysstate_engine::config::{Config, MailConfig, NotifySection};
use sysstate_engine::jobs::{JobRecord, JobState, JobStore, Source};
use sysstate_engine::ErrorCode;
use sysstate_types::Level;

/// One thing to tell.
#[derive(Debug, Clone)]
pub struct Notice {
    /// `critical` or `warning`.
    pub level: &'static str,
    /// The mail's subject: the host, the level, what happened.
    pub subject: String,
    /// The text: what happened, the culprit, the cause, the resolution, the diagnosis.
    pub text: String,
    /// The same as JSON, for a webhook.
    pub json: Value,
}

/// How one delivery went.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// `webhook https://…` or `mail to root@localhost via 127.0.0.1:25`.
    pub target: String,
    /// `Err` with what went wrong, after every try.
    pub result: Result<(), String>,
}

/// The notice for a job that ended, if `[notify]` asks for one: a failure (not a cancel by
/// the administrator) or warnings. The doctor's diagnosis is in it.
pub fn for_job(
    store: &JobStore,
    job: &JobRecord,
    config: &Config,
    options: &sysstate_doctor::Options,
) -> Option<Notice> {
    let rules = config.notify.rules().ok()?;
    let host = sysstate_repo::lock::host_name();
    let (level, what) = match job.state {
        JobState::Failed if rules.failure => ("critical", "failed"),
        JobState::SucceededWithWarnings if rules.warning => ("warning", "succeeded with warnings"),
        _ => return None,
    };
    let mut text =
        format!("The {} job {} on {host} {what} at {}.\n", job.kind, job.id, job.ended.as_deref().unwrap_or("?"));
    let mut value = json!({
        "level": level,
        "host": host,
        "job": job,
    });
    if let Some(error) = &job.error {
        text.push_str(&format!(
            "\nerror[{}]: {}\n  cause: {}\n  resolution: {}\n",
            error.code, error.message, error.cause, error.resolution
        ));
        if let Some(diagnosis) = sysstate_doctor::diagnose_job(store, job, Some(config), options) {
            text.push_str(&format!("\nThe doctor's diagnosis on {host}:\n  cause: {}\n", diagnosis.cause));
            if !diagnosis.tell.is_empty() {
                text.push_str(&format!("  what tells: {}\n", diagnosis.tell));
            }
            for specific in &diagnosis.specifics {
                text.push_str(&format!("  - {specific}\n"));
            }
            text.push_str(&format!("  resolution: {}\n", diagnosis.resolution));
            value["diagnosis"] = serde_json::to_value(&diagnosis).expect("diagnoses encode");
        }
    } else {
        let events = store
            .events(&sysstate_engine::jobs::EventFilter {
                job: Some(job.id.clone()),
                level: Some(Level::Warning),
                ..Default::default()
            })
            .unwrap_or_default();
        text.push('\n');
        for event in events.iter().take(20) {
            text.push_str(&format!("warning[{}]: {}\n", event.code, event.message));
        }
        value["warnings"] = serde_json::to_value(&events).expect("events encode");
    }
    text.push_str(&format!("\nThe job's log: {}\n", job.log_path.as_deref().unwrap_or("?")));
    let code = job.error.as_ref().map(|e| format!(" error[{}]", e.code)).unwrap_or_default();
    Some(Notice { level, subject: format!("[sysstate {level}] {host}: {} {what}{code}", job.kind), text, json: value })
}

/// The dead-man notice: no successful backup for `since` (the last one, if any).
pub fn no_success(last: Option<&JobRecord>, limit: Duration) -> Notice {
    let host = sysstate_repo::lock::host_name();
    let hours = limit.as_secs() / 3600;
    let last_text = last.map_or_else(
        || "no backup has ever succeeded here".to_string(),
        |job| format!("the last successful backup was job {} at {}", job.id, job.ended.as_deref().unwrap_or("?")),
    );
    let text = format!(
        "No system state backup of {host} has succeeded for {} ({hours} h): {last_text}.\n\nresolution: `sysstate agent status` shows the schedules and the last failure; `sysstate doctor` checks every prerequisite; `sysstate backup --now` runs one.\n",
        sysstate_types::time::format_duration_s(limit.as_secs())
    );
    Notice {
        level: "critical",
        subject: format!("[sysstate critical] {host}: no successful backup for {hours} h"),
        json: json!({"level": "critical", "host": host, "no-success-for-seconds": limit.as_secs(), "last-success": last, "text": text}),
        text,
    }
}

/// A test notice (`sysstate notify test`).
pub fn test_notice() -> Notice {
    let host = sysstate_repo::lock::host_name();
    let text = format!("This is a test of sysstate's notifications from {host}: nothing failed.\n");
    Notice {
        level: "info",
        subject: format!("[sysstate test] {host}: notifications work"),
        json: json!({"level": "info", "host": host, "test": true, "text": text}),
        text,
    }
}

/// Several notices as one (the hourly digest).
pub fn digest(notices: &[Notice]) -> Notice {
    let host = sysstate_repo::lock::host_name();
    let level = if notices.iter().any(|n| n.level == "critical") { "critical" } else { "warning" };
    let text = notices.iter().map(|n| format!("== {}\n\n{}", n.subject, n.text)).collect::<Vec<_>>().join("\n");
    Notice {
        level,
        subject: format!("[sysstate {level}] {host}: {} notices in the last hour", notices.len()),
        json: json!({"level": level, "host": host, "notices": notices.iter().map(|n| n.json.clone()).collect::<Vec<_>>()}),
        text,
    }
}

/// Sends `notice` to every target of `section`.
pub fn deliver(section: &NotifySection, notice: &Notice) -> Vec<Delivery> {
    let mut deliveries = Vec::new();
    if let Some(url) = &section.webhook {
        deliveries.push(Delivery { target: format!("webhook {url}"), result: webhook(url, &notice.json) });
    }
    if let Some(mail) = &section.mail {
        let via = match &mail.smtp {
            Some(server) => format!("SMTP {server}"),
            None => format!("`{}`", mail.sendmail.as_deref().unwrap_or(DEFAULT_SENDMAIL)),
        };
        deliveries.push(Delivery { target: format!("mail to {} via {via}", mail.to), result: send_mail(mail, notice) });
    }
    deliveries
}

/// Delivers `notice` and records each failed delivery as a `notification-failed` event.
pub fn deliver_and_record(store: &JobStore, section: &NotifySection, notice: &Notice) {
    for delivery in deliver(section, notice) {
        match delivery.result {
            Ok(()) => crate::daemon::say(format!("notified {}: {}", delivery.target, notice.subject)),
            Err(why) => {
                let message =
                    format!("the notice `{}` could not be delivered to {}: {why}", notice.subject, delivery.target);
                crate::daemon::say(&message);
                let _ =
                    store.event(None, Level::Warning, Source::Engine, ErrorCode::NotificationFailed, &message, None);
            }
        }
    }
}

const DEFAULT_SENDMAIL: &str = "/usr/sbin/sendmail";
/// How long one webhook request may take.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// The waits before the second and third tries.
const WEBHOOK_RETRIES: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(4)];

/// POSTs `body` to `url`, three tries; a 2xx is delivered.
fn webhook(url: &str, body: &Value) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let _context = runtime.enter();
    let client = reqwest::Client::builder()
        .timeout(WEBHOOK_TIMEOUT)
        .user_agent(concat!("sysstate/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())?;
    let body = serde_json::to_vec(body).expect("JSON encodes");
    let mut last = String::new();
    for wait in std::iter::once(Duration::ZERO).chain(WEBHOOK_RETRIES) {
        std::thread::sleep(wait);
        let sent =
            runtime.block_on(client.post(url).header("content-type", "application/json").body(body.clone()).send());
        match sent {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => last = format!("it answered {}", response.status()),
            Err(error) => last = sysstate_repo::backend::vault::describe(&error),
        }
    }
    Err(format!("{last} (tried 3 times)"))
}

/// Sends `notice` by mail.
fn send_mail(mail: &MailConfig, notice: &Notice) -> Result<(), String> {
    use lettre::Transport;
    let from = mail.from.clone().unwrap_or_else(|| format!("sysstate@{}", sysstate_repo::lock::host_name()));
    let message = lettre::Message::builder()
        .from(from.parse().map_err(|e| format!("`notify.mail.from` `{from}`: {e}"))?)
        .to(mail.to.parse().map_err(|e| format!("`notify.mail.to` `{}`: {e}", mail.to))?)
        .subject(&notice.subject)
        .header(lettre::message::header::ContentType::TEXT_PLAIN)
        .body(notice.text.clone())
        .map_err(|e| e.to_string())?;
    match &mail.smtp {
        Some(server) => {
            let (host, port) = match server.rsplit_once(':') {
                Some((host, port)) => {
                    (host, port.parse::<u16>().map_err(|_| format!("`{server}`: the port is not a number"))?)
                }
                None => (server.as_str(), 25),
            };
            let transport = lettre::SmtpTransport::builder_dangerous(host)
                .port(port)
                .timeout(Some(Duration::from_secs(30)))
                .build();
            transport.send(&message).map(|_| ()).map_err(|e| e.to_string())
        }
        None => {
            let program = mail.sendmail.as_deref().unwrap_or(DEFAULT_SENDMAIL);
            lettre::SendmailTransport::new_with_command(program).send(&message).map_err(|e| format!("`{program}`: {e}"))
        }
    }
}
