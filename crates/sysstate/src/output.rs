//! Printing: errors as `error[code]: …` with cause and resolution lines, JSON when asked.

use sysstate_engine::EngineError;

/// Installs the log subscriber: warnings by default, more with -v, errors only with --quiet.
pub fn init_tracing(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SYSSTATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour only for a terminal: a log file or a journal gets plain text.
    // Colour only for a person at a terminal who did not ask for none (https://no-color.org).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

/// The `error` object of JSON output (DESIGN §4).
pub fn error_json(error: &EngineError) -> serde_json::Value {
    serde_json::json!({
        "code": error.code.as_str(),
        "event-id": error.code.event_id(),
        "message": error.message,
        "cause": error.cause(),
        "resolution": error.resolution(),
    })
}

/// Prints a failure: `{"error": …}` on stdout with `--json`, and always the text on stderr.
pub fn print_error(error: &EngineError, json: bool) {
    if json {
        print_json(&serde_json::json!({ "error": error_json(error) }));
    }
    print_error_text(error);
}

/// `error[code]: message`, then the cause and resolution lines, on stderr.
pub fn print_error_text(error: &EngineError) {
    sysstate_engine::errln!("error[{}]: {}", error.code, error.message);
    sysstate_engine::errln!("  cause: {}", error.cause());
    sysstate_engine::errln!("  resolution: {}", error.resolution());
    if let Some(note) = not_root_note(&error.message) {
        sysstate_engine::errln!("  note: {note}");
    }
}

/// For a permission refused to a user who is not root: most commands read or write system
/// files, and the message alone does not say that sysstate expected root.
fn not_root_note(message: &str) -> Option<String> {
    let uid = rustix::process::geteuid();
    (!uid.is_root() && (message.contains("Permission denied") || message.contains("Operation not permitted"))).then(
        || {
            format!(
                "sysstate runs as uid {}: backups and restores of system state read and write files only root may (run it with `sudo`, or as the service)",
                uid.as_raw()
            )
        },
    )
}

/// Prints a JSON value.
pub fn print_json(value: &serde_json::Value) {
    crate::outln!("{}", serde_json::to_string_pretty(value).expect("JSON encodes"));
}

/// `println!` that lets a closed stdout go (`sysstate items | head -1`): the rest of the output
/// is dropped and the command finishes as it would have, instead of panicking on the broken pipe.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub use sysstate_types::units::bytes;

/// A progress bar on stderr for a long operation (backup, restore, check, prune): bytes, rate
/// and, when the total is known, a bar and the time left. Drawn only on a terminal and never
/// with `--quiet` or `--json`; otherwise every call is a no-op.
#[derive(Debug)]
pub struct Bar(Option<indicatif::ProgressBar>);

const SPINNER: &str = "{prefix} {spinner} {bytes} {binary_bytes_per_sec} {elapsed}";
const BAR: &str = "{prefix} [{bar:30}] {percent:>3}% {bytes}/{total_bytes} {binary_bytes_per_sec}, {eta} left";

fn style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template).expect("the templates are valid").progress_chars("=> ")
}

impl Bar {
    /// A bar for `what` (`backing up`): a spinner with bytes and rate until the total is known
    /// ([`Bar::set`]), then a bar with the time left.
    pub fn new(show: bool, what: &str) -> Bar {
        use std::io::IsTerminal;
        if !show || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(style(SPINNER));
        bar.set_prefix(what.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Bar(Some(bar))
    }

    /// `bytes` more are done.
    pub fn add(&self, bytes: u64) {
        if let Some(bar) = &self.0 {
            bar.inc(bytes);
        }
    }

    /// `done` of `total` bytes are done.
    pub fn set(&self, done: u64, total: u64) {
        if let Some(bar) = &self.0 {
            if total > 0 && bar.length() == Some(0) {
                bar.set_style(style(BAR));
            }
            bar.set_length(total);
            bar.set_position(done);
        }
    }

    /// The total became known (a first backup counts its selection while it reads): the bar
    /// keeps its position.
    pub fn set_total(&self, total: u64) {
        if let Some(bar) = &self.0 {
            self.set(bar.position(), total);
        }
    }

    /// Prints a line above the bar.
    pub fn println(&self, line: &str) {
        match &self.0 {
            Some(bar) => bar.suspend(|| sysstate_engine::errln!("{line}")),
            None => sysstate_engine::errln!("{line}"),
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// The caller's side of a job's progress: draws the bar and prints warnings as they come (not
/// with `--quiet` or `--json`). The job runner feeds the job store itself.
#[derive(Debug)]
pub struct Printer {
    show: bool,
    bar: Bar,
}

impl Printer {
    /// For an operation that says `what` (`backing up`).
    pub fn new(show: bool, what: &str) -> Printer {
        Printer { show, bar: Bar::new(show, what) }
    }
}

impl sysstate_repo::Progress for Printer {
    fn file_done(&self, bytes: u64) {
        self.bar.add(bytes);
    }

    fn warning(&self, warning: &sysstate_repo::Warning) {
        if self.show {
            self.bar.println(&format!("warning: `{}` {}", warning.path, warning.message));
        }
    }

    fn total(&self, bytes: u64) {
        self.bar.set_total(bytes);
    }

    fn bytes(&self, done: u64, total: u64) {
        self.bar.set(done, total);
    }
}
