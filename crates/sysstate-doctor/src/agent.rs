//! The agent, as the doctor and `sysstate services` see it: asked for its status on its socket
//! as any client would (one `GET /v1/status`), its schedules and last success read from the
//! config and the job store, and its notification targets tried for a connection (nothing is
//! sent: `sysstate notify test` sends a message).

use crate::Check;
use serde_json::Value;
use std::io::{Read, Write};
use std::time::Duration;
use sysstate_engine::config::Config;
use sysstate_engine::jobs::{JobKind, JobStore};

/// The agent's `/v1/status`, if an agent answers on its socket.
pub fn status() -> Option<Value> {
    let socket = sysstate_engine::paths::agent_socket();
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /v1/status HTTP/1.1\r\nHost: sysstate-agent\r\nConnection: close\r\n\r\n").ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?;
    let mut value: Value = serde_json::from_str(body.trim()).ok()?;
    value["http-status"] = status.parse::<u16>().ok()?.into();
    Some(value)
}

/// True when the config asks for an agent: it has schedules.
fn wanted(config: &Config) -> bool {
    config.schedule.schedules().is_ok_and(|s| !s.is_empty())
}

/// The agent's checks: running (when the config has schedules), its schedules, its last
/// successful backup recent enough, each notification target reachable.
pub(crate) fn checks(config: &Config, checks: &mut Vec<Check>) {
    match status() {
        Some(status) if status["http-status"] == 200 => {
            let agent = &status["agent"];
            checks.push(Check::ok(
                "agent.running",
                format!(
                    "the agent runs (pid {}, version {}, since {})",
                    agent["pid"],
                    agent["version"].as_str().unwrap_or("?"),
                    agent["started"].as_str().unwrap_or("?")
                ),
            ));
            if let Some(error) = agent["config-error"].as_str() {
                checks.push(Check::failed(
                    "agent.config",
                    format!("the agent refused the config at its last reload and keeps the one it had: {error}"),
                    "correct the config, then `systemctl reload sysstate-agent`",
                ));
            }
        }
        Some(status) => checks.push(Check::warning(
            "agent.running",
            format!(
                "the agent answers but refuses this user ({}): {}",
                status["http-status"],
                status["error"]["message"].as_str().unwrap_or("")
            ),
            "run the doctor as root, or join `[agent] read-group`",
        )),
        None if wanted(config) => checks.push(Check::failed(
            "agent.running",
            format!(
                "the config has schedules but no agent runs (nothing answers on `{}`): no scheduled backup will happen",
                sysstate_engine::paths::agent_socket().display()
            ),
            "start it: `systemctl enable --now sysstate-agent` (or `sysstate agent`)",
        )),
        None => checks.push(Check::ok(
            "agent.running",
            "no agent runs, and the config has no schedule: backups run from the command line",
        )),
    }
    if let Ok(schedules) = config.schedule.schedules() {
        let now = chrono::Local::now();
        for schedule in &schedules {
            let next = schedule
                .next_after(&now)
                .map_or_else(|| "never".to_string(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, false));
            let entries: Vec<&str> = schedule.entries.iter().map(|e| e.text.as_str()).collect();
            checks.push(Check::ok(
                &format!("agent.schedule.{}", schedule.work.key()),
                format!("`{}` runs at {}: next {next}", schedule.work.key(), entries.join(", ")),
            ));
        }
    }
    last_success(config, checks);
    for target in targets(config) {
        checks.push(target);
    }
    if let Some(url) = &config.vault.url {
        checks.push(vault(url));
    }
}

/// The vault the agent replicates to: this host registered with it, the vault answering with
/// the pinned certificate, and the host's token accepted (one listing).
fn vault(url: &str) -> Check {
    use sysstate_repo::backend::ErrorKind;
    let backend = match sysstate_engine::vault::backend(url) {
        Ok(backend) => backend,
        Err(error) => {
            return Check::failed("agent.vault", error.message.clone(), error.resolution()).code(error.code);
        }
    };
    match backend.list(sysstate_repo::backend::FileKind::Config) {
        Ok(_) => Check::ok("agent.vault", format!("the vault `{url}` answers and accepts this host's token")),
        Err(error) => {
            let code = match error.kind {
                ErrorKind::Forbidden => sysstate_types::ErrorCode::VaultForbidden,
                _ => sysstate_types::ErrorCode::VaultUnreachable,
            };
            Check::failed("agent.vault", format!("the vault `{url}`: {error}"), code.resolution()).code(code)
        }
    }
}

/// The last successful backup, against `no-success-for` (or two days when the agent backs up on
/// a schedule and no limit is set).
fn last_success(config: &Config, checks: &mut Vec<Check>) {
    let limit = match config.notify.rules().ok().and_then(|r| r.no_success_for) {
        Some(limit) => limit,
        None if config.schedule.schedules().is_ok_and(|s| s.iter().any(|s| s.work.key() == "backup")) => {
            Duration::from_secs(2 * 86_400)
        }
        None => return,
    };
    let Ok(store) = JobStore::open(&sysstate_engine::paths::state_dir()) else { return };
    let last = store.last_ended(JobKind::Backup, true).ok().flatten();
    let ended = last.as_ref().and_then(|j| j.ended.as_deref()).and_then(sysstate_types::time::parse_utc);
    let age = ended.map(|ns| (sysstate_repo::lock::now_ns() - ns).max(0) as u64 / 1_000_000_000);
    let hours = limit.as_secs() / 3600;
    match (last, age) {
        (Some(job), Some(age)) if age <= limit.as_secs() => checks.push(Check::ok(
            "agent.last-success",
            format!(
                "the last successful backup, job {}, ended {} ago",
                job.id,
                sysstate_types::time::format_duration_s(age)
            ),
        )),
        (Some(job), Some(age)) => checks.push(Check::failed(
            "agent.last-success",
            format!(
                "no backup has succeeded for {} (more than {hours} h): the last was job {}",
                sysstate_types::time::format_duration_s(age),
                job.id
            ),
            "`sysstate job --previous 5` shows what failed since; `sysstate backup --now` runs one",
        )),
        _ => checks.push(Check::warning(
            "agent.last-success",
            "no backup has succeeded yet",
            "run one: `sysstate backup --now`",
        )),
    }
}

/// Each notification target: a connection to the webhook's and the mail server's address, or
/// the `sendmail` program installed.
fn targets(config: &Config) -> Vec<Check> {
    let mut checks = Vec::new();
    let connect = |address: &str| -> Result<(), String> {
        use std::net::ToSocketAddrs;
        let addresses: Vec<_> =
            address.to_socket_addrs().map_err(|e| format!("cannot resolve `{address}`: {e}"))?.collect();
        let mut last = format!("`{address}` has no address");
        for socket in addresses {
            match std::net::TcpStream::connect_timeout(&socket, Duration::from_secs(3)) {
                Ok(_) => return Ok(()),
                Err(error) => last = format!("cannot connect to {socket}: {error}"),
            }
        }
        Err(last)
    };
    if let Some(url) = &config.notify.webhook {
        let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
        let authority = rest.split('/').next().unwrap_or(rest);
        let address = if authority.contains(':') {
            authority.to_string()
        } else if url.starts_with("https") {
            format!("{authority}:443")
        } else {
            format!("{authority}:80")
        };
        checks.push(match connect(&address) {
            Ok(()) => Check::ok("agent.notify.webhook", format!("the webhook `{url}` accepts connections")),
            Err(why) => Check::failed(
                "agent.notify.webhook",
                format!("the webhook `{url}` cannot be reached: {why}"),
                "fix `notify.webhook` or the server behind it; `sysstate notify test` sends a test message",
            )
            .code(sysstate_types::ErrorCode::NotificationFailed),
        });
    }
    if let Some(mail) = &config.notify.mail {
        let check = match (&mail.smtp, &mail.sendmail) {
            (Some(server), _) => {
                let address = if server.contains(':') { server.clone() } else { format!("{server}:25") };
                match connect(&address) {
                    Ok(()) => Check::ok("agent.notify.mail", format!("the mail server `{server}` accepts connections")),
                    Err(why) => Check::failed(
                        "agent.notify.mail",
                        format!("the mail server `{server}` cannot be reached: {why}"),
                        "fix `notify.mail.smtp` or start the server; `sysstate notify test` sends a test message",
                    )
                    .code(sysstate_types::ErrorCode::NotificationFailed),
                }
            }
            (None, program) => {
                let program = program.as_deref().unwrap_or("/usr/sbin/sendmail");
                if std::path::Path::new(program).exists() {
                    Check::ok("agent.notify.mail", format!("mail goes through `{program}`"))
                } else {
                    Check::failed(
                        "agent.notify.mail",
                        format!("mail goes through `{program}`, which is not installed"),
                        "install a mail transfer agent (`apt install postfix`), or give `notify.mail.smtp`",
                    )
                    .code(sysstate_types::ErrorCode::NotificationFailed)
                }
            }
        };
        checks.push(check);
    }
    checks
}
