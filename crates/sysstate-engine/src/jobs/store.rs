//! The job store and the event log: SQLite in WAL mode in the state directory. A job row lives
//! from its start to its end and is updated while it runs (current operation, progress), so
//! `sysstate job` in another process shows it. Rows older than the retention are pruned when a
//! job starts. Only the runner (`jobs::run`) starts and ends rows.

use super::{
    EventFilter, EventRecord, JobError, JobFilter, JobKind, JobProgress, JobRecord, JobState, JobTrigger, Source,
};
use crate::error::{EngineError, Result};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use sysstate_types::{ErrorCode, Level};

/// How long ended jobs and events are kept.
pub const RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_ns INTEGER NOT NULL,
    ended_ns INTEGER,
    target TEXT,
    components TEXT NOT NULL DEFAULT '[]',
    current_operation TEXT,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER NOT NULL DEFAULT 0,
    files_done INTEGER NOT NULL DEFAULT 0,
    files_total INTEGER NOT NULL DEFAULT 0,
    version TEXT,
    log_path TEXT,
    error_code TEXT,
    error_message TEXT,
    error_cause TEXT,
    error_resolution TEXT,
    error_event_id INTEGER,
    heartbeat_ns INTEGER,
    trigger TEXT NOT NULL DEFAULT 'command'
);
CREATE INDEX IF NOT EXISTS jobs_started ON jobs (started_ns);
CREATE TABLE IF NOT EXISTS schedule_marks (
    name TEXT PRIMARY KEY,
    covered_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ns INTEGER NOT NULL,
    level TEXT NOT NULL,
    source TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL,
    job TEXT,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_time ON events (time_ns);
";

fn now_ns() -> i64 {
    sysstate_repo::lock::now_ns()
}

fn db_error(path: &Path, error: rusqlite::Error) -> EngineError {
    // SQLite says "database or disk is full" when a page does not fit, but "disk I/O error" when
    // its shared-memory index or log cannot grow: the filesystem's free space tells.
    let full = matches!(error.sqlite_error_code(), Some(rusqlite::ErrorCode::DiskFull))
        || path.parent().and_then(|dir| rustix::fs::statvfs(dir).ok()).is_some_and(|fs| {
            // Root may write into the blocks ext4 reserves; anyone else may not.
            let blocks = if rustix::process::geteuid().is_root() { fs.f_bfree } else { fs.f_bavail };
            blocks.saturating_mul(fs.f_frsize) < 1 << 20
        });
    let error =
        EngineError::new(ErrorCode::StateDirPermission, format!("the job database `{}`: {error}", path.display()));
    if full {
        // Not a permission: the filesystem that holds it has no room to record the job.
        let dir = path.parent().unwrap_or(path).display();
        error.with_cause(format!("the filesystem holding the state directory `{dir}` is full")).with_resolution(format!(
            "free space on that filesystem (`df -h {dir}`; `sysstate doctor` shows it as `state-dir.space`), then run the job again"
        ))
    } else {
        error
            .with_resolution("check that the state directory is writable by the service user (`sysstate doctor --fix`)")
    }
}

/// The store.
#[derive(Debug)]
pub struct JobStore {
    connection: Mutex<Connection>,
    path: PathBuf,
    state_dir: PathBuf,
    retention: Duration,
    /// The most the undo folders may take together (`None`: unbounded).
    undo_max_bytes: Option<u64>,
}

/// A stored name this binary does not know (a newer release wrote it).
fn unknown(column: &str, name: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("the job {column} `{name}` is unknown to this release of sysstate").into(),
    )
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Info => "info",
        Level::Warning => "warning",
        Level::Error => "error",
    }
}

impl JobStore {
    /// Opens (creating) the store in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<JobStore> {
        let path = state_dir.join("sysstate.db");
        crate::paths::create_private_dir(state_dir).map_err(|e| {
            EngineError::new(
                ErrorCode::StateDirPermission,
                format!("cannot create the state directory `{}`: {e}", state_dir.display()),
            )
        })?;
        let connection = Connection::open(&path).map_err(|e| db_error(&path, e))?;
        connection.busy_timeout(Duration::from_secs(10)).map_err(|e| db_error(&path, e))?;
        connection.pragma_update(None, "journal_mode", "WAL").map_err(|e| db_error(&path, e))?;
        connection.pragma_update(None, "synchronous", "NORMAL").map_err(|e| db_error(&path, e))?;
        connection.execute_batch(SCHEMA).map_err(|e| db_error(&path, e))?;
        // Stores made before a column get it.
        for (column, definition) in
            [("heartbeat_ns", "heartbeat_ns INTEGER"), ("trigger", "trigger TEXT NOT NULL DEFAULT 'command'")]
        {
            if connection.prepare(&format!("SELECT {column} FROM jobs LIMIT 0")).is_err() {
                connection
                    .execute_batch(&format!("ALTER TABLE jobs ADD COLUMN {definition}"))
                    .map_err(|e| db_error(&path, e))?;
            }
        }
        // The agent's lookups: the last job of a kind, and the running jobs (a few among a
        // hundred thousand ended ones).
        connection
            .execute_batch(
                "CREATE INDEX IF NOT EXISTS jobs_kind_state_ended ON jobs (kind, state, ended_ns);
                 CREATE INDEX IF NOT EXISTS jobs_running ON jobs (started_ns) WHERE state = 'running';",
            )
            .map_err(|e| db_error(&path, e))?;
        Ok(JobStore {
            connection: Mutex::new(connection),
            path,
            state_dir: state_dir.to_path_buf(),
            retention: RETENTION,
            undo_max_bytes: None,
        })
    }

    /// A one-line health summary: the database's integrity check and its row counts.
    pub fn health(&self) -> Result<String> {
        self.with(|db| {
            let check: String = db.query_row("PRAGMA quick_check", [], |row| row.get(0))?;
            let jobs: i64 = db.query_row("SELECT count(*) FROM jobs", [], |row| row.get(0))?;
            let events: i64 = db.query_row("SELECT count(*) FROM events", [], |row| row.get(0))?;
            Ok(format!("{jobs} jobs and {events} events; integrity check: {check}"))
        })
    }

    /// Keeps ended jobs, their events, logs and undo folders for `retention` (`[jobs] retention`).
    pub fn with_retention(mut self, retention: Duration) -> JobStore {
        self.retention = retention;
        self
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let connection = self.connection.lock().expect("db lock");
        f(&connection).map_err(|e| db_error(&self.path, e))
    }

    /// Keeps the undo folders of in-place restores under `bytes` together (`[jobs]
    /// undo-max-size`): the oldest go first when a job starts; the newest is always kept.
    pub fn with_undo_max(mut self, bytes: Option<u64>) -> JobStore {
        self.undo_max_bytes = bytes;
        self
    }

    /// Starts a job: a `running` row and a log file. Prunes rows past the retention.
    pub(super) fn start(
        &self,
        kind: JobKind,
        trigger: JobTrigger,
        target: Option<&str>,
        components: &[String],
    ) -> Result<String> {
        let mut random = [0u8; 6];
        getrandom::getrandom(&mut random).expect("the kernel's random source is available");
        let now = now_ns();
        let id = format!(
            "{}-{}",
            sysstate_types::time::format_utc(now).replace([':', '-'], "").trim_end_matches('Z'),
            hex::encode(random)
        );
        let logs = self.state_dir.join("logs");
        let log_path = logs.join(format!("{id}.log"));
        let _ = std::fs::create_dir_all(&logs);
        let cutoff = now - self.retention.as_nanos() as i64;
        self.prune_files(cutoff);
        self.with(|db| {
            db.execute("DELETE FROM jobs WHERE ended_ns IS NOT NULL AND ended_ns < ?1", params![cutoff])?;
            db.execute("DELETE FROM events WHERE time_ns < ?1", params![cutoff])?;
            db.execute(
                "INSERT INTO jobs (id, kind, state, pid, started_ns, target, components, log_path, trigger) VALUES (?1, ?2, 'running', ?3, ?4, ?5, ?6, ?7, ?8)",
                params![id, kind.as_str(), std::process::id(), now, target, serde_json::to_string(components).expect("names encode"), log_path.display().to_string(), trigger.as_str()],
            )
        })?;
        self.log(&id, &format!("{kind} started (pid {}, by {trigger})", std::process::id()));
        Ok(id)
    }

    /// Removes job logs and in-place restore undo folders last changed before `cutoff`.
    fn prune_files(&self, cutoff: i64) {
        for dir in ["logs", "undo"] {
            let Ok(entries) = std::fs::read_dir(self.state_dir.join(dir)) else { continue };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                use std::os::unix::fs::MetadataExt;
                if meta.mtime() * 1_000_000_000 + meta.mtime_nsec() >= cutoff {
                    continue;
                }
                let _ = if meta.is_dir() {
                    std::fs::remove_dir_all(entry.path())
                } else {
                    std::fs::remove_file(entry.path())
                };
            }
        }
        if let Some(max) = self.undo_max_bytes {
            self.prune_undo_to(max);
        }
    }

    /// Removes the oldest undo folders until the rest take at most `max` bytes; the newest
    /// stays whatever its size (the last in-place restore can always be undone).
    fn prune_undo_to(&self, max: u64) {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(self.state_dir.join("undo")) else { return };
        let mut folders: Vec<(i64, u64, PathBuf)> = entries
            .flatten()
            .filter_map(|entry| {
                let meta = entry.metadata().ok().filter(|m| m.is_dir())?;
                Some((meta.mtime() * 1_000_000_000 + meta.mtime_nsec(), tree_bytes(&entry.path()), entry.path()))
            })
            .collect();
        folders.sort_by_key(|(mtime, _, path)| (std::cmp::Reverse(*mtime), path.clone()));
        let mut total = 0u64;
        for (index, (_, bytes, path)) in folders.iter().enumerate() {
            total += bytes;
            if index > 0 && total > max {
                let job = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if std::fs::remove_dir_all(path).is_ok() {
                    self.log(
                        &job,
                        &format!("undo data removed: the undo folders passed `jobs.undo-max-size` ({max} bytes)"),
                    );
                }
            }
        }
    }

    /// Appends a line to a job's log file.
    pub fn log(&self, job: &str, line: &str) {
        use std::io::Write;
        let path = self.state_dir.join("logs").join(format!("{job}.log"));
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(file, "{} {line}", sysstate_types::time::format_utc_ms(now_ns()));
        }
    }

    /// Records the components a job covers, once resolved (a backup of "the config's
    /// components" is recorded with their names, not as none).
    pub fn set_components(&self, job: &str, components: &[String]) -> Result<()> {
        let names = serde_json::to_string(components).expect("names encode");
        self.with(|db| db.execute("UPDATE jobs SET components = ?2 WHERE id = ?1", params![job, names])).map(|_| ())
    }

    /// Sets what a job is doing now.
    pub fn operation(&self, job: &str, operation: &str) -> Result<()> {
        self.log(job, operation);
        self.with(|db| {
            db.prepare_cached("UPDATE jobs SET current_operation = ?2, heartbeat_ns = ?3 WHERE id = ?1")?
                .execute(params![job, operation, now_ns()])
        })
        .map(|_| ())
    }

    /// Updates a job's progress.
    pub fn progress(&self, job: &str, progress: &JobProgress) -> Result<()> {
        self.with(|db| {
            db.prepare_cached(
                "UPDATE jobs SET bytes_done = ?2, bytes_total = ?3, files_done = ?4, files_total = ?5, heartbeat_ns = ?6 WHERE id = ?1",
            )?
            .execute(params![
                    job,
                    progress.bytes_done,
                    progress.bytes_total,
                    progress.files_done,
                    progress.files_total,
                    now_ns()
            ])
        })
        .map(|_| ())
    }

    /// Ends a job. A failure is written as an event too; returns the event's id.
    pub(super) fn finish(
        &self,
        job: &str,
        state: JobState,
        version: Option<&str>,
        error: Option<&EngineError>,
    ) -> Result<()> {
        self.finish_at(job, state, version, error, now_ns())
    }

    /// Ends a job as [`JobStore::finish`] does, at `ended_ns`.
    fn finish_at(
        &self,
        job: &str,
        state: JobState,
        version: Option<&str>,
        error: Option<&EngineError>,
        now: i64,
    ) -> Result<()> {
        if let Some(error) = error {
            self.event(
                Some(job),
                error.code.level(),
                Source::of(error.code),
                error.code,
                &error.message,
                error.data.clone(),
            )?;
        }
        self.log(
            job,
            &format!(
                "ended: {state}{}",
                error.map(|e| format!(": error[{}]: {}", e.code, e.message)).unwrap_or_default()
            ),
        );
        self.with(|db| {
            db.execute(
                "UPDATE jobs SET state = ?2, ended_ns = ?3, version = ?4, current_operation = NULL, error_code = ?5, error_message = ?6, error_cause = ?7, error_resolution = ?8, error_event_id = ?9 WHERE id = ?1",
                params![
                    job,
                    state.as_str(),
                    now,
                    version,
                    error.map(|e| e.code.as_str()),
                    error.map(|e| e.message.clone()),
                    error.map(|e| e.cause().to_string()),
                    error.map(|e| e.resolution().to_string()),
                    error.map(|e| e.code.event_id()),
                ],
            )
        })
        .map(|_| ())
    }

    /// Appends an event.
    pub fn event(
        &self,
        job: Option<&str>,
        level: Level,
        source: Source,
        code: ErrorCode,
        message: &str,
        data: Option<serde_json::Value>,
    ) -> Result<()> {
        if let Some(job) = job {
            self.log(
                job,
                &format!("{} {} {}[{}]: {message}", level_name(level), source.as_str(), code.event_id(), code),
            );
        }
        self.with(|db| {
            db.execute(
                "INSERT INTO events (time_ns, level, source, event_id, code, message, job, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![now_ns(), level_name(level), source.as_str(), code.event_id(), code.as_str(), message, job, data.map(|d| d.to_string())],
            )
        })
        .map(|_| ())
    }

    fn read_job(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
        let ended: Option<i64> = row.get("ended_ns")?;
        let started: i64 = row.get("started_ns")?;
        let code: Option<String> = row.get("error_code")?;
        let components: String = row.get("components")?;
        let kind: String = row.get("kind")?;
        let state: String = row.get("state")?;
        let trigger: String = row.get("trigger")?;
        let mut record = JobRecord {
            id: row.get("id")?,
            kind: JobKind::from_name(&kind).ok_or_else(|| unknown("kind", &kind))?,
            state: JobState::from_name(&state).ok_or_else(|| unknown("state", &state))?,
            trigger: JobTrigger::from_name(&trigger).ok_or_else(|| unknown("trigger", &trigger))?,
            pid: row.get("pid")?,
            started: sysstate_types::time::format_utc(started),
            ended: ended.map(sysstate_types::time::format_utc),
            target: row.get("target")?,
            components: serde_json::from_str(&components).unwrap_or_default(),
            current_operation: row.get("current_operation")?,
            progress: JobProgress {
                bytes_done: row.get("bytes_done")?,
                bytes_total: row.get("bytes_total")?,
                files_done: row.get("files_done")?,
                files_total: row.get("files_total")?,
                ..JobProgress::default()
            },
            version: row.get("version")?,
            log_path: row.get("log_path")?,
            error: match code {
                Some(code) => Some(JobError {
                    code,
                    message: row.get("error_message")?,
                    cause: row.get("error_cause")?,
                    resolution: row.get("error_resolution")?,
                    event_id: row.get("error_event_id")?,
                }),
                None => None,
            },
        };
        if record.state == JobState::Running {
            record.progress.estimate(now_ns() - started);
        }
        Ok(record)
    }

    /// Jobs still running. A `running` row whose process is gone is ended as failed.
    pub fn running(&self) -> Result<Vec<JobRecord>> {
        let jobs: Vec<JobRecord> = self.with(|db| {
            let mut statement = db.prepare("SELECT * FROM jobs WHERE state = 'running' ORDER BY started_ns DESC")?;
            let rows = statement.query_map([], Self::read_job)?;
            rows.collect()
        })?;
        let mut alive = Vec::new();
        for job in jobs {
            if sysstate_repo::lock::process_alive(job.pid, None) {
                alive.push(job);
            } else {
                let mut error = EngineError::new(
                    ErrorCode::Cancelled,
                    format!(
                        "job {} ended without a word: its process {} is gone (killed, or the machine restarted)",
                        job.id, job.pid
                    ),
                );
                if job.kind == JobKind::RestoreInPlace {
                    error = error.with_resolution(format!(
                        "the system may be half restored: run `sysstate restore --undo {}` to put it back as it was, then restore again",
                        job.id
                    ));
                }
                // It ended when it was last heard of, not when someone first looked.
                let ended = self.last_heard_of(&job.id)?;
                self.finish_at(&job.id, JobState::Failed, None, Some(&error), ended)?;
            }
        }
        Ok(alive)
    }

    /// Says in the record of job `dead`, whose process died holding the shadow-set lock, that
    /// `who` (`job …`, `` `sysstate shadows recover` ``, the agent) recovered what its set left: an
    /// event of it and a line of its log; a `running` row is ended now (as [`running`] would)
    /// and its error says so too.
    ///
    /// [`running`]: JobStore::running
    pub fn recovered(&self, dead: &str, who: &str, what: &str) -> Result<()> {
        let said = format!(
            "{who} recovered what this job's shadow set left when its process died, at {}: {what}",
            sysstate_types::time::format_utc(now_ns())
        );
        if self.job(dead)?.is_none() {
            return Ok(()); // a job of another state folder, or dropped by retention
        }
        self.event(Some(dead), Level::Info, Source::Shadow, ErrorCode::ShadowSetInProgress, &said, None)?;
        self.running()?;
        self.with(|db| {
            db.execute(
                "UPDATE jobs SET error_message = error_message || ' ' || ?2 WHERE id = ?1 AND state = 'failed' AND error_message IS NOT NULL AND instr(error_message, ?2) = 0",
                params![dead, said],
            )
        })
        .map(|_| ())
    }

    /// When a job was last heard of: its last progress or operation, its log's last line, or
    /// its start.
    fn last_heard_of(&self, job: &str) -> Result<i64> {
        let (started, heartbeat, log): (i64, Option<i64>, Option<String>) = self.with(|db| {
            db.query_row("SELECT started_ns, heartbeat_ns, log_path FROM jobs WHERE id = ?1", params![job], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
        })?;
        let logged = log
            .and_then(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
            .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|since| since.as_nanos() as i64);
        Ok([Some(started), heartbeat, logged].into_iter().flatten().max().unwrap_or(started))
    }

    /// The `count` most recent ended jobs, newest first.
    pub fn previous(&self, count: usize) -> Result<Vec<JobRecord>> {
        // Jobs whose process is gone have ended: they belong here.
        self.running()?;
        self.with(|db| {
            let mut statement = db.prepare(
                "SELECT * FROM jobs WHERE state != 'running' ORDER BY ended_ns DESC, started_ns DESC LIMIT ?1",
            )?;
            let rows = statement.query_map(params![count as i64], Self::read_job)?;
            rows.collect()
        })
    }

    /// Jobs as `filter` selects them, newest first (the agent's job list). Rows of jobs whose
    /// process is gone are ended first.
    pub fn list(&self, filter: &JobFilter) -> Result<Vec<JobRecord>> {
        self.running()?;
        let running = filter.running.map(|running| if running { "running" } else { "ended" });
        self.with(|db| {
            let mut statement = db.prepare_cached(
                "SELECT * FROM jobs
                 WHERE (?1 IS NULL OR (?1 = 'running') = (state = 'running'))
                   AND (?2 IS NULL OR started_ns >= ?2)
                   AND (?3 IS NULL OR kind = ?3)
                   AND (?4 IS NULL OR state = ?4)
                 ORDER BY started_ns DESC LIMIT ?5",
            )?;
            let rows = statement.query_map(
                params![
                    running,
                    filter.since_ns,
                    filter.kind.map(JobKind::as_str),
                    filter.state.map(JobState::as_str),
                    filter.limit as i64
                ],
                Self::read_job,
            )?;
            rows.collect()
        })
    }

    /// Up to when the agent has handled the times of the schedule `name` (ns), if it ever ran it.
    pub fn schedule_mark(&self, name: &str) -> Result<Option<i64>> {
        self.with(|db| {
            db.query_row("SELECT covered_ns FROM schedule_marks WHERE name = ?1", params![name], |row| row.get(0))
                .optional()
        })
    }

    /// Records that the agent has handled the times of the schedule `name` up to `covered_ns`.
    pub fn set_schedule_mark(&self, name: &str, covered_ns: i64) -> Result<()> {
        self.with(|db| {
            db.execute(
                "INSERT INTO schedule_marks (name, covered_ns) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET covered_ns = excluded.covered_ns",
                params![name, covered_ns],
            )
        })
        .map(|_| ())
    }

    /// The newest job of `kind` that ended in success (`succeeded` true: with or without
    /// warnings) or in failure.
    pub fn last_ended(&self, kind: JobKind, succeeded: bool) -> Result<Option<JobRecord>> {
        let states: &[&str] = if succeeded { &["succeeded", "succeeded-with-warnings"] } else { &["failed"] };
        // One index lookup per state (an `IN` would scan every job of the kind that has none).
        let mut newest: Option<JobRecord> = None;
        for state in states {
            let found = self.with(|db| {
                db.prepare_cached("SELECT * FROM jobs WHERE kind = ?1 AND state = ?2 ORDER BY ended_ns DESC LIMIT 1")?
                    .query_row(params![kind.as_str(), state], Self::read_job)
                    .optional()
            })?;
            if let Some(found) = found {
                if newest.as_ref().is_none_or(|n| n.ended < found.ended) {
                    newest = Some(found);
                }
            }
        }
        Ok(newest)
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<Option<JobRecord>> {
        // Asked every few milliseconds while a client waits for a job (`GET /v1/jobs/ID?wait=`).
        self.with(|db| {
            db.prepare_cached("SELECT * FROM jobs WHERE id = ?1")?.query_row(params![id], Self::read_job).optional()
        })
    }

    /// Events, oldest first.
    pub fn events(&self, filter: &EventFilter) -> Result<Vec<EventRecord>> {
        let levels: Vec<&str> = match filter.level {
            None | Some(Level::Info) => vec!["info", "warning", "error"],
            Some(Level::Warning) => vec!["warning", "error"],
            Some(Level::Error) => vec!["error"],
        };
        self.with(|db| {
            let mut statement = db.prepare(
                "SELECT time_ns, level, source, event_id, code, message, job, data FROM events
                 WHERE (?1 IS NULL OR source = ?1) AND (?2 IS NULL OR time_ns >= ?2) AND (?3 IS NULL OR job = ?3)
                 ORDER BY seq",
            )?;
            let rows = statement.query_map(params![filter.source, filter.since_ns, filter.job], |row| {
                let data: Option<String> = row.get(7)?;
                Ok(EventRecord {
                    time: sysstate_types::time::format_utc(row.get(0)?),
                    level: row.get(1)?,
                    source: row.get(2)?,
                    event_id: row.get(3)?,
                    code: row.get(4)?,
                    message: row.get(5)?,
                    job: row.get(6)?,
                    data: data.and_then(|d| serde_json::from_str(&d).ok()),
                })
            })?;
            rows.filter(|r| r.as_ref().map(|e| levels.contains(&e.level.as_str())).unwrap_or(true)).collect()
        })
    }
}

/// Throttles progress writes to the store (at most every half second).
#[derive(Debug)]
pub struct ProgressWriter<'s> {
    store: &'s JobStore,
    job: String,
    state: Mutex<(JobProgress, Instant)>,
}

impl<'s> ProgressWriter<'s> {
    /// For `job`.
    pub fn new(store: &'s JobStore, job: &str) -> Self {
        ProgressWriter { store, job: job.to_string(), state: Mutex::new((JobProgress::default(), Instant::now())) }
    }

    /// Adds a file of `bytes`.
    pub fn add(&self, bytes: u64) {
        let mut state = self.state.lock().expect("progress lock");
        state.0.files_done += 1;
        state.0.bytes_done += bytes;
        if state.1.elapsed() >= Duration::from_millis(500) {
            state.1 = Instant::now();
            let _ = self.store.progress(&self.job, &state.0);
        }
    }

    /// Sets the bytes to process in all, when known.
    pub fn total(&self, bytes: u64) {
        self.state.lock().expect("progress lock").0.bytes_total = bytes;
    }

    /// Sets the files to process in all, when known.
    pub fn total_files(&self, files: u64) {
        self.state.lock().expect("progress lock").0.files_total = files;
    }

    /// Sets the bytes done and to do (operations that count in bytes, not files).
    pub fn set_bytes(&self, done: u64, total: u64) {
        let mut state = self.state.lock().expect("progress lock");
        (state.0.bytes_done, state.0.bytes_total) = (done, total);
        if state.1.elapsed() >= Duration::from_millis(500) {
            state.1 = Instant::now();
            let _ = self.store.progress(&self.job, &state.0);
        }
    }

    /// Writes the final counts; a total never learnt is what was done.
    pub fn flush(&self) {
        let mut state = self.state.lock().expect("progress lock");
        let progress = &mut state.0;
        if progress.files_total == 0 {
            progress.files_total = progress.files_done;
        }
        if progress.bytes_total == 0 {
            progress.bytes_total = progress.bytes_done;
        }
        let _ = self.store.progress(&self.job, &state.0);
    }
}

/// Bytes of the files under `dir` (not following symlinks).
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => tree_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_jobs_their_events_and_logs_are_pruned_past_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap().with_retention(Duration::from_millis(50));
        let old = store.start(JobKind::Backup, JobTrigger::Command, None, &[]).unwrap();
        let error = EngineError::new(ErrorCode::TargetFull, "full");
        store.finish(&old, JobState::Failed, None, Some(&error)).unwrap();
        let old_log = dir.path().join("logs").join(format!("{old}.log"));
        assert!(old_log.exists());
        std::thread::sleep(Duration::from_millis(120));
        let new = store.start(JobKind::Backup, JobTrigger::Command, None, &[]).unwrap();
        store.finish(&new, JobState::Succeeded, None, None).unwrap();
        let previous = store.previous(10).unwrap();
        assert_eq!(previous.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), vec![new.as_str()]);
        assert!(store.events(&EventFilter::default()).unwrap().iter().all(|e| e.job.as_deref() != Some(old.as_str())));
        assert!(!old_log.exists(), "the old job's log is removed with it");
    }

    #[test]
    fn undo_folders_past_their_size_limit_go_oldest_first_and_the_newest_stays() {
        let dir = tempfile::tempdir().unwrap();
        let undo = dir.path().join("undo");
        // Four restores' undo folders, oldest first: 2, 2, 2 and 5 MiB.
        for (age_minutes, name, mib) in [(40, "a", 2), (30, "b", 2), (20, "c", 2), (10, "d", 5)] {
            let folder = undo.join(name);
            std::fs::create_dir_all(folder.join("etc")).unwrap();
            std::fs::write(folder.join("etc/kept"), vec![0u8; mib << 20]).unwrap();
            let then = std::time::SystemTime::now() - Duration::from_secs(age_minutes * 60);
            std::fs::File::open(&folder).unwrap().set_modified(then).unwrap();
        }
        let store = JobStore::open(dir.path()).unwrap().with_undo_max(Some(8 << 20));
        store.start(JobKind::Check, JobTrigger::Command, None, &[]).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(&undo).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["c", "d"], "d (5 MiB) and c (2 MiB) fit in 8 MiB; b would not");
        // However small the limit, the newest stays: the last restore can be undone.
        let store = JobStore::open(dir.path()).unwrap().with_undo_max(Some(1));
        store.start(JobKind::Check, JobTrigger::Command, None, &[]).unwrap();
        let left: Vec<_> = std::fs::read_dir(&undo).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, ["d"]);
    }

    #[test]
    fn a_killed_job_ends_when_it_was_last_heard_of_not_when_it_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        let id = store.start(JobKind::Backup, JobTrigger::Command, None, &[]).unwrap();
        store.operation(&id, "reading shadow copies").unwrap();
        // Its process is gone (no pid is that high), last heard of ten minutes ago.
        let ten_minutes_ago = now_ns() - 600 * 1_000_000_000;
        store
            .with(|db| {
                db.execute(
                    "UPDATE jobs SET pid = 2147483646, heartbeat_ns = ?2, started_ns = ?3 WHERE id = ?1",
                    params![id, ten_minutes_ago, ten_minutes_ago - 1_000_000_000],
                )
            })
            .unwrap();
        let log = dir.path().join("logs").join(format!("{id}.log"));
        let then = std::time::UNIX_EPOCH + Duration::from_nanos(ten_minutes_ago as u64);
        std::fs::File::options().write(true).open(&log).unwrap().set_modified(then).unwrap();
        let ended = &store.previous(1).unwrap()[0];
        assert_eq!(ended.state, JobState::Failed);
        assert_eq!(ended.ended.as_deref(), Some(sysstate_types::time::format_utc(ten_minutes_ago).as_str()));
    }

    #[test]
    fn a_job_lives_from_start_to_end_with_its_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        let id = store.start(JobKind::Backup, JobTrigger::Command, Some("/t"), &["config".into()]).unwrap();
        store.operation(&id, "reading shadow copies").unwrap();
        let running = JobStore::open(dir.path()).unwrap().running().unwrap();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].current_operation.as_deref(), Some("reading shadow copies"));
        let error = EngineError::new(ErrorCode::WriterTimeout, "writer `db` was frozen too long");
        store.finish(&id, JobState::Failed, None, Some(&error)).unwrap();
        let previous = store.previous(1).unwrap();
        assert_eq!(previous[0].state, JobState::Failed);
        assert_eq!(previous[0].error.as_ref().unwrap().code, "writer-timeout");
        assert_eq!(previous[0].error.as_ref().unwrap().event_id, 1001);
        let events = store.events(&EventFilter { level: Some(Level::Error), ..Default::default() }).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].source, "writer", "a writer timeout is the writer's");
        assert!(store
            .events(&EventFilter { source: Some("repository".into()), ..Default::default() })
            .unwrap()
            .is_empty());
        assert!(std::fs::read_to_string(previous[0].log_path.as_ref().unwrap()).unwrap().contains("writer-timeout"));
    }

    #[test]
    fn the_job_list_filters_as_asked_and_says_what_started_each_job() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        let scheduled = store.start(JobKind::Backup, JobTrigger::Schedule, None, &[]).unwrap();
        store.finish(&scheduled, JobState::Succeeded, Some("abc"), None).unwrap();
        let failed = store.start(JobKind::Check, JobTrigger::Api, None, &[]).unwrap();
        store.finish(&failed, JobState::Failed, None, Some(&EngineError::new(ErrorCode::TargetFull, "full"))).unwrap();
        let running = store.start(JobKind::Backup, JobTrigger::CatchUp, None, &[]).unwrap();
        let ids = |filter: JobFilter| -> Vec<String> {
            store.list(&JobFilter { limit: 10, ..filter }).unwrap().into_iter().map(|j| j.id).collect()
        };
        assert_eq!(ids(JobFilter::default()), vec![running.clone(), failed.clone(), scheduled.clone()]);
        assert_eq!(ids(JobFilter { running: Some(true), ..Default::default() }), vec![running.clone()]);
        assert_eq!(
            ids(JobFilter { running: Some(false), ..Default::default() }),
            vec![failed.clone(), scheduled.clone()]
        );
        assert_eq!(ids(JobFilter { kind: Some(JobKind::Check), ..Default::default() }), vec![failed.clone()]);
        assert_eq!(ids(JobFilter { state: Some(JobState::Succeeded), ..Default::default() }), vec![scheduled.clone()]);
        assert_eq!(store.list(&JobFilter { limit: 1, ..Default::default() }).unwrap()[0].id, running);
        assert_eq!(store.job(&scheduled).unwrap().unwrap().trigger, JobTrigger::Schedule);
        assert_eq!(store.last_ended(JobKind::Backup, true).unwrap().unwrap().id, scheduled);
        assert_eq!(store.last_ended(JobKind::Check, false).unwrap().unwrap().id, failed);
        assert!(store.last_ended(JobKind::Backup, false).unwrap().is_none());
        // The agent's schedule marks survive the store.
        assert_eq!(store.schedule_mark("backup").unwrap(), None);
        store.set_schedule_mark("backup", 42).unwrap();
        store.set_schedule_mark("backup", 43).unwrap();
        assert_eq!(JobStore::open(dir.path()).unwrap().schedule_mark("backup").unwrap(), Some(43));
    }
}
