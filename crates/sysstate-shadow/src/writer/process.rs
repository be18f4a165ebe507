use super::{read_output, ErrorClass, NoReply, OutputHook, Phase, Stop, Writer, WriterError};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A long-running writer process speaking JSON lines on stdin/stdout
/// (`docs/writer-protocol.md`). It is started at identify and ends after backup-complete or
/// abort; a process that exits or does not answer by the deadline is `writer-not-responding`.
#[derive(Debug)]
pub struct ProcessWriter {
    name: String,
    argv: Vec<String>,
    freeze_timeout: Duration,
    running: Option<Running>,
    set_id: String,
    output: Option<OutputHook>,
    stop: Stop,
}

#[derive(Debug)]
struct Running {
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<String>,
}

/// A request line.
#[derive(Debug, Serialize)]
struct Request<'a> {
    /// The phase, under the protocol's name for it.
    event: &'a str,
    set: &'a str,
}

/// A reply line.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Reply {
    result: String,
    class: Option<ErrorClass>,
    message: Option<String>,
}

impl ProcessWriter {
    /// A writer that runs `argv`.
    pub fn new(name: &str, argv: Vec<String>, freeze_timeout: Duration, set_id: &str) -> Self {
        ProcessWriter {
            name: name.into(),
            argv,
            freeze_timeout,
            running: None,
            set_id: set_id.into(),
            output: None,
            stop: Stop::default(),
        }
    }

    fn start(&mut self) -> Result<(), WriterError> {
        let (program, args) = self
            .argv
            .split_first()
            .ok_or_else(|| WriterError::new(ErrorClass::Nonretryable, "the writer command is empty"))?;
        let mut child = sysstate_fs::command(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| WriterError::new(ErrorClass::NotResponding, format!("cannot start `{program}`: {e}")))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        // Its stderr goes to the job's log, line by line, for as long as it runs.
        let _ = read_output(child.stderr.take().expect("stderr is piped"), self.name.clone(), self.output.clone());
        let stdin = child.stdin.take().expect("stdin is piped");
        let (tx, replies) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("writer-{}", self.name))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| WriterError::new(ErrorClass::NotResponding, e.to_string()))?;
        self.running = Some(Running { child, stdin, replies });
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut running) = self.running.take() {
            // End of input asks it to exit; it gets a moment before it is killed.
            drop(running.stdin);
            super::end_child(&mut running.child, Duration::from_secs(2));
        }
    }

    fn exchange(&mut self, phase: Phase, deadline: Instant) -> Result<(), WriterError> {
        let running = self
            .running
            .as_mut()
            .ok_or_else(|| WriterError::new(ErrorClass::NotResponding, "the writer process is not running"))?;
        let line =
            serde_json::to_string(&Request { event: phase.as_str(), set: &self.set_id }).expect("requests encode");
        let gone = |running: &mut Running| {
            let status = running
                .child
                .try_wait()
                .ok()
                .flatten()
                .map(|s| s.to_string())
                .unwrap_or_else(|| "still running".into());
            WriterError::new(
                ErrorClass::NotResponding,
                format!(
                    "the writer process `{}` stopped answering at {} ({status})",
                    self_argv(&running.child),
                    phase.as_str()
                ),
            )
        };
        if writeln!(running.stdin, "{line}").and_then(|_| running.stdin.flush()).is_err() {
            return Err(gone(running));
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        let stop = self.stop.for_phase(phase);
        let reply = match stop.recv(&running.replies, deadline) {
            Ok(reply) => reply,
            Err(NoReply::Timeout) => {
                return Err(WriterError::new(
                    ErrorClass::NotResponding,
                    format!("the writer process did not answer {} within {} ms", phase.as_str(), wait.as_millis()),
                ));
            }
            // Like any writer that does not answer, it is ended (its input closed): the
            // protocol's end of input, on which it undoes what it began.
            Err(NoReply::Stopped) => {
                return Err(Stop::error(format_args!("waiting for the writer process's {}", phase.as_str())));
            }
            Err(NoReply::Disconnected) => return Err(gone(running)),
        };
        let reply: Reply = serde_json::from_str(&reply).map_err(|e| {
            WriterError::new(
                ErrorClass::NotResponding,
                format!(
                    "the writer process answered {} with a line that is not a reply ({e}): {reply}",
                    phase.as_str()
                ),
            )
        })?;
        match reply.result.as_str() {
            "ok" => Ok(()),
            _ => Err(WriterError::new(
                reply.class.unwrap_or(ErrorClass::Nonretryable),
                reply.message.unwrap_or_else(|| "no message".into()),
            )),
        }
    }
}

fn self_argv(child: &Child) -> String {
    format!("pid {}", child.id())
}

impl Writer for ProcessWriter {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "process"
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
        if phase == Phase::Identify && self.running.is_none() {
            self.start()?;
        }
        let result = self.exchange(phase, deadline);
        if matches!(phase, Phase::BackupComplete | Phase::Abort)
            || result.as_ref().is_err_and(|e| e.class == ErrorClass::NotResponding)
        {
            self.stop();
        }
        result
    }
}

impl Drop for ProcessWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// A signal ends the wait for a slow prepare-backup: the writer's input is closed at once
    /// (the protocol's end, on which it undoes what it began) and it exits or is killed within
    /// the 2 s grace; the late reply is never taken for another request's.
    #[test]
    fn a_signal_ends_the_wait_for_a_writer_process_and_closes_its_input() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("writer.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\nwhile read -r line; do\n  case \"$line\" in\n    *prepare-backup*) sleep 1; echo '{\"result\":\"ok\"}' ;;\n    *abort*) echo '{\"result\":\"error\",\"class\":\"nonretryable\",\"message\":\"abort seen\"}' ;;\n    *) echo '{\"result\":\"ok\"}' ;;\n  esac\ndone\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut writer = ProcessWriter::new("w", vec![script.display().to_string()], Duration::from_secs(5), "set");
        let stop = Arc::new(AtomicBool::new(false));
        writer.set_stop(stop.clone());
        let deadline = || Instant::now() + Duration::from_secs(10);
        writer.handle(Phase::Identify, deadline()).unwrap();
        let flag = stop.clone();
        let signal = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let started = Instant::now();
        let error = writer.handle(Phase::PrepareBackup, deadline()).unwrap_err();
        signal.join().unwrap();
        // The script sleeps 1 s before it reads its end of input and exits: less than the
        // deadline's 10 s, less than the grace's 2 s beyond it.
        assert!(started.elapsed() < Duration::from_secs(2), "the wait was not ended: {:?}", started.elapsed());
        assert!(error.message.contains("stopped by a signal"), "{}", error.message);
        assert!(writer.running.is_none(), "the writer process was left running");
        let error = writer.handle(Phase::Abort, deadline()).unwrap_err();
        assert_eq!(error.class, ErrorClass::NotResponding, "{}", error.message);
    }
}
