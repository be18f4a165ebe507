//! The agent, run for real: `sysstate agent` in the background of a sandbox, with schedules of a
//! few seconds (calendar expressions with seconds), its API on the sandbox's socket, and
//! signals sent to it as systemd would.

use crate::support::{assert_job_failed, is_root, make_tree, text, version_entries, Sandbox};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A running agent; stopped with SIGTERM when dropped.
pub(crate) struct Agent {
    child: std::process::Child,
    log: PathBuf,
}

impl Agent {
    pub(crate) fn start(sandbox: &Sandbox, root: &Path, env: &[(&str, &str)]) -> Agent {
        let log = sandbox.path(&format!("agent-{}.log", now_ns()));
        let mut command = sandbox.command(&["--root", root.to_str().unwrap(), "agent"]);
        command.envs(env.iter().copied()).stderr(std::fs::File::create(&log).unwrap());
        let agent = Agent { child: command.spawn().unwrap(), log };
        wait_for("the agent's socket", Duration::from_secs(20), || sandbox.path("run/agent.sock").exists());
        agent
    }

    /// SIGTERM, then the exit status.
    pub(crate) fn stop(mut self) -> std::process::ExitStatus {
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), rustix::process::Signal::Term)
            .unwrap();
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ =
            rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), rustix::process::Signal::Term);
        let _ = self.child.wait();
    }
}

fn now_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A sandbox whose config has a `data` component, `extra` after it (`@/` in it is the sandbox's
/// folder), and a small tree to back up.
fn setup(extra: &str) -> (Sandbox, PathBuf) {
    let sandbox = Sandbox::new();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 40, 7);
    let config = format!(
        "[backup]\ncomponents = [\"data\"]\n\n[[component]]\nname = \"data\"\npaths = [\"/data\"]\n\n{}",
        extra.replace("@/", &format!("{}/", sandbox.dir.path().display()))
    );
    std::fs::write(sandbox.path("config.toml"), config).unwrap();
    (sandbox, root)
}

fn jobs(sandbox: &Sandbox, count: usize) -> Vec<Value> {
    sandbox.json(&["job", "--previous", &count.to_string()], 0).as_array().unwrap().clone()
}

fn of_kind<'j>(jobs: &'j [Value], kind: &str) -> Vec<&'j Value> {
    jobs.iter().filter(|j| j["kind"] == kind).collect()
}

/// One raw HTTP request on the agent's socket, as any local process could send it: the status
/// and the body.
fn raw(sandbox: &Sandbox, request: &[u8]) -> (u16, String) {
    let mut stream = std::os::unix::net::UnixStream::connect(sandbox.path("run/agent.sock")).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The agent may answer (413) and close before a large body is all written.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = text(&answer);
    let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, answer)
}

#[test]
fn scheduled_backups_never_overlap_keep_the_retention_and_say_they_were_scheduled() {
    // A writer writes each freeze and thaw with a nanosecond time: two backups at once would
    // show as two freezes in a row (the jobs' times have whole seconds only).
    let (sandbox, root) = setup(
        "[schedule]\nbackup = [\"*/2 * * * * *\"]\n\n[retention]\nlast = 2\n\n[[writer]]\nname = \"timeline\"\nkind = \"command\"\nfreeze = [\"sh\", \"-c\", \"echo freeze $(date +%s%N) >> @/timeline\"]\nthaw = [\"sh\", \"-c\", \"echo thaw $(date +%s%N) >> @/timeline\"]\n",
    );
    // Each backup holds its writers frozen for 2.5 s: runs come every 2 s, so some find the
    // previous one running and are skipped, never overlapped.
    let agent = Agent::start(&sandbox, &root, &[("SYSSTATE_FAILPOINT_COMMIT_DELAY_MS", "2500")]);
    wait_for("three scheduled backups", Duration::from_secs(60), || {
        of_kind(&jobs(&sandbox, 50), "backup").iter().filter(|j| j["state"] == "succeeded").count() >= 3
    });
    assert!(agent.stop().success());
    let all = jobs(&sandbox, 50);
    let mut backups: Vec<&Value> = of_kind(&all, "backup");
    backups.sort_by_key(|j| j["started"].as_str().unwrap().to_string());
    assert!(backups.len() >= 3, "{all:#?}");
    for pair in backups.windows(2) {
        let (ended, started) = (pair[0]["ended"].as_str().unwrap(), pair[1]["started"].as_str().unwrap());
        assert!(ended <= started, "two backups overlapped: {:#?}", pair);
    }
    // None failed (a second shadow set at once would have: `shadow-set-in-progress`); only the
    // last may have been cancelled by the stop.
    let (last, earlier) = backups.split_last().unwrap();
    assert!(earlier.iter().all(|j| j["state"] == "succeeded"), "{all:#?}");
    assert!(last["state"] == "succeeded" || last["state"] == "cancelled", "{last:#}");
    let timeline = std::fs::read_to_string(sandbox.path("timeline")).unwrap();
    let events: Vec<(&str, u128)> = timeline
        .lines()
        .map(|line| {
            let (what, at) = line.split_once(' ').unwrap();
            (what, at.parse().unwrap())
        })
        .collect();
    assert!(events.len() >= 6, "{timeline}");
    for (index, pair) in events.windows(2).enumerate() {
        let expected = if index % 2 == 0 { ("freeze", "thaw") } else { ("thaw", "freeze") };
        assert_eq!((pair[0].0, pair[1].0), expected, "two freezes at once:\n{timeline}");
        assert!(pair[0].1 <= pair[1].1, "{timeline}");
    }
    for backup in &backups {
        assert_eq!(backup["trigger"], "schedule", "{backup:#}");
    }
    // The retention policy ran after each successful one: two versions stay.
    let forgets = of_kind(&all, "forget");
    assert!(forgets.len() >= 3 && forgets.iter().all(|f| f["state"] == "succeeded"), "{forgets:#?}");
    assert_eq!(sandbox.json(&["versions"], 0).as_array().unwrap().len(), 2);
    // The runs that came while one ran were skipped, each said.
    let skipped = sandbox.json(&["events", "--level", "warning"], 0);
    let skipped: Vec<&Value> = skipped.as_array().unwrap().iter().filter(|e| e["code"] == "schedule-skipped").collect();
    assert!(!skipped.is_empty(), "no run was skipped while a 2.5 s backup ran every 2 s");
    assert!(skipped[0]["message"].as_str().unwrap().contains("was still running"), "{:#}", skipped[0]);
}

#[test]
fn a_run_missed_while_the_agent_was_down_runs_once_at_its_start() {
    let (sandbox, root) = setup("[schedule]\nbackup = [\"*/2 * * * * *\"]\n");
    let agent = Agent::start(&sandbox, &root, &[]);
    wait_for("a scheduled backup", Duration::from_secs(30), || !of_kind(&jobs(&sandbox, 10), "backup").is_empty());
    let first_log = agent.log();
    assert!(agent.stop().success());
    let before = jobs(&sandbox, 50).len();
    assert!(
        of_kind(&jobs(&sandbox, 50), "backup").iter().all(|j| j["trigger"] == "schedule"),
        "a first start catches nothing up"
    );
    // Down across at least two scheduled times.
    std::thread::sleep(Duration::from_secs(5));
    let agent = Agent::start(&sandbox, &root, &[]);
    wait_for("the catch-up run", Duration::from_secs(30), || {
        of_kind(&jobs(&sandbox, 50), "backup").iter().any(|j| j["trigger"] == "catch-up" && j["state"] != "running")
    });
    std::thread::sleep(Duration::from_secs(3));
    let log = agent.log();
    assert!(agent.stop().success());
    let all = jobs(&sandbox, 100);
    let caught_up: Vec<&Value> = of_kind(&all, "backup").into_iter().filter(|j| j["trigger"] == "catch-up").collect();
    assert_eq!(caught_up.len(), 1, "exactly one catch-up run: {all:#?}\n{first_log}\n{log}");
    assert_eq!(caught_up[0]["state"], "succeeded");
    assert!(log.contains("missed while the agent was down"), "{log}");
    assert!(all.len() > before);
}

#[test]
fn sigterm_in_the_middle_of_a_freeze_thaws_the_writers_and_cancels_the_job() {
    let (sandbox, root) = setup(
        "[[writer]]\nname = \"app\"\nkind = \"command\"\ncomponents = [\"data\"]\nfreeze = [\"touch\", \"@/frozen\"]\nthaw = [\"touch\", \"@/thawed\"]\nfreeze-timeout = \"60s\"\n",
    );
    // The provider's commit takes 20 s: the writer stays frozen until the signal comes.
    let agent = Agent::start(&sandbox, &root, &[("SYSSTATE_FAILPOINT_COMMIT_DELAY_MS", "20000")]);
    let follower = sandbox
        .command(&["backup", "--now"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the writer's freeze", Duration::from_secs(30), || sandbox.path("frozen").exists());
    assert!(!sandbox.path("thawed").exists());
    let running = sandbox.json(&["job"], 0);
    assert_eq!(running[0]["trigger"], "api", "{running:#}");
    let stopped = Instant::now();
    let status = agent.stop();
    assert!(status.success(), "{status}");
    assert!(stopped.elapsed() < Duration::from_secs(15), "the agent waited for the commit: {:?}", stopped.elapsed());
    assert!(sandbox.path("thawed").exists(), "the writer was left frozen");
    let job = &jobs(&sandbox, 1)[0];
    assert_eq!((job["kind"].as_str(), job["state"].as_str()), (Some("backup"), Some("cancelled")), "{job:#}");
    assert!(sandbox.json(&["versions"], 0).as_array().unwrap().is_empty(), "nothing half-stored");
    let writers = sandbox.json(&["writers"], 0);
    assert_eq!(
        writers.as_array().unwrap().iter().find(|w| w["name"] == "app").unwrap()["state"],
        "stable",
        "{writers:#}"
    );
    // The command that asked follows the job to its end and says how it ended.
    let followed = follower.wait_with_output().unwrap();
    assert_eq!(followed.status.code(), Some(2), "{}", text(&followed.stderr));
    assert!(text(&followed.stderr).contains("error[cancelled]"), "{}", text(&followed.stderr));
}

#[test]
fn the_api_answers_by_the_callers_credentials_and_refuses_what_is_malformed() {
    if !is_root() {
        eprintln!("skipped: needs root to run a caller as another user");
        return;
    }
    let (sandbox, root) = setup("[agent]\nread-group = \"nogroup\"\n");
    let agent = Agent::start(&sandbox, &root, &[]);
    // Root may do everything.
    let status = sandbox.json(&["agent", "status"], 0);
    assert_eq!(status["agent"]["pid"], agent.child.id());
    // Another user reaches the socket (the folders are traversable) and is judged by its
    // credentials: `nobody` is in `nogroup`, the read group: it may read, not start or cancel.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(sandbox.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(sandbox.path("config.toml"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut command = sandbox.command(args);
        command.uid(65534).gid(65534).env("HOME", "/nonexistent");
        command.output().unwrap()
    };
    let read = as_nobody(&["agent", "status", "--json"]);
    assert_eq!(read.status.code(), Some(0), "{}", text(&read.stderr));
    let refused = as_nobody(&["backup", "--now"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    let stderr = text(&refused.stderr);
    assert!(stderr.contains("403") && stderr.contains("uid 65534") && stderr.contains("admin-group"), "{stderr}");
    assert!(jobs(&sandbox, 10).is_empty(), "a refused caller started a job");
    // Without the read group, `nobody` may not even read.
    std::fs::write(
        sandbox.path("config.toml"),
        "[backup]\ncomponents = [\"data\"]\n[[component]]\nname = \"data\"\npaths = [\"/data\"]\n",
    )
    .unwrap();
    rustix::process::kill_process(rustix::process::Pid::from_child(&agent.child), rustix::process::Signal::Hup)
        .unwrap();
    wait_for("the reload", Duration::from_secs(10), || agent.log().contains("configuration reloaded"));
    let unread = as_nobody(&["agent", "status"]);
    assert_eq!(unread.status.code(), Some(2));
    assert!(text(&unread.stderr).contains("may not use the agent's API"), "{}", text(&unread.stderr));
    // Hostile input gets a clear refusal, and the agent goes on.
    let (code, body) = raw(&sandbox, b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{\"kind\":1");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not JSON"), "{body}");
    let (code, body) =
        raw(&sandbox, b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n{\"kind\": \"format-c\"}");
    assert_eq!(code, 400, "{body}");
    let big = format!("POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n{}", " ".repeat(200_000));
    let (code, body) = raw(&sandbox, big.as_bytes());
    assert_eq!(code, 413, "{body}");
    let (code, body) = raw(&sandbox, b"GET /v1/jobs?limit=0 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, 400, "{body}");
    let (code, _) = raw(&sandbox, b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, 404);
    let (code, body) = raw(&sandbox, b"GET /v1/jobs/none/log HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, 404, "{body}");
    let (code, _) = raw(&sandbox, b"this is not http\r\n\r\n");
    assert_eq!(code, 400);
    let (code, body) = raw(&sandbox, b"GET /v1/jobs/none?wait=soon HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("milliseconds"), "{body}");
    // A backup asked for now runs, and its log and events are there to read.
    let output = sandbox.run_code(&["backup", "--now"], 0);
    assert!(text(&output.stdout).contains("succeeded"), "{}", text(&output.stdout));
    let job = &jobs(&sandbox, 1)[0];
    let id = job["id"].as_str().unwrap();
    let (code, log) = raw(&sandbox, format!("GET /v1/jobs/{id}/log?follow=1 HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    assert_eq!(code, 200);
    assert!(log.contains("ended: succeeded"), "{log}");
    // A job that ended is answered at once, whatever the wait asked for.
    let asked = std::time::Instant::now();
    let (code, body) = raw(&sandbox, format!("GET /v1/jobs/{id}?wait=10000 HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"succeeded\""), "{body}");
    assert!(asked.elapsed() < Duration::from_secs(5), "an ended job was waited on for {:?}", asked.elapsed());
    let (code, listed) = raw(&sandbox, b"GET /v1/jobs?kind=backup&state=succeeded&limit=5 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, 200);
    assert!(listed.contains(id), "{listed}");
    assert!(agent.stop().success());
}

#[test]
fn a_second_agent_names_the_one_that_runs() {
    let (sandbox, root) = setup("");
    let agent = Agent::start(&sandbox, &root, &[]);
    let output = sandbox.run_code(&["--root", root.to_str().unwrap(), "agent"], 2);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("error[agent-running]"), "{stderr}");
    assert!(stderr.contains(&format!("process {}", agent.child.id())), "{stderr}");
    assert!(agent.stop().success());
    // Once it stopped, another starts.
    let again = Agent::start(&sandbox, &root, &[]);
    assert!(again.stop().success());
}

#[test]
fn a_retention_that_would_drop_the_backup_just_made_is_refused() {
    // Every 5 s: the agent is stopped long before a second run after the first.
    let (sandbox, root) = setup("[schedule]\nbackup = [\"*/5 * * * * *\"]\n\n[retention]\nlast = 1\n");
    // A version from a clock that ran an hour ahead is the group's newest: `last = 1` would keep
    // it and drop every backup made since.
    let ahead = sandbox
        .command(&["--root", root.to_str().unwrap(), "backup"])
        .env("SYSSTATE_FAILPOINT_CLOCK_AHEAD_S", "3600")
        .output()
        .unwrap();
    assert_eq!(ahead.status.code(), Some(0), "{}", text(&ahead.stderr));
    let agent = Agent::start(&sandbox, &root, &[]);
    wait_for("the retention after a scheduled backup", Duration::from_secs(30), || {
        !of_kind(&jobs(&sandbox, 10), "forget").is_empty()
    });
    assert!(agent.stop().success());
    assert_job_failed(&sandbox, "retention-refused");
    let forget = &of_kind(&jobs(&sandbox, 20), "forget")[0].clone();
    assert!(forget["error"]["message"].as_str().unwrap().contains("the last successful backup"), "{forget:#}");
    assert!(sandbox.json(&["versions"], 0).as_array().unwrap().len() >= 2, "something was dropped");
}

/// Reads datagrams from `socket` until one contains `wanted` (or times out); returns them all.
fn datagrams_until(socket: &std::os::unix::net::UnixDatagram, wanted: &str) -> Vec<String> {
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut seen = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    while !seen.iter().any(|s: &String| s.contains(wanted)) {
        let read = socket.recv(&mut buffer).unwrap_or_else(|e| panic!("no `{wanted}` in {seen:#?}: {e}"));
        seen.push(String::from_utf8_lossy(&buffer[..read]).into_owned());
    }
    seen
}

#[test]
fn the_units_verify_and_the_agent_speaks_systemds_notify_and_journal_protocols() {
    // The units as shipped, with the binary under test in place of /usr/bin/sysstate.
    let sandbox = Sandbox::new();
    let units = sandbox.path("units");
    std::fs::create_dir_all(&units).unwrap();
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/systemd");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dist).unwrap() {
        let path = entry.unwrap().path();
        let unit = std::fs::read_to_string(&path).unwrap().replace("/usr/bin/sysstate", env!("CARGO_BIN_EXE_sysstate"));
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        std::fs::write(units.join(&name), unit).unwrap();
        names.push(format!("./{name}"));
    }
    assert_eq!(names.len(), 4, "{names:?}");
    if crate::support::require("systemd-analyze", Path::new("/usr/bin/systemd-analyze").exists()) {
        let verified = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg("--man=no")
            .args(&names)
            .current_dir(&units)
            .output()
            .unwrap();
        assert!(verified.status.success() && verified.stderr.is_empty(), "{}", text(&verified.stderr));
    }

    // The notify protocol: READY once the API answers, the watchdog, STOPPING at SIGTERM.
    let (sandbox, root) = setup("[schedule]\nbackup = [\"*/2 * * * * *\"]\n");
    let notify = std::os::unix::net::UnixDatagram::bind(sandbox.path("notify.sock")).unwrap();
    let journal = std::os::unix::net::UnixDatagram::bind(sandbox.path("journal.sock")).unwrap();
    let notify_path = sandbox.path("notify.sock").display().to_string();
    let journal_path = sandbox.path("journal.sock").display().to_string();
    let agent = Agent::start(
        &sandbox,
        &root,
        &[
            ("NOTIFY_SOCKET", &notify_path),
            ("WATCHDOG_USEC", "400000"),
            ("JOURNAL_STREAM", "8:1234"),
            ("SYSSTATE_FAILPOINT_JOURNAL_SOCKET", &journal_path),
        ],
    );
    let ready = datagrams_until(&notify, "READY=1");
    assert!(ready.last().unwrap().contains("STATUS=idle; next: backup at"), "{ready:#?}");
    datagrams_until(&notify, "STATUS=running job ");
    // Every 200 ms, half the watchdog's 400 ms.
    datagrams_until(&notify, "WATCHDOG=1");
    // The journal gets each line with its fields: the job, and the priority.
    let lines = datagrams_until(&journal, "SYSSTATE_JOB=");
    let started = lines.iter().find(|l| l.contains("SYSSTATE_JOB=")).unwrap();
    assert!(started.contains("PRIORITY=6\n") && started.contains("SYSLOG_IDENTIFIER=sysstate-agent\n"), "{started}");
    assert!(started.contains("MESSAGE=job ") && started.contains(" started: backup"), "{started}");
    assert!(agent.stop().success());
    datagrams_until(&notify, "STOPPING=1");
}

/// A webhook receiver on 127.0.0.1: answers the first request 503 (so the agent must retry),
/// then 200, keeping each body.
struct Webhook {
    port: u16,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Webhook {
    fn start() -> Webhook {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (kept, counted) = (bodies.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; length];
                let _ = reader.read_exact(&mut body);
                let first = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
                let status = if first { "503 Service Unavailable" } else { "200 OK" };
                if !first {
                    kept.lock().unwrap().push(String::from_utf8_lossy(&body).into_owned());
                }
                let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        });
        Webhook { port, bodies, requests }
    }

    fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }
}

/// aiosmtpd on 127.0.0.1, keeping each message in a Maildir; stopped when dropped.
struct Smtp {
    child: std::process::Child,
    port: u16,
    maildir: PathBuf,
}

impl Smtp {
    fn start(dir: &Path) -> Option<Smtp> {
        let available = std::process::Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !crate::support::require("aiosmtpd (pip install aiosmtpd)", available) {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let maildir = dir.join("maildir");
        let child = std::process::Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_for("aiosmtpd", Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        Some(Smtp { child, port, maildir })
    }

    fn messages(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.maildir.join("new")) else { return Vec::new() };
        entries.map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap()).collect()
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_failure_is_told_once_by_webhook_and_by_mail_with_the_culprit_and_the_doctors_diagnosis() {
    let sandbox_dir = tempfile::tempdir().unwrap();
    let Some(smtp) = Smtp::start(sandbox_dir.path()) else { return };
    let webhook = Webhook::start();
    let notify = format!(
        "[notify]\non = [\"failure\", \"warning\"]\nwebhook = \"http://127.0.0.1:{}/hook\"\nmail = {{ to = \"root@localhost\", smtp = \"127.0.0.1:{}\" }}\n",
        webhook.port, smtp.port
    );
    let writer = "[[writer]]\nname = \"slowdb\"\nkind = \"command\"\nfreeze = [\"sleep\", \"3\"]\nthaw = [\"true\"]\nfreeze-timeout = \"500ms\"\n";
    let (sandbox, root) = setup(&format!("{writer}\n{notify}"));
    // `notify test` reaches both targets (the webhook's first answer, a 503, is tried again).
    let tested = sandbox.run_code(&["notify", "test"], 0);
    let said = text(&tested.stdout);
    assert!(said.contains("webhook http://127.0.0.1") && said.contains(": delivered"), "{said}");
    assert!(said.contains("mail to root@localhost via SMTP"), "{said}");
    assert_eq!(webhook.requests.load(std::sync::atomic::Ordering::SeqCst), 2, "the 503 was not tried again");
    assert_eq!(smtp.messages().len(), 1);
    assert!(smtp.messages()[0].contains("notifications work"));

    // A writer that outlives its freeze window fails the backup: one notice on each target.
    let agent = Agent::start(&sandbox, &root, &[]);
    let failed = sandbox.run_code(&["backup", "--now"], 2);
    assert!(text(&failed.stderr).contains("error[writer-timeout]"), "{}", text(&failed.stderr));
    wait_for("the notices", Duration::from_secs(30), || webhook.bodies().len() == 2 && smtp.messages().len() == 2);
    std::thread::sleep(Duration::from_secs(2));
    let hooks = webhook.bodies();
    assert_eq!(hooks.len(), 2, "exactly one notice for one failure: {hooks:#?}");
    let hook: Value = serde_json::from_str(&hooks[1]).unwrap();
    assert_eq!(hook["level"], "critical");
    assert_eq!(hook["job"]["error"]["code"], "writer-timeout");
    assert!(hook["job"]["error"]["message"].as_str().unwrap().contains("slowdb"), "{hook:#}");
    assert!(!hook["diagnosis"]["resolution"].as_str().unwrap().is_empty(), "{hook:#}");
    assert!(
        hook["diagnosis"]["specifics"].as_array().unwrap().iter().any(|s| s.as_str().unwrap().contains("slowdb")),
        "{hook:#}"
    );
    let mails = smtp.messages();
    let mail = mails.iter().find(|m| m.contains("writer-timeout")).unwrap_or_else(|| panic!("{mails:#?}"));
    assert!(mail.contains("Subject: [sysstate critical]") && mail.contains("slowdb"), "{mail}");
    assert!(mail.contains("resolution:") && mail.contains("The doctor's diagnosis"), "{mail}");

    // A job the administrator cancels is not told (the writer now has the time it needs, and
    // the job is cancelled in its freeze).
    let reload = |from: &str, to: &str, count: usize| {
        let config = std::fs::read_to_string(sandbox.path("config.toml")).unwrap();
        assert!(config.contains(from), "{config}");
        std::fs::write(sandbox.path("config.toml"), config.replace(from, to)).unwrap();
        rustix::process::kill_process(rustix::process::Pid::from_child(&agent.child), rustix::process::Signal::Hup)
            .unwrap();
        wait_for("the reload", Duration::from_secs(10), || {
            agent.log().matches("configuration reloaded").count() == count
        });
    };
    reload("freeze-timeout = \"500ms\"", "freeze-timeout = \"60s\"", 1);
    let follower = sandbox
        .command(&["backup", "--now"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the second backup", Duration::from_secs(20), || {
        !sandbox.json(&["job"], 0).as_array().unwrap().is_empty()
    });
    let id = sandbox.json(&["job"], 0)[0]["id"].as_str().unwrap().to_string();
    sandbox.ok(&["job", "cancel", &id]);
    let followed = follower.wait_with_output().unwrap();
    assert_eq!(followed.status.code(), Some(2));
    assert_eq!(jobs(&sandbox, 1)[0]["state"], "cancelled");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(webhook.bodies().len(), 2, "a cancelled job was told");

    // No success for 2 s (none ever, here): the dead-man alert, once.
    reload("\"warning\"]", "\"warning\", \"no-success-for 2s\"]", 2);
    wait_for("the dead-man alert", Duration::from_secs(30), || webhook.bodies().len() == 3);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(webhook.bodies().len(), 3, "the dead-man alert is sent once: {:#?}", webhook.bodies());
    assert!(webhook.bodies()[2].contains("no-success-for-seconds"), "{}", webhook.bodies()[2]);
    assert!(smtp.messages().iter().any(|m| m.contains("no successful backup for")), "{:#?}", smtp.messages());

    // A target that does not answer is an event, not a failed job.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    reload(&format!("127.0.0.1:{}/hook", webhook.port), &format!("127.0.0.1:{dead}/hook"), 3);
    reload("freeze-timeout = \"60s\"", "freeze-timeout = \"500ms\"", 4);
    sandbox.run_code(&["backup", "--now"], 2);
    wait_for("the failed delivery", Duration::from_secs(30), || {
        sandbox
            .json(&["events", "--level", "warning"], 0)
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["code"] == "notification-failed")
    });
    let events = sandbox.json(&["events", "--level", "warning"], 0);
    let event = events.as_array().unwrap().iter().find(|e| e["code"] == "notification-failed").unwrap();
    assert!(event["message"].as_str().unwrap().contains(&format!("127.0.0.1:{dead}")), "{event:#}");
    assert!(event["message"].as_str().unwrap().contains("tried 3 times"), "{event:#}");
    let untold = sandbox.run_code(&["notify", "test"], 2);
    assert!(text(&untold.stdout).contains("NOT delivered"), "{}", text(&untold.stdout));
    assert!(text(&untold.stderr).contains("error[notification-failed]"), "{}", text(&untold.stderr));
    assert!(agent.stop().success());
}

/// `GET path` on 127.0.0.1:`port`: the body (`None` while nothing listens).
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A Prometheus query's one value, if it has one.
fn prometheus_value(port: u16, query: &str) -> Option<f64> {
    let encoded: String = query
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' => c.to_string(),
            other => format!("%{:02X}", other as u32),
        })
        .collect();
    let body: Value = serde_json::from_str(&http_get(port, &format!("/api/v1/query?query={encoded}"))?).ok()?;
    body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn prometheus_scrapes_the_agents_metrics_and_they_change_as_they_should() {
    if !crate::support::require(
        "prometheus and promtool (Debian's prometheus)",
        Path::new("/usr/bin/prometheus").exists(),
    ) {
        return;
    }
    let port = free_port();
    let (sandbox, root) = setup("");
    let textfile = sandbox.path("sysstate.prom");
    let config = std::fs::read_to_string(sandbox.path("config.toml")).unwrap();
    std::fs::write(
        sandbox.path("config.toml"),
        format!("{config}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\ntextfile = \"{}\"\n", textfile.display()),
    )
    .unwrap();
    let agent = Agent::start(&sandbox, &root, &[]);
    sandbox.run_code(&["backup", "--now"], 0);
    let succeeded = jobs(&sandbox, 1)[0].clone();
    // Both forms pass promtool's lint.
    let served = http_get(port, "/metrics").expect("the agent serves its metrics");
    for (what, text) in [("served", served.clone()), ("textfile", std::fs::read_to_string(&textfile).unwrap())] {
        let mut check = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let checked = check.wait_with_output().unwrap();
        assert!(checked.status.success(), "{what}: {}{}\n{text}", text_of(&checked.stdout), text_of(&checked.stderr));
    }
    assert!(served.contains("sysstate_last_backup_bytes{what=\"read\"}"), "{served}");
    // A real Prometheus scrapes it every second.
    let prometheus_port = free_port();
    let prometheus_config = sandbox.path("prometheus.yml");
    std::fs::write(
        &prometheus_config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sysstate\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"),
    )
    .unwrap();
    let mut prometheus = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", prometheus_config.display()))
        .arg(format!("--storage.tsdb.path={}", sandbox.path("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let success_at = |p: u16| prometheus_value(p, "sysstate_last_success_timestamp_seconds{kind=\"backup\"}");
    wait_for("Prometheus's first scrape", Duration::from_secs(60), || success_at(prometheus_port).is_some());
    let ended = sysstate_types::time::parse_utc(succeeded["ended"].as_str().unwrap()).unwrap() as f64 / 1e9;
    assert!((success_at(prometheus_port).unwrap() - ended).abs() < 0.01);
    assert_eq!(prometheus_value(prometheus_port, "sysstate_jobs_running"), Some(0.0));
    // A failed backup counts its code and leaves the last success where it was.
    let failed = sandbox.command(&["backup", "--now", "--component", "nosuch"]).output().unwrap();
    assert_eq!(failed.status.code(), Some(2), "{}", text(&failed.stderr));
    wait_for("the failure in Prometheus", Duration::from_secs(30), || {
        prometheus_value(prometheus_port, "sysstate_job_failures_total{code=\"component-missing\"}") == Some(1.0)
    });
    assert!((success_at(prometheus_port).unwrap() - ended).abs() < 0.01, "a failure moved the last success");
    assert!(
        prometheus_value(prometheus_port, "sysstate_last_failure_timestamp_seconds{kind=\"backup\"}").unwrap() >= ended
    );
    assert!(std::fs::read_to_string(&textfile)
        .unwrap()
        .contains("sysstate_job_failures_total{code=\"component-missing\"} 1"));
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(agent.stop().success());
}

fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_doctor_and_services_see_the_agent_its_schedules_and_its_targets() {
    let dead = free_port();
    let (sandbox, root) = setup(&format!(
        "[schedule]\nbackup = [\"02:00\"]\nprune = \"0 4 * * sun\"\n\n[notify]\nwebhook = \"http://127.0.0.1:{dead}/hook\"\n"
    ));
    let check = |report: &Value, id: &str| -> Value {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no {id}: {report:#}"))
    };
    // Schedules and no agent: nothing would back up on its own.
    let report = sandbox.json(&["doctor", "--no-validate"], 2);
    let running = check(&report, "agent.running");
    assert_eq!(running["status"], "failed", "{running:#}");
    assert!(running["resolution"].as_str().unwrap().contains("systemctl enable --now sysstate-agent"), "{running:#}");
    assert!(check(&report, "agent.schedule.backup")["found"].as_str().unwrap().contains("02:00"));
    assert!(check(&report, "agent.schedule.prune")["found"].as_str().unwrap().contains("0 4 * * sun"));
    let webhook = check(&report, "agent.notify.webhook");
    assert_eq!(
        (webhook["status"].as_str(), webhook["code"].as_str()),
        (Some("failed"), Some("notification-failed")),
        "{webhook:#}"
    );
    let services = sandbox.json(&["services"], 2);
    let agent_part = services.as_array().unwrap().iter().find(|p| p["name"] == "agent").unwrap().clone();
    assert_eq!(agent_part["healthy"], false, "{agent_part:#}");
    // With the agent: running, idle, its API and notifications named.
    let agent = Agent::start(&sandbox, &root, &[]);
    let report = sandbox.json(&["doctor", "--no-validate"], 2);
    assert_eq!(check(&report, "agent.running")["status"], "ok");
    assert_eq!(check(&report, "agent.last-success")["status"], "warning", "no backup yet");
    let services = sandbox.json(&["services"], 0);
    let part = |name: &str| services.as_array().unwrap().iter().find(|p| p["name"] == name).unwrap().clone();
    assert!(
        part("agent")["status"].as_str().unwrap().starts_with(&format!("running (pid {}", agent.child.id())),
        "{:#}",
        part("agent")
    );
    assert!(part("api")["status"].as_str().unwrap().starts_with("running on"), "{:#}", part("api"));
    assert!(part("notifications")["status"]
        .as_str()
        .unwrap()
        .contains(&format!("webhook http://127.0.0.1:{dead}/hook")));
    assert!(agent.stop().success());
}

#[test]
fn at_its_start_the_agent_recovers_a_killed_jobs_shadow_set_and_tells_that_job() {
    let (sandbox, root) = setup(
        "[[writer]]\nname = \"app\"\nkind = \"command\"\nfreeze = [\"touch\", \"@/frozen\"]\nthaw = [\"touch\", \"@/thawed\"]\nabort = [\"touch\", \"@/aborted\"]\nfreeze-timeout = \"60s\"\n",
    );
    // A command's backup killed outright in its freeze: nothing thaws the writer.
    let mut killed = sandbox
        .command(&["--root", root.to_str().unwrap(), "backup"])
        .env("SYSSTATE_FAILPOINT_COMMIT_DELAY_MS", "30000")
        .spawn()
        .unwrap();
    wait_for("the freeze", Duration::from_secs(30), || sandbox.path("frozen").exists());
    rustix::process::kill_process(rustix::process::Pid::from_child(&killed), rustix::process::Signal::Kill).unwrap();
    killed.wait().unwrap();
    assert!(!sandbox.path("thawed").exists());
    let agent = Agent::start(&sandbox, &root, &[]);
    assert!(sandbox.path("thawed").exists() && sandbox.path("aborted").exists(), "the agent left the writer frozen");
    assert!(agent.log().contains("recovered what a dead shadow set left"), "{}", agent.log());
    let job = &jobs(&sandbox, 1)[0];
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("the agent, at its start recovered"), "{job:#}");
    assert!(agent.stop().success());
}

#[test]
fn job_cancel_stops_a_commands_backup_by_its_signal() {
    let (sandbox, root) = setup(
        "[[writer]]\nname = \"app\"\nkind = \"command\"\nfreeze = [\"touch\", \"@/frozen\"]\nthaw = [\"touch\", \"@/thawed\"]\nfreeze-timeout = \"60s\"\n",
    );
    // No agent: the command's process gets SIGTERM, thaws its writer and stops.
    let backup = sandbox
        .command(&["--root", root.to_str().unwrap(), "backup"])
        .env("SYSSTATE_FAILPOINT_COMMIT_DELAY_MS", "30000")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the freeze", Duration::from_secs(30), || sandbox.path("frozen").exists());
    let id = sandbox.json(&["job"], 0)[0]["id"].as_str().unwrap().to_string();
    let said = sandbox.ok(&["job", "cancel", &id]);
    assert!(text(&said.stdout).contains("sent SIGTERM"), "{}", text(&said.stdout));
    let ended = backup.wait_with_output().unwrap();
    assert_eq!(ended.status.code(), Some(2), "{}", text(&ended.stderr));
    assert!(sandbox.path("thawed").exists());
    assert_eq!(sandbox.json(&["job", "--previous", "1"], 0)[0]["state"], "cancelled");
    // An ended job, or none: said so.
    let again = sandbox.run_code(&["job", "cancel", &id], 2);
    assert!(text(&again.stderr).contains("is not running"), "{}", text(&again.stderr));
    sandbox.run_code(&["job", "cancel", "no-such-job"], 2);
}

#[test]
fn an_hourly_digest_gathers_the_notices_into_one_message() {
    let webhook = Webhook::start();
    let writer = "[[writer]]\nname = \"slowdb\"\nkind = \"command\"\nfreeze = [\"sleep\", \"2\"]\nthaw = [\"true\"]\nfreeze-timeout = \"200ms\"\n";
    let (sandbox, root) = setup(writer);
    let config = std::fs::read_to_string(sandbox.path("config.toml")).unwrap();
    std::fs::write(
        sandbox.path("config.toml"),
        format!("{config}\n[notify]\nwebhook = \"http://127.0.0.1:{}/hook\"\ndigest = \"hourly\"\n", webhook.port),
    )
    .unwrap();
    // The hour is 8 s here.
    let agent = Agent::start(&sandbox, &root, &[("SYSSTATE_FAILPOINT_DIGEST_EVERY_S", "8")]);
    sandbox.run_code(&["backup", "--now"], 2);
    sandbox.run_code(&["backup", "--now"], 2);
    assert!(webhook.bodies().is_empty(), "a notice went before the digest");
    wait_for("the digest", Duration::from_secs(40), || !webhook.bodies().is_empty());
    std::thread::sleep(Duration::from_secs(2));
    let bodies = webhook.bodies();
    assert_eq!(bodies.len(), 1, "{bodies:#?}");
    let digest: Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(digest["notices"].as_array().unwrap().len(), 2, "{digest:#}");
    assert_eq!(digest["level"], "critical");
    assert!(agent.stop().success());
}

#[test]
fn mail_goes_through_the_local_sendmail_when_no_smtp_server_is_named() {
    // msmtp is the local sendmail here: it takes sendmail's arguments and relays to aiosmtpd.
    if !crate::support::require("msmtp (Debian's msmtp)", Path::new("/usr/bin/msmtp").exists()) {
        return;
    }
    let sandbox_dir = tempfile::tempdir().unwrap();
    let Some(smtp) = Smtp::start(sandbox_dir.path()) else { return };
    let (sandbox, _root) = setup("[notify]\nmail = { to = \"root@localhost\", sendmail = \"/usr/bin/msmtp\" }\n");
    let home = sandbox.path("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(
        home.join(".msmtprc"),
        format!(
            "defaults\nauth off\ntls off\naccount default\nhost 127.0.0.1\nport {}\nfrom sysstate@localhost\n",
            smtp.port
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(home.join(".msmtprc"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let sent = sandbox.command(&["notify", "test"]).env("HOME", &home).output().unwrap();
    assert_eq!(sent.status.code(), Some(0), "{}{}", text(&sent.stdout), text(&sent.stderr));
    assert!(
        text(&sent.stdout).contains("mail to root@localhost via `/usr/bin/msmtp`: delivered"),
        "{}",
        text(&sent.stdout)
    );
    wait_for("the mail", Duration::from_secs(10), || smtp.messages().len() == 1);
    assert!(smtp.messages()[0].contains("notifications work"), "{}", smtp.messages()[0]);
    let report = sandbox.json(&["doctor", "--no-validate"], 0);
    let check = report["checks"].as_array().unwrap().iter().find(|c| c["id"] == "agent.notify.mail").unwrap().clone();
    assert_eq!(check["status"], "ok", "{check:#}");
    // A sendmail that is not there: said, with the fix.
    std::fs::write(
        sandbox.path("config.toml"),
        "[notify]\nmail = { to = \"root\", sendmail = \"/usr/sbin/no-such-sendmail\" }\n",
    )
    .unwrap();
    let failed = sandbox.run_code(&["notify", "test"], 2);
    assert!(text(&failed.stdout).contains("NOT delivered"), "{}", text(&failed.stdout));
}

#[test]
fn a_job_with_warnings_is_told_as_a_warning_naming_each() {
    let webhook = Webhook::start();
    let (sandbox, root) =
        setup(&format!("[notify]\non = [\"warning\"]\nwebhook = \"http://127.0.0.1:{}/hook\"\n", webhook.port));
    // A socket cannot be backed up: the backup stores the rest and warns.
    let _socket = std::os::unix::net::UnixListener::bind(root.join("data/socket")).unwrap();
    let agent = Agent::start(&sandbox, &root, &[]);
    let output = sandbox.run_code(&["backup", "--now"], 1);
    assert!(text(&output.stdout).contains("succeeded-with-warnings"), "{}", text(&output.stdout));
    wait_for("the notice", Duration::from_secs(30), || !webhook.bodies().is_empty());
    let notice: Value = serde_json::from_str(&webhook.bodies()[0]).unwrap();
    assert_eq!(notice["level"], "warning", "{notice:#}");
    assert_eq!(notice["job"]["state"], "succeeded-with-warnings");
    let warnings = notice["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| w["code"] == "entry-skipped" && w["message"].as_str().unwrap().contains("socket")),
        "{notice:#}"
    );
    assert!(agent.stop().success());
}

/// Where two versions differ, entry for entry (see `version_entries`), at most eight, and how
/// many entries the first holds.
fn differences(sandbox: &Sandbox, first: &Value, second: &Value) -> (Vec<String>, usize) {
    let id = |v: &Value| v["id"].as_str().unwrap().to_string();
    let (a, b) = (version_entries(sandbox, &id(first)), version_entries(sandbox, &id(second)));
    let differ = a
        .iter()
        .filter(|(path, node)| b.get(*path) != Some(node))
        .map(|(path, node)| format!("{path}:\n  first:  {node}\n  second: {:?}", b.get(path)))
        .chain(b.keys().filter(|p| !a.contains_key(*p)).map(|p| format!("{p}: only in the second")))
        .take(8)
        .collect();
    (differ, a.len())
}

/// A backup by the agent (`backup --now`), which must succeed.
fn backup_now(sandbox: &Sandbox) {
    let output = sandbox.command(&["backup", "--now"]).output().unwrap();
    if output.status.code() != Some(0) {
        let job = sandbox.command(&["job", "--previous", "1"]).output().unwrap();
        let log = text(&job.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix("log: "))
            .map(|p| std::fs::read_to_string(p.trim()).unwrap_or_default());
        panic!("{}\n{}\n{}", text(&output.stdout), text(&job.stdout), log.unwrap_or_default());
    }
    assert!(text(&output.stdout).contains("succeeded"), "{}", text(&output.stdout));
}

/// A full walk of the same moment as the agent's last backup: a command with its own state
/// folder (its own base copy), into the same repository.
fn walk_now(sandbox: &Sandbox, root: &Path) {
    let output = sandbox
        .command(&["backup", "--root", root.to_str().unwrap()])
        .env("SYSSTATE_STATE_DIR", sandbox.path("state-walk"))
        .env("SYSSTATE_RUNTIME_DIR", sandbox.path("run-walk"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
}

/// The versions of this sandbox's repository, oldest first.
fn versions(sandbox: &Sandbox) -> Vec<Value> {
    sandbox.json(&["versions"], 0).as_array().unwrap().clone()
}

#[test]
fn the_agent_reads_what_its_journal_saw_change_and_makes_the_version_a_full_walk_makes() {
    if !is_root() {
        return;
    }
    let (sandbox, root) = setup("");
    make_tree(&root.join("data/more"), 300, 11);
    std::fs::create_dir_all(root.join("data/quiet/deep/er")).unwrap();
    std::fs::write(root.join("data/quiet/deep/er/file"), "untouched").unwrap();
    // A file with a second name in a folder that will move away.
    std::fs::write(root.join("data/quiet/twin"), "two names").unwrap();
    std::fs::create_dir(root.join("data/more/hold")).unwrap();
    std::fs::hard_link(root.join("data/quiet/twin"), root.join("data/more/hold/twin")).unwrap();
    // What the backups find settles first (copies of entries changed in the last two seconds
    // are not trusted).
    std::thread::sleep(Duration::from_millis(2200));
    let agent = Agent::start(&sandbox, &root, &[]);
    let backup_now = || backup_now(&sandbox);
    backup_now();
    backup_now();
    // Changes of every kind, then a backup by the agent and one by a command of the same moment.
    std::fs::write(root.join("data/more/d1/e1/new"), "new").unwrap();
    std::fs::remove_dir_all(root.join("data/more/d2")).unwrap();
    std::fs::rename(root.join("data/more/d3"), root.join("data/more/d4/moved")).unwrap();
    std::fs::set_permissions(root.join("data/more/d5"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::hard_link(root.join("data/quiet/deep/er/file"), root.join("data/more/d1/link")).unwrap();
    // The second name renamed out of its folder, the folder moved away, then the name renamed
    // over: the file in the quiet folder lost a link, with no event there (the random test
    // found a version that kept its old link count and ctime).
    std::fs::rename(root.join("data/more/hold/twin"), root.join("data/more/d1/twin")).unwrap();
    std::fs::rename(root.join("data/more/hold"), root.join("data/more/d4/hold")).unwrap();
    std::fs::write(root.join("data/more/d1/over"), "over").unwrap();
    std::fs::rename(root.join("data/more/d1/over"), root.join("data/more/d1/twin")).unwrap();
    // A second name made in one folder, then renamed over in another: the file in the quiet
    // folder has one name again, its ctime moved, and neither name's folder is its own (the
    // random test found it; the journal reports the file itself).
    std::fs::write(root.join("data/quiet/deep/solo"), "one name").unwrap();
    std::thread::sleep(Duration::from_millis(2200));
    backup_now();
    std::fs::hard_link(root.join("data/quiet/deep/solo"), root.join("data/more/d1/solo")).unwrap();
    std::fs::rename(root.join("data/more/d1/solo"), root.join("data/more/d5/solo")).unwrap();
    std::fs::write(root.join("data/more/d5/replace"), "replace").unwrap();
    std::fs::rename(root.join("data/more/d5/replace"), root.join("data/more/d5/solo")).unwrap();
    backup_now();
    drop(agent);
    sandbox.ok(&["backup", "--root", root.to_str().unwrap()]);
    let listed = versions(&sandbox);
    let [first, second, third, fourth, by_command] = &listed[..] else { panic!("five versions: {listed:#?}") };
    let walk = |v: &Value| v["shadow"]["walk"].clone();
    assert_eq!(walk(first)["read"], "walk", "{first:#}");
    assert_eq!(walk(second)["read"], "journal", "the second backup walked: {:#}", walk(second));
    assert_eq!(walk(second)["folders-named"], 0, "nothing changed: {:#}", walk(second));
    assert_eq!(walk(third)["read"], "journal", "{:#}", walk(third));
    assert!(walk(third)["folders-named"].as_u64().unwrap() >= 4, "{:#}", walk(third));
    // The folders of the two transient names, and the quiet folder of the file relinked.
    assert_eq!(walk(fourth)["folders-named"], 3, "{:#}", walk(fourth));
    assert_eq!(walk(by_command)["read"], "walk");
    assert!(walk(by_command)["because"].as_str().unwrap().contains("agent keeps one"), "{:#}", walk(by_command));
    for version in [second, third, fourth] {
        let copy = &version["shadow"]["copies"][0];
        assert_eq!(copy["read"], "journal", "{copy:#}");
    }
    // The journaled version is the version a full walk of the same moment makes: entry for
    // entry the same identities, times (but a folder's access time, which a walk's own
    // listing moves), metadata and contents; and the same figures.
    let (differ, entries) = differences(&sandbox, fourth, by_command);
    assert!(differ.is_empty(), "the journaled version differs from a full walk's:\n{}", differ.join("\n"));
    assert!(entries > 300, "{entries} entries");
    for figure in ["files", "dirs", "others", "bytes-total"] {
        assert_eq!(fourth["stats"][figure], by_command["stats"][figure], "{figure}");
    }
    assert!(fourth["stats"]["files"].as_u64().unwrap() > 250, "{:#}", fourth["stats"]);
}

/// A data volume on btrfs, copied by snapshot, beside an ext4 root copied with the journal: the
/// agent reads the volume whole and the rest by its journal (the volume no longer makes it walk
/// everything), and its version is the one a full walk of the same moment makes.
#[test]
fn with_a_snapshotted_volume_the_agent_reads_the_rest_by_its_journal() {
    if !crate::support::require(
        "root and loop devices (mkfs.btrfs)",
        is_root() && Path::new("/dev/loop-control").exists(),
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    let (root, _fs, _bind) = crate::shadow::root_with_volume(&sandbox, "btrfs", 95);
    make_tree(&root.join("data"), 200, 96);
    make_tree(&root.join("vol/data"), 100, 97);
    let volume = root.join("vol");
    std::fs::write(
        sandbox.path("config.toml"),
        format!(
            "[backup]\ncomponents = [\"data\", \"vol\"]\n\n[[component]]\nname = \"data\"\npaths = [\"/data\"]\n\n[[component]]\nname = \"vol\"\npaths = [\"/vol/data\"]\n\n[[shadow.storage]]\nfor = \"{}\"\non = \"{}\"\nmax-size = \"50%\"\n",
            volume.display(),
            volume.join("shadow").display()
        ),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(2200));
    let agent = Agent::start(&sandbox, &root, &[]);
    backup_now(&sandbox);
    backup_now(&sandbox);
    // Changes on both volumes.
    std::fs::write(root.join("data/d1/e1/new"), "new on the root").unwrap();
    std::fs::remove_dir_all(root.join("data/d2")).unwrap();
    std::fs::write(root.join("vol/data/d1/e1/new"), "new on the volume").unwrap();
    std::fs::remove_dir_all(root.join("vol/data/d0")).unwrap();
    backup_now(&sandbox);
    drop(agent);
    sandbox.ok(&["backup", "--root", root.to_str().unwrap()]);
    let listed = versions(&sandbox);
    let [_, second, third, by_command] = &listed[..] else { panic!("four versions: {listed:#?}") };
    for version in [second, third] {
        let walk = &version["shadow"]["walk"];
        assert_eq!(walk["read"], "journal", "the snapshotted volume made the agent walk: {walk:#}");
        assert_eq!(walk["read-whole"], serde_json::json!(["/vol/data"]), "{walk:#}");
        let copies = version["shadow"]["copies"].as_array().unwrap();
        let of = |path: &Path| copies.iter().find(|c| c["for"] == path.display().to_string()).unwrap();
        assert_eq!((of(&volume)["provider"].as_str(), of(&volume)["read"].as_str()), (Some("btrfs"), Some("snapshot")));
        assert_eq!(copies[0]["read"], "journal", "{:#}", copies[0]);
    }
    assert_eq!(second["shadow"]["walk"]["folders-named"], 0, "{:#}", second["shadow"]["walk"]);
    // Only what changed is read again; the volume's folders are all looked at.
    assert_eq!(third["stats"]["files-read"], 2, "{:#}", third["stats"]);
    let (differ, entries) = differences(&sandbox, third, by_command);
    assert!(differ.is_empty(), "the agent's version differs from a full walk's:\n{}", differ.join("\n"));
    assert!(entries > 250, "{entries} entries");
    for figure in ["files", "dirs", "others", "bytes-total"] {
        assert_eq!(third["stats"][figure], by_command["stats"][figure], "{figure}");
    }
}

/// A backup that reads the changed files live leaves the base copy holding the older files:
/// the next backup that cannot read live (its parent version gone) compares every entry of the
/// copy, not only what the journal named since, and makes the version a full walk makes.
#[test]
fn after_files_read_live_a_backup_that_reads_the_copy_compares_all_of_it() {
    if !is_root() {
        return;
    }
    let (sandbox, root) = setup("");
    std::thread::sleep(Duration::from_millis(2200));
    let agent = Agent::start(&sandbox, &root, &[]);
    backup_now(&sandbox);
    backup_now(&sandbox);
    std::fs::write(root.join("data/d1/e1/f1.bin"), "read live, not copied").unwrap();
    backup_now(&sandbox);
    let listed = versions(&sandbox);
    let live = listed.last().unwrap();
    assert_eq!(live["shadow"]["walk"]["read-live"], true, "{:#}", live["shadow"]["walk"]);
    // Its parent gone, the next backup reads the copy alone.
    sandbox.json(&["forget", "--version", live["id"].as_str().unwrap()], 0);
    backup_now(&sandbox);
    drop(agent);
    sandbox.ok(&["backup", "--root", root.to_str().unwrap()]);
    let listed = versions(&sandbox);
    let [.., by_agent, by_command] = &listed[..] else { panic!("{listed:#?}") };
    let (differ, entries) = differences(&sandbox, by_agent, by_command);
    assert!(differ.is_empty(), "the version differs from a full walk's:\n{}", differ.join("\n"));
    assert!(entries > 40, "{entries} entries");
    let walk = &by_agent["shadow"]["walk"];
    assert_eq!(walk["read"], "walk", "{walk:#}");
    assert!(walk["because"].as_str().unwrap().contains("no parent version"), "{walk:#}");
}

/// A random change under `dir`: files written, removed, renamed over others, linked, chmod,
/// extended attributes, folders made, moved and removed.
fn random_change(dir: &Path, rng: &mut u64, serial: &mut u32) {
    let mut next = || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    let mut all: Vec<PathBuf> = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
            all.push(entry.path());
        }
    }
    all.sort();
    let folders: Vec<PathBuf> =
        std::iter::once(dir.to_path_buf()).chain(all.iter().filter(|p| p.is_dir()).cloned()).collect();
    let files: Vec<&PathBuf> = all.iter().filter(|p| p.is_file()).collect();
    let folder = folders[(next() as usize) % folders.len()].clone();
    let file = files.get((next() as usize) % files.len().max(1)).map(|p| (*p).clone());
    *serial += 1;
    let _ = match next() % 10 {
        0 | 1 => {
            std::fs::write(folder.join(format!("new{serial}")), vec![(next() % 250) as u8; (next() % 9000) as usize])
        }
        2 => file.map_or(Ok(()), |f| std::fs::write(f, format!("rewritten {serial}"))),
        3 => file.map_or(Ok(()), std::fs::remove_file),
        4 => match (file, files.first()) {
            (Some(a), Some(b)) if a != **b => std::fs::rename(a, b), // renamed over another
            _ => Ok(()),
        },
        5 => file.map_or(Ok(()), |f| std::fs::hard_link(f, folder.join(format!("link{serial}")))),
        6 => file.map_or(Ok(()), |f| {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600 | (next() % 0o100) as u32))
        }),
        7 => std::fs::create_dir(folder.join(format!("dir{serial}"))),
        // A folder renamed over an empty one: another directory, with entries the journal
        // never named, where the parent version holds one of the same name.
        8 => match folders.iter().find(|f| std::fs::read_dir(f).is_ok_and(|mut d| d.next().is_none())) {
            Some(empty) if folder != dir && !empty.starts_with(&folder) && folder != *empty => {
                std::fs::rename(&folder, empty)
            }
            _ => Ok(()),
        },
        _ => match folders.get((next() as usize) % folders.len()) {
            // A folder moved into another (not into itself).
            Some(other) if folder != dir && !other.starts_with(&folder) => {
                std::fs::rename(&folder, other.join(format!("moved{serial}")))
            }
            _ => Ok(()),
        },
    };
}

#[test]
fn the_agents_journal_holds_through_random_changes_restarts_and_doubt() {
    if !is_root() {
        return;
    }
    // A writer that, when armed, waits in the freeze for the test to change the tree: after the
    // agent read the changed files live, before the commit's take of the journal.
    let (sandbox, root) = setup(
        "[[writer]]\nname = \"changer\"\nkind = \"command\"\nfreeze = [\"sh\", \"-c\", \"if [ -e @/armed ]; then touch @/freezing; while [ ! -e @/changed ]; do sleep 0.01; done; rm -f @/armed @/freezing @/changed; fi\"]\nfreeze-timeout = \"120s\"\n",
    );
    make_tree(&root.join("data/more"), 200, 23);
    std::thread::sleep(Duration::from_millis(2200));
    let seed = std::env::var("SYSSTATE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(now_ns() as u64 | 1);
    eprintln!("seed {seed} (SYSSTATE_TEST_SEED={seed} replays the changes)");
    let (mut rng, mut serial) = (seed, 0);
    let walk_now = || walk_now(&sandbox, &root);
    let mut agent = Some(Agent::start(&sandbox, &root, &[]));
    let mut journaled = 0;
    for round in 0..8 {
        match round {
            // A restart: the new journal knows nothing of what changed before it.
            4 => {
                drop(agent.take());
                agent = Some(Agent::start(&sandbox, &root, &[]));
            }
            // A journal that may remember only three folders: in doubt, it walks.
            6 => {
                drop(agent.take());
                agent = Some(Agent::start(&sandbox, &root, &[("SYSSTATE_FAILPOINT_JOURNAL_MAX_DIRS", "3")]));
            }
            _ => {}
        }
        for _ in 0..60 {
            random_change(&root.join("data"), &mut rng, &mut serial);
        }
        // Twenty more in the freeze.
        std::fs::write(sandbox.path("armed"), "").unwrap();
        std::thread::scope(|scope| {
            let backup = scope.spawn(|| backup_now(&sandbox));
            while !sandbox.path("freezing").exists() {
                assert!(!backup.is_finished(), "round {round}: the backup ended without freezing the writer");
                std::thread::sleep(Duration::from_millis(10));
            }
            for _ in 0..20 {
                random_change(&root.join("data"), &mut rng, &mut serial);
            }
            std::fs::write(sandbox.path("changed"), "").unwrap();
            backup.join().unwrap();
        });
        walk_now();
        let listed = versions(&sandbox);
        let [.., by_agent, by_walk] = &listed[..] else { panic!("{listed:#?}") };
        let read = by_agent["shadow"]["walk"]["read"].as_str().unwrap().to_string();
        match round {
            0 | 4 => assert_eq!(read, "walk", "round {round}: {:#}", by_agent["shadow"]["walk"]),
            6 | 7 => assert_eq!(read, "walk", "round {round}: {:#}", by_agent["shadow"]),
            _ => {
                assert_eq!(read, "journal", "round {round}: {:#}", by_agent["shadow"]);
                // The changed files were read live, and what changed in the freeze again.
                let walk = &by_agent["shadow"]["walk"];
                assert_eq!(walk["read-live"], true, "round {round}: {walk:#}");
                assert!(walk["folders-named-in-freeze"].as_u64().unwrap() > 1, "round {round}: {walk:#}");
            }
        }
        journaled += usize::from(read == "journal");
        let (differ, _) = differences(&sandbox, by_agent, by_walk);
        assert!(
            differ.is_empty(),
            "round {round} (seed {seed}): the agent's version differs:\n{}\n{:#}",
            differ.join("\n"),
            by_agent["shadow"]["walk"]
        );
        for figure in ["files", "dirs", "others", "bytes-total"] {
            assert_eq!(by_agent["stats"][figure], by_walk["stats"][figure], "round {round}: {figure}");
        }
    }
    assert_eq!(journaled, 4, "rounds 1-3 and 5 read by the journal");
}

/// The base copy's records damaged (a disk error, a hand that edited them, a write cut short):
/// where the journal stood (`journal.json`) and the identities the copy was made from
/// (`origins.json`, and `origins.log`, what changed since, by then). The next
/// backup is not misled: it walks (a base without its origins is made anew), says why, and makes
/// the version a full walk makes; the one after reads by the journal again.
#[test]
fn a_damaged_record_of_the_base_copy_makes_the_agent_walk_not_trust_it() {
    if !is_root() {
        return;
    }
    let (sandbox, root) = setup("");
    make_tree(&root.join("data/more"), 100, 29);
    std::thread::sleep(Duration::from_millis(2200));
    let walk_now = || walk_now(&sandbox, &root);
    let backup_now = || backup_now(&sandbox);
    let agent = Agent::start(&sandbox, &root, &[]);
    backup_now();
    backup_now();
    let base = sandbox.path("state/shadow/base");
    for (n, damaged) in ["journal.json", "origins.json", "origins.log"].into_iter().enumerate() {
        assert!(base.join(damaged).exists(), "no {damaged} beside the base copy");
        // Cut short inside a JSON value, where no record ends.
        let mut text = std::fs::read(base.join(damaged)).unwrap();
        text.truncate(text.len() / 2);
        while text.last().is_some_and(|b| b"\n]}".contains(b)) {
            text.pop();
        }
        std::fs::write(base.join(damaged), text).unwrap();
        std::fs::write(root.join(format!("data/more/changed-{n}")), "changed").unwrap();
        std::fs::remove_file(root.join("data/more/d0/e0/f0.bin")).ok();
        std::fs::write(root.join("data/more/d0/e0/f0.bin"), format!("rewritten {n}")).unwrap();
        backup_now();
        walk_now();
        let listed = versions(&sandbox);
        let [.., by_agent, by_walk] = &listed[..] else { panic!("{listed:#?}") };
        assert_eq!(by_agent["shadow"]["walk"]["read"], "walk", "{damaged}: {:#}", by_agent["shadow"]);
        let because = by_agent["shadow"]["walk"]["because"].as_str().unwrap();
        assert!(because.contains(damaged), "{damaged}: the version does not say why it walked: {because}");
        let (differ, _) = differences(&sandbox, by_agent, by_walk);
        assert!(differ.is_empty(), "{damaged}: the agent's version differs:\n{}", differ.join("\n"));
        // The base is whole again: the next backup reads by the journal.
        std::fs::write(root.join(format!("data/more/after-{n}")), "after").unwrap();
        backup_now();
        let listed = versions(&sandbox);
        let last = listed.last().unwrap();
        assert_eq!(last["shadow"]["walk"]["read"], "journal", "after {damaged}: {:#}", last["shadow"]);
    }
    drop(agent);
}

/// The selection changed between two of the agent's backups (a file excluded in a folder the
/// journal names by another entry): the next backup walks, says why, and leaves the file out —
/// an entry of a named folder is taken from the parent only while the selection is the parent's.
#[test]
fn a_changed_selection_makes_the_agent_walk_and_leave_out_what_it_now_excludes() {
    if !is_root() {
        return;
    }
    let (sandbox, root) = setup("");
    let excluded = root.join("data/d1/e1/f1.bin");
    assert!(excluded.exists(), "the tree has no {}", excluded.display());
    std::thread::sleep(Duration::from_millis(2200));
    let agent = Agent::start(&sandbox, &root, &[]);
    backup_now(&sandbox);
    backup_now(&sandbox);
    let config = std::fs::read_to_string(sandbox.path("config.toml")).unwrap();
    std::fs::write(sandbox.path("config.toml"), format!("{config}exclude = [\"/data/d1/e1/f1.bin\"]\n")).unwrap();
    rustix::process::kill_process(rustix::process::Pid::from_child(&agent.child), rustix::process::Signal::Hup)
        .unwrap();
    wait_for("the agent's reload", Duration::from_secs(20), || agent.log().contains("configuration reloaded"));
    // The folder of the excluded file is named by the journal, by another entry.
    std::fs::write(root.join("data/d1/e1/new"), "new").unwrap();
    backup_now(&sandbox);
    walk_now(&sandbox, &root);
    std::fs::write(root.join("data/d1/e1/after"), "after").unwrap();
    backup_now(&sandbox);
    drop(agent);
    let listed = versions(&sandbox);
    let [_, second, changed, by_walk, after] = &listed[..] else { panic!("five versions: {listed:#?}") };
    let walk = |v: &Value| v["shadow"]["walk"].clone();
    assert_eq!(walk(second)["read"], "journal", "{:#}", walk(second));
    assert_eq!(walk(changed)["read"], "walk", "the changed selection was read by the journal: {:#}", walk(changed));
    let because = walk(changed)["because"].as_str().unwrap().to_string();
    assert!(because.contains("selection"), "the version does not say the selection changed: {because}");
    let id = |v: &Value| v["id"].as_str().unwrap().to_string();
    let entries = version_entries(&sandbox, &id(changed));
    assert!(!entries.keys().any(|p| p.ends_with("d1/e1/f1.bin")), "the excluded file is in the version");
    assert!(entries.keys().any(|p| p.ends_with("d1/e1/new")), "the new file is not in the version");
    let (differ, _) = differences(&sandbox, changed, by_walk);
    assert!(differ.is_empty(), "the agent's version differs from a full walk's:\n{}", differ.join("\n"));
    // With the new selection recorded, the next backup reads by the journal again.
    assert_eq!(walk(after)["read"], "journal", "{:#}", walk(after));
    let entries = version_entries(&sandbox, &id(after));
    assert!(!entries.keys().any(|p| p.ends_with("d1/e1/f1.bin")), "the excluded file came back");
}
