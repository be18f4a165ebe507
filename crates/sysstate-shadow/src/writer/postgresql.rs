use super::{CopyAddition, ErrorClass, NoReply, Phase, Stop, Writer, WriterError};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const END: &str = "__sysstate_end_of_reply__";

/// PostgreSQL's own online backup: `pg_backup_start` on a session held open from prepare-backup
/// until after the commit, `pg_backup_stop` after it, and into the copy: its `backup_label` and
/// `tablespace_map`, the write-ahead log written until the stop (copied again from the live
/// `pg_wal`), and without `postmaster.pid`. A data directory restored from the copy starts,
/// replays the log from the backup's checkpoint to its end, and is consistent.
///
/// The session is a `psql` process (the configured command, e.g. `["psql", "-h", "/run/postgresql",
/// "-U", "postgres"]`); closing it aborts the backup mode, so an abort or a crash of sysstate
/// leaves the server as it was.
#[derive(Debug)]
pub struct PostgresWriter {
    name: String,
    psql: Vec<String>,
    data_directory: PathBuf,
    freeze_timeout: Duration,
    session: Option<Session>,
    stopped: Option<(String, String)>,
    stop: Stop,
}

#[derive(Debug)]
struct Session {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

fn decode_hex(text: &str) -> Result<String, WriterError> {
    let bytes = (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|e| {
            WriterError::new(ErrorClass::Inconsistent, format!("pg_backup_stop returned an unreadable label: {e}"))
        })?;
    String::from_utf8(bytes).map_err(|e| {
        WriterError::new(ErrorClass::Inconsistent, format!("pg_backup_stop returned a label that is not UTF-8: {e}"))
    })
}

impl PostgresWriter {
    /// A writer that opens its session with `psql` and protects `data_directory` (absolute as
    /// seen from the root).
    pub fn new(name: &str, psql: Vec<String>, data_directory: PathBuf, freeze_timeout: Duration) -> Self {
        PostgresWriter {
            name: name.into(),
            psql,
            data_directory,
            freeze_timeout,
            session: None,
            stopped: None,
            stop: Stop::default(),
        }
    }

    fn open(&mut self) -> Result<(), WriterError> {
        let (program, args) = self
            .psql
            .split_first()
            .ok_or_else(|| WriterError::new(ErrorClass::Nonretryable, "the psql command is empty"))?;
        let mut child = sysstate_fs::command(program)
            .args(args)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| WriterError::new(ErrorClass::Nonretryable, format!("cannot start `{program}`: {e}")))?;
        let stdout = child.stdout.take().expect("piped");
        let mut stderr_pipe = child.stderr.take().expect("piped");
        let stdin = child.stdin.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr_pipe.read_to_string(&mut text);
            sink.lock().expect("stderr lock").push_str(&text);
        });
        self.session = Some(Session { child, stdin, lines, stderr });
        Ok(())
    }

    /// Runs one statement on the session; its output lines. A set `stop` ends the wait and the
    /// session (which ends what the statement began).
    fn query(&mut self, sql: &str, deadline: Instant, stop: &Stop) -> Result<Vec<String>, WriterError> {
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| WriterError::new(ErrorClass::NotResponding, "the PostgreSQL session is not open"))?;
        let failed = |session: &mut Session, what: &str| {
            // Give psql a moment to write its error.
            std::thread::sleep(Duration::from_millis(100));
            let stderr = session.stderr.lock().expect("stderr lock").trim().to_string();
            let class = if stderr.contains("could not connect") || stderr.contains("Connection refused") {
                ErrorClass::Retryable
            } else if stderr.is_empty() {
                ErrorClass::NotResponding
            } else {
                ErrorClass::Nonretryable
            };
            WriterError::new(
                class,
                format!("{what}{}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") }),
            )
        };
        if writeln!(session.stdin, "{sql}\n\\echo {END}").and_then(|_| session.stdin.flush()).is_err() {
            return Err(failed(session, "the PostgreSQL session ended"));
        }
        let mut out = Vec::new();
        loop {
            match stop.recv(&session.lines, deadline) {
                Ok(line) if line == END => return Ok(out),
                Ok(line) => out.push(line),
                Err(NoReply::Timeout) => {
                    return Err(WriterError::new(
                        ErrorClass::NotResponding,
                        format!("PostgreSQL did not answer `{sql}` in time"),
                    ))
                }
                Err(NoReply::Stopped) => {
                    // No need to wait for a session that was not answering to end by itself.
                    self.close(Duration::ZERO);
                    return Err(Stop::error(format_args!("waiting for PostgreSQL to answer `{sql}`")));
                }
                Err(NoReply::Disconnected) => return Err(failed(session, &format!("`{sql}` failed"))),
            }
        }
    }

    /// Ends the session: psql exits at the end of its input, or is killed after `grace`.
    fn close(&mut self, grace: Duration) {
        if let Some(mut session) = self.session.take() {
            drop(session.stdin);
            super::end_child(&mut session.child, grace);
        }
    }
}

impl Writer for PostgresWriter {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "postgresql"
    }

    fn freeze_timeout(&self) -> Duration {
        self.freeze_timeout
    }

    fn set_stop(&mut self, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.stop = Stop::new(stop);
    }

    fn handle(&mut self, phase: Phase, deadline: Instant) -> Result<(), WriterError> {
        match phase {
            Phase::Identify => Ok(()),
            Phase::PrepareBackup => {
                self.open()?;
                // A fast checkpoint: the copy can start at once.
                let stop = self.stop.for_phase(phase);
                self.query("SELECT pg_backup_start('sysstate', true);", deadline, &stop).map(|_| ())
            }
            Phase::PostSnapshot => {
                let lines = self.query(
                    "SELECT encode(convert_to(labelfile, 'UTF8'), 'hex') || '|' || encode(convert_to(coalesce(spcmapfile, ''), 'UTF8'), 'hex') FROM pg_backup_stop(false);",
                    deadline,
                    &Stop::default(),
                )?;
                self.close(Duration::from_secs(5));
                let line = lines
                    .iter()
                    .find(|l| l.contains('|'))
                    .ok_or_else(|| WriterError::new(ErrorClass::Inconsistent, "pg_backup_stop returned nothing"))?;
                let (label, map) = line.split_once('|').expect("checked above");
                self.stopped = Some((decode_hex(label)?, decode_hex(map)?));
                Ok(())
            }
            Phase::Abort => {
                // Ending the session ends its backup mode.
                self.close(Duration::from_secs(5));
                Ok(())
            }
            Phase::PrepareSnapshot | Phase::Freeze | Phase::Thaw | Phase::BackupComplete => Ok(()),
        }
    }

    fn copy_additions(&mut self) -> Vec<CopyAddition> {
        let Some((label, map)) = self.stopped.take() else { return Vec::new() };
        let data = &self.data_directory;
        let mut additions = vec![
            CopyAddition::FromLive(data.join("pg_wal")),
            CopyAddition::Contents(data.join("backup_label"), label.into_bytes()),
            CopyAddition::Remove(data.join("postmaster.pid")),
            CopyAddition::Remove(data.join("postmaster.opts")),
        ];
        if !map.is_empty() {
            additions.push(CopyAddition::Contents(data.join("tablespace_map"), map.into_bytes()));
        }
        additions
    }
}

impl Drop for PostgresWriter {
    fn drop(&mut self) {
        self.close(Duration::from_secs(5));
    }
}
