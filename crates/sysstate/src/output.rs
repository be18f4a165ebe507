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
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
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
    eprintln!("error[{}]: {}", error.code, error.message);
    eprintln!("  cause: {}", error.cause());
    eprintln!("  resolution: {}", error.resolution());
}

/// Prints a JSON value.
pub fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON encodes"));
}

/// `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
