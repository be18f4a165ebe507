//! The agent's life: one per machine (a lock in the runtime folder), the orphaned shadow set of
//! a killed job recovered at start, a scheduler thread that queues each schedule's runs (one
//! catch-up for a time missed while the agent was down), a worker that runs the queue one job at
//! a time, the API, and signals: SIGHUP reloads the config, SIGTERM and SIGINT cancel the running
//! job cleanly (writers thawed, nothing half-stored) and stop.

use crate::work::{Request, Work};
use chrono::{DateTime, Local};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use sysstate_engine::config::Config;
use sysstate_engine::jobs::{JobKind, JobStore, JobTrigger, Source};
use sysstate_engine::schedule::Schedule;
use sysstate_engine::{paths, EngineError, ErrorCode, Result};
use sysstate_shadow::ThawTrigger;
use sysstate_types::Level;

/// How the agent was started (the binary's global options).
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The config file.
    pub config_file: PathBuf,
    /// True when it was named (`--config`): then it must exist.
    pub config_required: bool,
    /// The root (`/`).
    pub root: PathBuf,
    /// `--target`, over the config's.
    pub target: Option<String>,
    /// `--passphrase-file`.
    pub passphrase_file: Option<PathBuf>,
}

/// What the agent knows, shared by its threads and its API.
#[derive(Debug)]
pub struct Shared {
    /// How it was started.
    pub options: AgentOptions,
    /// The job store.
    pub store: Arc<JobStore>,
    state: Mutex<State>,
    wake: Condvar,
    counters: Mutex<crate::metrics::Counters>,
    /// When it started (ns).
    pub started_ns: i64,
    /// The change journal its backups read, kept from start to stop.
    pub journal: Option<sysstate_engine::ops::KeptJournal>,
}

/// A schedule and its next time.
#[derive(Debug)]
pub struct Slot {
    /// The schedule.
    pub schedule: Schedule,
    /// Its next time.
    pub next: Option<DateTime<Local>>,
    /// When that run is queued: the next time plus the random delay.
    pub due: Option<DateTime<Local>>,
}

/// The job running now.
#[derive(Debug)]
pub struct Running {
    /// The request it runs.
    pub request: Request,
    /// Its job id, once its row exists.
    pub job: Option<String>,
    /// Fired to cancel it.
    pub cancel: ThawTrigger,
}

/// The agent's mutable state.
#[derive(Debug)]
pub struct State {
    /// The config (replaced on SIGHUP).
    pub config: Arc<Config>,
    /// The schedules.
    pub slots: Vec<Slot>,
    /// Requests waiting, oldest first.
    pub queue: VecDeque<Request>,
    /// The job running.
    pub running: Option<Running>,
    /// The signal that stops the agent.
    pub stopping: Option<i32>,
    reload: bool,
    next_request: u64,
    /// Requests that started, with their jobs (the newest 256).
    pub started: VecDeque<(u64, String)>,
    /// Why the last reload was refused, if it was.
    pub config_error: Option<String>,
    /// Notices waiting for the hourly digest, and when the first came.
    pending: Vec<crate::notify::Notice>,
    pending_since: Option<std::time::Instant>,
    /// The last success (ns; the agent's start when none) the dead-man alert was sent for.
    dead_man_sent_for: Option<i64>,
}

/// Why a request was not queued.
#[derive(Debug)]
pub struct Busy {
    /// What holds the kind: `job …` or `a request queued`.
    pub holder: String,
}

impl Shared {
    /// What the agent counts for its metrics, locked.
    pub fn counters(&self) -> MutexGuard<'_, crate::metrics::Counters> {
        self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state, locked.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `work`, unless a run of its kind is queued or running (a run never starts while
    /// another of the same kind runs). Returns the request's id and its place in the queue (0:
    /// next).
    pub fn enqueue(&self, work: Work, trigger: JobTrigger, by: String) -> std::result::Result<(u64, usize), Busy> {
        let mut state = self.lock();
        if let Some(running) = state.running.as_ref().filter(|r| r.request.work.kind() == work.kind()) {
            let holder =
                running.job.as_ref().map_or_else(|| "a job starting now".to_string(), |id| format!("job {id}"));
            return Err(Busy { holder });
        }
        if let Some(queued) = state.queue.iter().find(|r| r.work.kind() == work.kind()) {
            return Err(Busy { holder: format!("request {} queued by {}", queued.id, queued.by) });
        }
        state.next_request += 1;
        let id = state.next_request;
        state.queue.push_back(Request { id, work, trigger, by });
        let place = state.queue.len() - 1 + usize::from(state.running.is_some());
        self.wake.notify_all();
        Ok((id, place))
    }

    /// Cancels the running job `job` on behalf of `by`: true when it was running here. Only a
    /// backup stops midway (its writers thawed, nothing stored); see [`Work::cancellable`].
    pub fn cancel(&self, job: &str, by: &str) -> std::result::Result<(), CancelRefused> {
        let state = self.lock();
        let Some(running) = state.running.as_ref().filter(|r| r.job.as_deref() == Some(job)) else {
            return Err(CancelRefused::NotRunningHere);
        };
        if !running.request.work.cancellable() {
            return Err(CancelRefused::NotCancellable(running.request.work.kind()));
        }
        let _ = self.store.event(
            Some(job),
            Level::Info,
            Source::Engine,
            ErrorCode::Cancelled,
            &format!("cancel asked by {by}: the writers are thawed and nothing of this job is stored"),
            None,
        );
        running.cancel.fire(libc::SIGTERM);
        Ok(())
    }

    /// Stops the agent (a signal): the queue is dropped and the running job cancelled.
    fn stop(&self, signal: i32) {
        let mut state = self.lock();
        state.stopping = Some(signal);
        state.queue.clear();
        if let Some(running) = &state.running {
            if running.request.work.cancellable() {
                running.cancel.fire(signal);
            }
        }
        self.wake.notify_all();
    }

    /// Asks the scheduler to read the config again.
    fn reload(&self) {
        self.lock().reload = true;
        self.wake.notify_all();
    }
}

/// Why a cancel was refused.
#[derive(Debug)]
pub enum CancelRefused {
    /// No such job runs in this agent (ended, unknown, or a command's).
    NotRunningHere,
    /// A job of this kind runs to its end.
    NotCancellable(JobKind),
}

/// A line of the agent's own log (journald keeps it under systemd, see [`crate::systemd::log`]).
pub(crate) fn say(line: impl AsRef<str>) {
    crate::systemd::log(6, line.as_ref(), &[]);
}

/// The agent's lock: `<runtime>/agent.lock`, held with `flock` for the agent's life, holding its
/// process id and start time for the next one to name.
#[derive(Debug)]
struct AgentLock {
    _file: std::fs::File,
}

impl AgentLock {
    fn acquire(runtime: &Path) -> Result<AgentLock> {
        use std::io::{Read, Seek, Write};
        let path = runtime.join("agent.lock");
        let fail = |error: std::io::Error| {
            EngineError::new(
                ErrorCode::StateDirPermission,
                format!("cannot open the agent's lock `{}`: {error}", path.display()),
            )
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(fail)?;
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(EngineError::new(
                ErrorCode::AgentRunning,
                format!(
                    "another agent runs on this machine: {} (it holds `{}`)",
                    holder.trim().trim_end_matches('.'),
                    path.display()
                ),
            ));
        }
        let holder = format!(
            "process {} (`sysstate agent`), started {}",
            std::process::id(),
            sysstate_types::time::format_utc(sysstate_repo::lock::now_ns())
        );
        file.set_len(0).and_then(|_| file.rewind()).and_then(|_| file.write_all(holder.as_bytes())).map_err(fail)?;
        Ok(AgentLock { _file: file })
    }
}

/// Loads the config as the agent was told to.
fn load_config(options: &AgentOptions) -> Result<Config> {
    Config::load(&options.config_file, options.config_required)
}

/// The slots of `config`'s schedules, each with its next time after `now`.
fn slots(config: &Config, now: &DateTime<Local>) -> Result<Vec<Slot>> {
    let schedules = config
        .schedule
        .schedules()
        .map_err(|(key, detail)| EngineError::new(ErrorCode::InvalidInput, format!("`{key}`: {detail}")))?;
    let delay = config.schedule.random_delay().unwrap_or_default();
    Ok(schedules
        .into_iter()
        .map(|schedule| {
            let next = schedule.next_after(now);
            Slot { due: next.map(|n| n + random_delay(delay)), schedule, next }
        })
        .collect())
}

/// A random time up to `bound`.
fn random_delay(bound: Duration) -> chrono::TimeDelta {
    if bound.is_zero() {
        return chrono::TimeDelta::zero();
    }
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).expect("the kernel's random source is available");
    let millis = u64::from_le_bytes(bytes) % (bound.as_millis().max(1) as u64);
    chrono::TimeDelta::milliseconds(millis as i64)
}

fn nanos(time: &DateTime<Local>) -> i64 {
    time.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// Runs the agent in the foreground until SIGTERM or SIGINT.
pub fn run(options: AgentOptions) -> Result<()> {
    let config = load_config(&options)?;
    let now = Local::now();
    let slots = slots(&config, &now)?;
    let runtime = paths::runtime_dir();
    paths::create_private_dir(&runtime).map_err(|error| {
        EngineError::new(
            ErrorCode::StateDirPermission,
            format!("cannot create the runtime folder `{}`: {error}", runtime.display()),
        )
    })?;
    let _lock = AgentLock::acquire(&runtime)?;
    let state_dir = paths::state_dir();
    paths::require_private(&state_dir)?;
    let store = Arc::new(
        JobStore::open(&state_dir)?.with_retention(config.job_retention()?).with_undo_max(config.undo_max_bytes()?),
    );
    // A job that died holding the shadow-set lock left writers frozen or copies behind: put
    // them right before anything else runs, and tell that job's record.
    match sysstate_engine::ops::recover_shadow_set(&config, &options.root) {
        Ok(Some((holder, recovery))) => {
            say(format!("recovered what a dead shadow set left: {recovery}"));
            if let Some(dead) = &holder.job {
                store.recovered(dead, "the agent, at its start", &recovery.to_string())?;
            }
        }
        Ok(None) => {}
        Err(error) => say(format!("cannot recover an orphaned shadow set: error[{}]: {}", error.code, error.message)),
    }
    let (config_for_journal, root_for_journal) = (config.clone(), options.root.clone());
    let shared = Arc::new(Shared {
        options,
        store,
        state: Mutex::new(State {
            config: Arc::new(config),
            slots,
            queue: VecDeque::new(),
            running: None,
            stopping: None,
            reload: false,
            next_request: 0,
            started: VecDeque::new(),
            config_error: None,
            pending: Vec::new(),
            pending_since: None,
            dead_man_sent_for: None,
        }),
        wake: Condvar::new(),
        counters: Mutex::default(),
        started_ns: sysstate_repo::lock::now_ns(),
        journal: start_journal(&config_for_journal, &root_for_journal),
    });
    catch_up(&shared, &now)?;
    let signals = watch_signals(&shared)?;
    let socket = crate::socket_path();
    let api = crate::api::serve(shared.clone(), &socket)?;
    let config = shared.lock().config.clone();
    if let Some(address) = config.metrics.listen_address()? {
        api.serve_metrics(shared.clone(), address)?;
        say(format!("metrics on http://{address}/metrics"));
    }
    crate::metrics::write_textfile(&shared, &config);
    say(format!("started (pid {}), API on `{}`", std::process::id(), socket.display()));
    for slot in &shared.lock().slots {
        say(format!("schedule `{}`: next run {}", slot.schedule.work.key(), describe(slot.next.as_ref())));
    }
    crate::systemd::notify(&format!("READY=1\nSTATUS={}", shared.status_line()));
    watchdog(&shared);
    let worker = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("sysstate-agent-worker".into())
            .spawn(move || work_loop(&shared))
            .map_err(|e| EngineError::new(ErrorCode::Internal, format!("cannot start the agent's worker: {e}")))?
    };
    schedule_loop(&shared);
    crate::systemd::notify("STOPPING=1\nSTATUS=stopping: cancelling the running job");
    let signal = shared.lock().stopping.unwrap_or(libc::SIGTERM);
    let running = shared.lock().running.as_ref().and_then(|r| r.job.clone());
    if let Some(job) = &running {
        say(format!("signal {signal}: cancelling job {job} (its writers are thawed, nothing half-stored)"));
    }
    let _ = worker.join();
    api.stop();
    signals.close();
    let _ = std::fs::remove_file(&socket);
    say(match running {
        Some(job) => {
            let ended = shared.store.job(&job).ok().flatten().map_or_else(|| "?".to_string(), |j| j.state.to_string());
            format!("stopped by signal {signal}; job {job} ended {ended}")
        }
        None => format!("stopped by signal {signal}; no job was running"),
    });
    Ok(())
}

fn describe(time: Option<&DateTime<Local>>) -> String {
    time.map_or_else(|| "never".to_string(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, false))
}

/// At start: a schedule whose last time passed while the agent was not running (after the
/// time it last handled) runs once now. A schedule the agent never ran starts from now.
fn catch_up(shared: &Shared, now: &DateTime<Local>) -> Result<()> {
    let works: Vec<(sysstate_engine::schedule::ScheduledWork, Option<DateTime<Local>>)> =
        shared.lock().slots.iter().map(|slot| (slot.schedule.work, slot.schedule.previous_at(now))).collect();
    for (work, previous) in works {
        let key = work.key();
        let mark = shared.store.schedule_mark(key)?;
        if let (Some(covered), Some(previous)) = (mark, previous) {
            if nanos(&previous) > covered {
                say(format!(
                    "schedule `{key}`: the run of {} was missed while the agent was down: running it now",
                    describe(Some(&previous))
                ));
                let config = shared.lock().config.clone();
                let _ = shared.enqueue(
                    Work::scheduled(work, &config),
                    JobTrigger::CatchUp,
                    format!("schedule `{key}` (catch-up of {})", describe(Some(&previous))),
                );
            }
        }
        shared.store.set_schedule_mark(key, nanos(now))?;
    }
    Ok(())
}

/// Queues each schedule's runs as their times come, until the agent stops.
fn schedule_loop(shared: &Arc<Shared>) {
    let mut state = shared.lock();
    loop {
        if state.stopping.is_some() {
            return;
        }
        if std::mem::take(&mut state.reload) {
            drop(state);
            reload(shared);
            state = shared.lock();
            continue;
        }
        let now = Local::now();
        let mut fired = Vec::new();
        let config = state.config.clone();
        let delay = config.schedule.random_delay().unwrap_or_default();
        for slot in &mut state.slots {
            let (Some(next), Some(due)) = (slot.next, slot.due) else { continue };
            if due <= now {
                fired.push((slot.schedule.work, next));
                slot.next = slot.schedule.next_after(&now.max(next));
                slot.due = slot.next.map(|n| n + random_delay(delay));
            }
        }
        drop(state);
        for (work, at) in fired {
            let key = work.key();
            let by = format!("schedule `{key}` ({})", describe(Some(&at)));
            if let Err(busy) = shared.enqueue(Work::scheduled(work, &config), JobTrigger::Schedule, by) {
                let message = format!(
                    "the `{key}` run of {} was skipped: {} was still running or queued",
                    describe(Some(&at)),
                    busy.holder
                );
                say(&message);
                let _ = shared.store.event(
                    None,
                    Level::Warning,
                    Source::Engine,
                    ErrorCode::ScheduleSkipped,
                    &message,
                    None,
                );
            }
            if let Err(error) = shared.store.set_schedule_mark(key, nanos(&at)) {
                say(format!("cannot record the run of schedule `{key}`: {}", error.message));
            }
        }
        let notices_due = notices(shared, &config);
        state = shared.lock();
        // Sleep to the next time; wake at least every minute, so that a change of the clock
        // (a time zone, a step of NTP) is noticed.
        let wait = state
            .slots
            .iter()
            .filter_map(|slot| slot.due)
            .min()
            .map(|due| (due - Local::now()).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(Duration::from_secs(60))
            .min(Duration::from_secs(60))
            .min(notices_due);
        if state.stopping.is_none() && !state.reload && !wait.is_zero() {
            state = shared.wake.wait_timeout(state, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// How often the hourly digest goes (in tests, `SYSSTATE_FAILPOINT_DIGEST_EVERY_S`).
fn digest_every() -> Duration {
    Duration::from_secs(sysstate_types::failpoint::<u64>("DIGEST_EVERY_S").unwrap_or(3600))
}

/// The notices that come with time: the dead-man alert (no successful backup for too long) and
/// the hourly digest. Returns how long until one may be due.
fn notices(shared: &Arc<Shared>, config: &Config) -> Duration {
    let Ok(rules) = config.notify.rules() else { return Duration::from_secs(60) };
    let mut until = Duration::from_secs(60);
    if let (Some(limit), true) = (rules.no_success_for, config.notify.has_targets()) {
        // Since the last success; with none, since the agent started.
        let last = shared.store.last_ended(JobKind::Backup, true).ok().flatten();
        let reference = last
            .as_ref()
            .and_then(|job| job.ended.as_deref().and_then(sysstate_types::time::parse_utc))
            .unwrap_or(shared.started_ns);
        let deadline = reference.saturating_add(limit.as_nanos() as i64);
        let now = sysstate_repo::lock::now_ns();
        if now >= deadline {
            let mut state = shared.lock();
            if state.dead_man_sent_for != Some(reference) {
                state.dead_man_sent_for = Some(reference);
                drop(state);
                shared.tell(config, crate::notify::no_success(last.as_ref(), limit));
            }
        } else {
            until = until.min(Duration::from_nanos((deadline - now) as u64));
        }
    }
    let mut state = shared.lock();
    if let Some(since) = state.pending_since {
        let age = since.elapsed();
        if age >= digest_every() || !rules.hourly {
            let notices = std::mem::take(&mut state.pending);
            state.pending_since = None;
            drop(state);
            if !notices.is_empty() {
                send(shared, config, crate::notify::digest(&notices));
            }
        } else {
            until = until.min(digest_every() - age);
        }
    }
    until
}

/// Sends `notice` on a thread of its own (a webhook's retries take seconds).
fn send(shared: &Arc<Shared>, config: &Config, notice: crate::notify::Notice) {
    let (store, section) = (shared.store.clone(), config.notify.clone());
    let _ = std::thread::Builder::new()
        .name("sysstate-agent-notify".into())
        .spawn(move || crate::notify::deliver_and_record(&store, &section, &notice));
}

impl Shared {
    /// Tells `notice` to `[notify]`'s targets: now, or in the hourly digest.
    pub(crate) fn tell(self: &Arc<Self>, config: &Config, notice: crate::notify::Notice) {
        if !config.notify.has_targets() {
            return;
        }
        if config.notify.rules().is_ok_and(|r| r.hourly) {
            let mut state = self.lock();
            state.pending.push(notice);
            state.pending_since.get_or_insert_with(std::time::Instant::now);
            return;
        }
        send(self, config, notice);
    }

    /// The doctor's options for this agent (its diagnosis goes into notices).
    pub(crate) fn doctor_options(&self) -> sysstate_doctor::Options {
        sysstate_doctor::Options {
            config_file: self.options.config_file.clone(),
            config_required: self.options.config_required,
            root: self.options.root.clone(),
            target: self.options.target.clone(),
            passphrase: None,
            fix: false,
            validate: false,
        }
    }
}

/// The change journal the agent keeps for its backups, on the filesystems of the components'
/// paths, from start to stop: a backup then costs what changed since the one before. Without it
/// (not root, a filesystem without file handles, `SYSSTATE_FAILPOINT_JOURNAL_OFF` in tests)
/// every backup walks its components, and its version says why.
fn start_journal(config: &Config, root: &Path) -> Option<sysstate_engine::ops::KeptJournal> {
    if sysstate_types::failpoint::<u8>("JOURNAL_OFF").is_some() {
        return None;
    }
    let resolved = sysstate_engine::components::select(config, root, &[]).map(|(r, _)| r).unwrap_or_default();
    let paths: Vec<PathBuf> = resolved
        .iter()
        .flat_map(|r| r.present.iter().map(|p| sysstate_engine::components::under_root(root, p)))
        .chain(std::iter::once(root.to_path_buf()))
        .collect();
    let paths: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    // Tests provoke the journal's doubt with a tiny bound.
    let options = sysstate_shadow::journal::JournalOptions {
        max_dirs: sysstate_types::failpoint("JOURNAL_MAX_DIRS").unwrap_or(65_536),
        ..Default::default()
    };
    match sysstate_shadow::journal::Journal::start(&paths, options) {
        Ok(journal) => Some(sysstate_engine::ops::KeptJournal {
            journal: Arc::new(journal),
            counts: Default::default(),
            made: Default::default(),
        }),
        Err(error) => {
            say(format!("the change journal cannot start ({error}): every backup reads all its components"));
            None
        }
    }
}

/// Reads the config again (SIGHUP). A config that does not load is refused: the agent keeps
/// the one it has and says why.
fn reload(shared: &Shared) {
    let now = Local::now();
    match load_config(&shared.options).and_then(|config| Ok((slots(&config, &now)?, config))) {
        Ok((slots, config)) => {
            let mut state = shared.lock();
            state.config = Arc::new(config);
            state.slots = slots;
            state.config_error = None;
            say("configuration reloaded");
            for slot in &state.slots {
                say(format!("schedule `{}`: next run {}", slot.schedule.work.key(), describe(slot.next.as_ref())));
            }
        }
        Err(error) => {
            let message =
                format!("the configuration was not reloaded, the agent keeps the one it had: {}", error.message);
            say(&message);
            let _ = shared.store.event(None, Level::Error, Source::Engine, ErrorCode::InvalidInput, &message, None);
            shared.lock().config_error = Some(error.message);
        }
    }
}

/// Runs the queue, one job at a time, until the agent stops.
fn work_loop(shared: &Arc<Shared>) {
    loop {
        let (request, config, cancel) = {
            let mut state = shared.lock();
            loop {
                if state.stopping.is_some() {
                    return;
                }
                if let Some(request) = state.queue.pop_front() {
                    let cancel = ThawTrigger::default();
                    state.running = Some(Running { request: request.clone(), job: None, cancel: cancel.clone() });
                    break (request, state.config.clone(), cancel);
                }
                state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            }
        };
        crate::work::execute(shared, &config, &request, cancel);
        crate::metrics::write_textfile(shared, &config);
        let mut state = shared.lock();
        state.running = None;
        shared.wake.notify_all();
        drop(state);
        crate::systemd::notify(&format!("STATUS={}", shared.status_line()));
    }
}

impl Shared {
    /// Notes that the running request's job has its row (`id`).
    pub(crate) fn started(&self, request: u64, id: &str) {
        let mut state = self.lock();
        let mut kind = None;
        if let Some(running) = state.running.as_mut().filter(|r| r.request.id == request) {
            running.job = Some(id.to_string());
            kind = Some(running.request.work.kind());
        }
        state.started.push_back((request, id.to_string()));
        if state.started.len() > 256 {
            state.started.pop_front();
        }
        drop(state);
        if let Some(kind) = kind {
            crate::systemd::notify(&format!("STATUS=running job {id} ({kind})"));
        }
    }

    /// What systemd shows as the agent's status when no job runs: the next scheduled run.
    pub(crate) fn status_line(&self) -> String {
        let state = self.lock();
        let next = state.slots.iter().filter_map(|s| s.next.map(|n| (n, s.schedule.work.key()))).min();
        match next {
            Some((at, key)) => format!("idle; next: {key} at {}", describe(Some(&at))),
            None => "idle; no schedule".to_string(),
        }
    }
}

/// Tells systemd the agent lives, at half its `WatchdogSec=`, for as long as the agent's state
/// can be taken (a deadlocked agent stops telling, and systemd restarts it).
fn watchdog(shared: &Arc<Shared>) {
    let Some(interval) = crate::systemd::watchdog_interval() else { return };
    let shared = Arc::downgrade(shared);
    let _ = std::thread::Builder::new().name("sysstate-agent-watchdog".into()).spawn(move || loop {
        std::thread::sleep(interval);
        let Some(shared) = shared.upgrade() else { return };
        if shared.lock().stopping.is_some() {
            return;
        }
        crate::systemd::notify("WATCHDOG=1");
    });
}

/// The thread that turns signals into a reload or a stop.
struct SignalThread {
    handle: signal_hook::iterator::Handle,
}

impl SignalThread {
    fn close(self) {
        self.handle.close();
    }
}

fn watch_signals(shared: &Arc<Shared>) -> Result<SignalThread> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM]).map_err(|e| {
        EngineError::new(ErrorCode::Internal, format!("cannot install the agent's signal handler: {e}"))
    })?;
    let handle = signals.handle();
    let shared = shared.clone();
    std::thread::Builder::new()
        .name("sysstate-agent-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                match signal {
                    SIGHUP => {
                        say("SIGHUP: reloading the configuration");
                        shared.reload();
                    }
                    signal => shared.stop(signal),
                }
            }
        })
        .map_err(|e| EngineError::new(ErrorCode::Internal, format!("cannot start the agent's signal thread: {e}")))?;
    Ok(SignalThread { handle })
}
