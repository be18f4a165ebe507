//! Writers: code that makes an application consistent during the freeze.

mod command;
mod fsfreeze;
mod lockfile;
mod postgresql;
mod process;

pub use command::CommandWriter;
pub use fsfreeze::FsfreezeWriter;
pub use lockfile::LockFileWriter;
pub use postgresql::PostgresWriter;
pub use process::ProcessWriter;

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use sysstate_types::ErrorCode;

/// The phases a writer is taken through in a shadow set, in order (abort replaces the tail on
/// failure). The process-writer protocol sends them as `{"event": "<phase>"}` lines (VSS calls
/// them events; here that word belongs to the event log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Say who you are.
    Identify,
    /// A backup is about to start: flush, checkpoint, start a backup session.
    PrepareBackup,
    /// The freeze is near.
    PrepareSnapshot,
    /// Stop writing until thaw.
    Freeze,
    /// Writing may resume.
    Thaw,
    /// The copies exist (add files to them if needed).
    PostSnapshot,
    /// The backup read the copies.
    BackupComplete,
    /// The shadow set failed: undo what prepare did.
    Abort,
}

impl Phase {
    /// kebab-case name, as in the protocol and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Identify => "identify",
            Phase::PrepareBackup => "prepare-backup",
            Phase::PrepareSnapshot => "prepare-snapshot",
            Phase::Freeze => "freeze",
            Phase::Thaw => "thaw",
            Phase::PostSnapshot => "post-snapshot",
            Phase::BackupComplete => "backup-complete",
            Phase::Abort => "abort",
        }
    }

    /// Every phase, in order.
    pub const ALL: [Phase; 8] = [
        Phase::Identify,
        Phase::PrepareBackup,
        Phase::PrepareSnapshot,
        Phase::Freeze,
        Phase::Thaw,
        Phase::PostSnapshot,
        Phase::BackupComplete,
        Phase::Abort,
    ];

    /// The phase of a kebab-case name.
    pub fn from_name(name: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|phase| phase.as_str() == name)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a writer failed (VSS's writer error classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorClass {
    /// Try again later (0x800423F3).
    Retryable,
    /// Will not go away by retrying (0x800423F4).
    Nonretryable,
    /// Out of memory, disk or another resource (0x800423F1).
    OutOfResources,
    /// Could not make the data consistent (0x800423F0).
    Inconsistent,
    /// Died or stopped answering (0x80042319).
    NotResponding,
}

impl ErrorClass {
    /// The error code of a failure of this class.
    pub fn code(self) -> ErrorCode {
        match self {
            ErrorClass::Retryable => ErrorCode::WriterRetryable,
            ErrorClass::Nonretryable => ErrorCode::WriterNonretryable,
            ErrorClass::OutOfResources => ErrorCode::WriterOutOfResources,
            ErrorClass::Inconsistent => ErrorCode::WriterInconsistent,
            ErrorClass::NotResponding => ErrorCode::WriterNotResponding,
        }
    }
}

/// A writer's failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct WriterError {
    /// The class.
    pub class: ErrorClass,
    /// The writer's own words.
    pub message: String,
}

impl WriterError {
    /// A failure of `class`.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        WriterError { class, message: message.into() }
    }
}

/// A writer. Calls come from the coordinator's thread, and `Thaw`/`Abort` possibly from its
/// watchdog (never at the same time: the coordinator serializes calls per writer).
pub trait Writer: Send {
    /// Its configured name.
    fn name(&self) -> &str;
    /// Its kind (`command`, `process`, …).
    fn kind(&self) -> &'static str;
    /// The freeze-to-thaw window.
    fn freeze_timeout(&self) -> Duration;
    /// Handles one phase; must return by `deadline`.
    fn handle(&mut self, phase: Phase, deadline: Instant) -> Result<(), WriterError>;

    /// After post-snapshot: what to add to, refresh in, or remove from the copy (a database's
    /// backup label, the log written since the copy, its lock file).
    fn copy_additions(&mut self) -> Vec<CopyAddition> {
        Vec::new()
    }

    /// Undoes what a shadow set that died (its process killed) left this writer in: thaw when it
    /// was left frozen, then abort. The writer was made anew, so it knows only what the dead
    /// set's persisted state says.
    fn recover(&mut self, frozen: bool, deadline: Instant) -> Result<(), WriterError> {
        let thawed = if frozen { self.handle(Phase::Thaw, deadline) } else { Ok(()) };
        let aborted = self.handle(Phase::Abort, deadline);
        thawed.and(aborted)
    }

    /// Where to send what the writer's programs print on stderr, line by line (the job's log).
    /// Writers that run no program ignore it.
    fn set_output(&mut self, output: OutputHook) {
        let _ = output;
    }

    /// The set's stop flag (a signal): a writer whose preparation runs long (a program it
    /// waits for) ends it when the flag is set. Thaw and abort always run to their end.
    fn set_stop(&mut self, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        let _ = stop;
    }
}

/// The set's stop flag as a writer keeps it (unset until the coordinator hands it over): a
/// preparation that waits — for a program, a reply, a lock — looks at it at least every 50 ms.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stop(Option<std::sync::Arc<std::sync::atomic::AtomicBool>>);

/// How a wait for a reply ended without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoReply {
    /// The deadline passed.
    Timeout,
    /// The other end went away.
    Disconnected,
    /// The stop flag was set.
    Stopped,
}

impl Stop {
    /// The slice a wait sleeps before it looks at the flag again.
    const SLICE: Duration = Duration::from_millis(50);

    pub(crate) fn new(flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        Stop(Some(flag))
    }

    /// Whether the set was told to stop.
    pub(crate) fn is_set(&self) -> bool {
        self.0.as_ref().is_some_and(|flag| flag.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// The flag for a phase: only a preparation (identify, prepare-backup, prepare-snapshot)
    /// may be cut short; a freeze, thaw or abort runs to its end.
    pub(crate) fn for_phase(&self, phase: Phase) -> Stop {
        match phase {
            Phase::Identify | Phase::PrepareBackup | Phase::PrepareSnapshot => self.clone(),
            _ => Stop::default(),
        }
    }

    /// Waits for the next message on `receiver` until `deadline` or the flag.
    pub(crate) fn recv<T>(&self, receiver: &std::sync::mpsc::Receiver<T>, deadline: Instant) -> Result<T, NoReply> {
        use std::sync::mpsc::RecvTimeoutError;
        loop {
            if self.is_set() {
                return Err(NoReply::Stopped);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(left.min(Self::SLICE)) {
                Ok(message) => return Ok(message),
                Err(RecvTimeoutError::Disconnected) => return Err(NoReply::Disconnected),
                Err(RecvTimeoutError::Timeout) if left <= Self::SLICE => return Err(NoReply::Timeout),
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Sleeps a slice before a wait tries again; false once the flag is set.
    pub(crate) fn pause(&self) -> bool {
        if self.is_set() {
            return false;
        }
        std::thread::sleep(Self::SLICE);
        !self.is_set()
    }

    /// The failure a preparation ends with when the flag stops it (the coordinator reports the
    /// set as stopped by the signal, not the writer as failed).
    pub(crate) fn error(what: impl std::fmt::Display) -> WriterError {
        WriterError::new(ErrorClass::NotResponding, format!("{what} was stopped by a signal"))
    }
}

/// Told each line a writer's program prints on stderr: the writer's name and the line.
#[derive(Clone)]
pub struct OutputHook(pub std::sync::Arc<OutputFn>);

/// `(writer, line)` of a writer program's output.
pub type OutputFn = dyn Fn(&str, &str) + Send + Sync;

impl std::fmt::Debug for OutputHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputHook(..)")
    }
}

/// The most of one output line kept (for the log and a failure's message); the rest of a
/// longer line is read and dropped, so a program cannot make sysstate hold what it prints.
pub(crate) const LINE_LIMIT: usize = 1024;

/// Reads a writer program's stderr as it comes, on a thread of its own, so a program that
/// prints more than a pipe holds (64 KiB) never blocks on it: each line is logged (`-v` shows
/// it) and told to `output`; the last non-empty one is sent when the pipe closes, for a
/// failure's message. Lines are cut at [`LINE_LIMIT`].
pub(crate) fn read_output(
    pipe: impl std::io::Read + Send + 'static,
    writer: String,
    output: Option<OutputHook>,
) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (sender, receiver) = std::sync::mpsc::channel();
    let tell = move |text: &str| {
        tracing::info!("writer `{writer}`: {text}");
        if let Some(output) = &output {
            (output.0)(&writer, text);
        }
    };
    let spawned = std::thread::Builder::new().name("writer-output".into()).spawn(move || {
        let mut reader = std::io::BufReader::new(pipe);
        let (mut line, mut last) = (Vec::new(), String::new());
        while let Ok(buffer) = reader.fill_buf() {
            if buffer.is_empty() {
                break;
            }
            let (chunk, ends_line) = match buffer.iter().position(|&b| b == b'\n') {
                Some(end) => (&buffer[..end], true),
                None => (buffer, false),
            };
            let room = LINE_LIMIT.saturating_sub(line.len());
            line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            let used = chunk.len() + usize::from(ends_line);
            reader.consume(used);
            if ends_line {
                let text = String::from_utf8_lossy(&line);
                if !text.trim().is_empty() {
                    tell(&text);
                    last = text.into_owned();
                }
                line.clear();
            }
        }
        let text = String::from_utf8_lossy(&line);
        if !text.trim().is_empty() {
            tell(&text);
            last = text.into_owned();
        }
        let _ = sender.send(last);
    });
    if let Err(error) = spawned {
        tracing::warn!("cannot read the output of a writer's program: {error}");
    }
    receiver
}

/// A change a writer asks for in the copy, by absolute path as seen from the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyAddition {
    /// Write this file with these bytes.
    Contents(std::path::PathBuf, Vec<u8>),
    /// Copy this file or folder again from the live system.
    FromLive(std::path::PathBuf),
    /// Leave this out of the copy.
    Remove(std::path::PathBuf),
}

/// The command of a process that thaws the filesystem at `mount` after `window`, run when it is
/// frozen so that it is thawed even if sysstate is killed outright.
pub(crate) fn guardian_command(window: Duration, mount: &std::path::Path) -> std::process::Command {
    let mut command = sysstate_fs::command("sh");
    command
        .arg("-c")
        .arg("sleep \"$1\"; exec fsfreeze --unfreeze \"$2\"")
        .arg("sysstate-thaw-guardian")
        .arg(format!("{:.3}", window.as_secs_f64()))
        .arg(mount);
    command
}

/// Lets a child process whose stdin was closed exit by itself within `grace`, then kills it.
pub(crate) fn end_child(child: &mut std::process::Child, grace: Duration) {
    let until = Instant::now() + grace;
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The default freeze-to-thaw window (DESIGN §4).
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long prepare and the other non-freeze events may take.
pub const DEFAULT_PHASE_TIMEOUT: Duration = Duration::from_secs(60);
