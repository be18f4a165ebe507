use super::{read_output, ErrorClass, OutputHook, Phase, Stop, Writer, WriterError};
use std::process::Stdio;
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
    output: Option<OutputHook>,
    /// Ends a preparing command early (a signal).
    stop: Stop,
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
        CommandWriter {
            name: name.into(),
            prepare,
            freeze,
            thaw,
            abort,
            freeze_timeout,
            frozen: false,
            output: None,
            stop: Stop::default(),
        }
    }
}

/// Runs `argv` until it exits, `deadline` passes or `stop` is set (then it is killed); its
/// stderr goes to `output` as writer `writer`'s.
fn run(
    argv: &[String],
    deadline: Instant,
    what: &str,
    writer: &str,
    output: Option<&OutputHook>,
    stop: &Stop,
) -> Result<(), WriterError> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| WriterError::new(ErrorClass::Nonretryable, format!("the {what} command is empty")))?;
    let mut child = sysstate_fs::command(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            WriterError::new(ErrorClass::Nonretryable, format!("cannot run the {what} command `{program}`: {e}"))
        })?;
    let last_line = read_output(child.stderr.take().expect("stderr is piped"), writer.to_string(), output.cloned());
    loop {
        if let Some(status) =
            child.try_wait().map_err(|e| WriterError::new(ErrorClass::NotResponding, e.to_string()))?
        {
            if status.success() {
                return Ok(());
            }
            // A child the command left running may hold the pipe open: its last line is not
            // worth waiting long for.
            let last = last_line.recv_timeout(Duration::from_millis(500)).unwrap_or_default();
            let last = last.trim();
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
        if stop.is_set() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Stop::error(format_args!("the {what} command `{}`", argv.join(" "))));
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

    fn set_output(&mut self, output: OutputHook) {
        self.output = Some(output);
    }

    fn set_stop(&mut self, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.stop = Stop::new(stop);
    }

    fn handle(&mut self, phase: Phase, deadline: Instant) -> Result<(), WriterError> {
        let command = match phase {
            Phase::PrepareBackup => self.prepare.as_ref(),
            Phase::Freeze => {
                self.frozen = true;
                self.freeze.as_ref()
            }
            Phase::Thaw => {
                self.frozen = false;
                self.thaw.as_ref()
            }
            Phase::Abort => {
                // An abort during the freeze thaws first.
                if std::mem::take(&mut self.frozen) {
                    if let Some(thaw) = &self.thaw {
                        run(thaw, deadline, "thaw", &self.name, self.output.as_ref(), &Stop::default())?;
                    }
                }
                self.abort.as_ref()
            }
            Phase::Identify | Phase::PrepareSnapshot | Phase::PostSnapshot | Phase::BackupComplete => None,
        };
        match command {
            Some(argv) => {
                run(argv, deadline, phase.as_str(), &self.name, self.output.as_ref(), &self.stop.for_phase(phase))
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::LINE_LIMIT;
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn a_command_that_prints_more_than_a_pipe_holds_is_not_reported_as_hung() {
        // 256 KiB on stderr, four times what a pipe holds: read only after the exit, the command
        // blocks on its write and is killed at the deadline.
        let script = "head -c 262144 /dev/zero | tr '\\0' x >&2; exit 0";
        let deadline = Instant::now() + Duration::from_secs(10);
        let started = Instant::now();
        run(&sh(script), deadline, "freeze", "w", None, &Stop::default()).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    }

    #[test]
    fn a_failure_says_the_last_line_of_stderr_and_its_class() {
        let deadline = Instant::now() + Duration::from_secs(10);
        let error = run(
            &sh("echo noise >&2; echo 'database busy' >&2; echo >&2; exit 75"),
            deadline,
            "freeze",
            "w",
            None,
            &Stop::default(),
        )
        .unwrap_err();
        assert_eq!(error.class, ErrorClass::Retryable);
        assert!(error.message.ends_with(": database busy"), "{}", error.message);
        let error = run(&sh("exit 3"), deadline, "thaw", "w", None, &Stop::default()).unwrap_err();
        assert_eq!(error.class, ErrorClass::Nonretryable);
    }

    #[test]
    fn an_endless_stderr_line_is_cut_not_kept() {
        // 8 MiB with no newline, then the reason: the message keeps at most a line's limit.
        let script = "head -c 8388608 /dev/zero | tr '\\0' x >&2; echo >&2; echo 'disk busy' >&2; head -c 8388608 /dev/zero | tr '\\0' y >&2; exit 1";
        let deadline = Instant::now() + Duration::from_secs(20);
        let error = run(&sh(script), deadline, "freeze", "w", None, &Stop::default()).unwrap_err();
        assert_eq!(error.class, ErrorClass::Nonretryable);
        assert!(error.message.len() < 2 * LINE_LIMIT, "a message of {} bytes", error.message.len());
        assert!(error.message.ends_with(&"y".repeat(100)), "the last line, cut: {}", &error.message[..200]);
        let error =
            run(&sh("echo 'disk busy' >&2; exit 1"), deadline, "freeze", "w", None, &Stop::default()).unwrap_err();
        assert!(error.message.ends_with(": disk busy"), "{}", error.message);
    }

    #[test]
    fn a_command_still_running_at_its_deadline_is_killed() {
        let deadline = Instant::now() + Duration::from_millis(300);
        let error = run(&sh("sleep 30"), deadline, "freeze", "w", None, &Stop::default()).unwrap_err();
        assert_eq!(error.class, ErrorClass::NotResponding);
    }

    #[test]
    fn what_a_command_prints_reaches_the_output_hook_as_its_writer_s() {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = lines.clone();
        let hook = OutputHook(std::sync::Arc::new(move |writer: &str, line: &str| {
            seen.lock().unwrap().push(format!("{writer}: {line}"));
        }));
        let mut writer = CommandWriter::new(
            "db",
            Some(sh("echo flushing >&2; echo done >&2")),
            None,
            None,
            None,
            Duration::from_secs(5),
        );
        writer.set_output(hook);
        writer.handle(Phase::PrepareBackup, Instant::now() + Duration::from_secs(10)).unwrap();
        // The reader thread may still be telling the last line.
        let until = Instant::now() + Duration::from_secs(5);
        while lines.lock().unwrap().len() < 2 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(*lines.lock().unwrap(), ["db: flushing", "db: done"]);
    }
}
