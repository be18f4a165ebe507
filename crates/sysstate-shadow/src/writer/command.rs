use super::{ErrorClass, Event, Writer, WriterError};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A writer made of commands: optional `prepare`, `freeze`, `thaw` and `abort`. A command that
/// exits 75 (`EX_TEMPFAIL`) is a retryable failure, any other non-zero exit a non-retryable one;
/// its last line of stderr is the message. A command still running at its deadline is killed.
#[derive(Debug)]
pub struct CommandWriter {
    name: String,
    prepare: Option<Vec<String>>,
    freeze: Option<Vec<String>>,
    thaw: Option<Vec<String>>,
    abort: Option<Vec<String>>,
    freeze_timeout: Duration,
    frozen: bool,
}

impl CommandWriter {
    /// A writer from its commands.
    pub fn new(
        name: &str,
        prepare: Option<Vec<String>>,
        freeze: Option<Vec<String>>,
        thaw: Option<Vec<String>>,
        abort: Option<Vec<String>>,
        freeze_timeout: Duration,
    ) -> Self {
        CommandWriter { name: name.into(), prepare, freeze, thaw, abort, freeze_timeout, frozen: false }
    }
}

/// Runs `argv` until it exits or `deadline` passes (then it is killed).
pub(crate) fn run(argv: &[String], deadline: Instant, what: &str) -> Result<(), WriterError> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| WriterError::new(ErrorClass::Nonretryable, format!("the {what} command is empty")))?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            WriterError::new(ErrorClass::Nonretryable, format!("cannot run the {what} command `{program}`: {e}"))
        })?;
    loop {
        if let Some(status) =
            child.try_wait().map_err(|e| WriterError::new(ErrorClass::NotResponding, e.to_string()))?
        {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            if status.success() {
                return Ok(());
            }
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
            let class = if status.code() == Some(75) { ErrorClass::Retryable } else { ErrorClass::Nonretryable };
            return Err(WriterError::new(
                class,
                format!(
                    "the {what} command `{}` failed ({status}){}",
                    argv.join(" "),
                    if last.is_empty() { String::new() } else { format!(": {last}") }
                ),
            ));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(WriterError::new(
                ErrorClass::NotResponding,
                format!("the {what} command `{}` was still running at its deadline and was killed", argv.join(" ")),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Writer for CommandWriter {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "command"
    }

    fn freeze_timeout(&self) -> Duration {
        self.freeze_timeout
    }

    fn handle(&mut self, event: Event, deadline: Instant) -> Result<(), WriterError> {
        let command = match event {
            Event::PrepareBackup => self.prepare.as_ref(),
            Event::Freeze => {
                self.frozen = true;
                self.freeze.as_ref()
            }
            Event::Thaw => {
                self.frozen = false;
                self.thaw.as_ref()
            }
            Event::Abort => {
                // An abort during the freeze thaws first.
                if std::mem::take(&mut self.frozen) {
                    if let Some(thaw) = &self.thaw {
                        run(thaw, deadline, "thaw")?;
                    }
                }
                self.abort.as_ref()
            }
            Event::Identify | Event::PrepareSnapshot | Event::PostSnapshot | Event::BackupComplete => None,
        };
        match command {
            Some(argv) => run(argv, deadline, event.as_str()),
            None => Ok(()),
        }
    }
}
