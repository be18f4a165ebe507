//! Speaking to systemd without linking libsystemd: the notify protocol (`READY=1`, `STATUS=`,
//! `WATCHDOG=1`, `STOPPING=1` as datagrams to `$NOTIFY_SOCKET`) and the journal's native
//! protocol (one datagram of `KEY=value` fields to the journal's socket when `$JOURNAL_STREAM`
//! says stderr goes to the journal), so that each line of the agent's log carries its job id and
//! error code as fields (`journalctl SYSSTATE_JOB=…`).

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Where the notify socket is, if systemd gave one.
fn notify_address() -> Option<std::os::unix::net::SocketAddr> {
    let path = std::env::var_os("NOTIFY_SOCKET")?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name).ok()
        }
        None => std::os::unix::net::SocketAddr::from_pathname(PathBuf::from(path)).ok(),
    }
}

/// Sends `state` (`READY=1\nSTATUS=…`) to systemd; nothing when not run by systemd.
pub fn notify(state: &str) {
    let Some(address) = notify_address() else { return };
    if let Ok(socket) = UnixDatagram::unbound() {
        let _ = socket.send_to_addr(state.as_bytes(), &address);
    }
}

/// How often systemd wants `WATCHDOG=1` (half its `WatchdogSec=`), if it does.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok()) {
        if pid != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// The journal's socket, when stderr goes to the journal.
fn journal_socket() -> Option<PathBuf> {
    std::env::var_os("JOURNAL_STREAM")?;
    let path = sysstate_types::failpoint::<String>("JOURNAL_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/systemd/journal/socket"));
    path.exists().then_some(path)
}

/// A line of the agent's log: to the journal with its fields when stderr goes there, else to
/// stderr. `priority` is syslog's (3 error, 4 warning, 6 info).
pub fn log(priority: u8, message: &str, fields: &[(&str, &str)]) {
    if let Some(socket) = journal_socket() {
        let mut datagram = format!("PRIORITY={priority}\nSYSLOG_IDENTIFIER=sysstate-agent\n").into_bytes();
        for (key, value) in [("MESSAGE", message)].iter().chain(fields) {
            datagram.extend_from_slice(key.as_bytes());
            if value.contains('\n') {
                // The binary form: the key, a newline, the length (64-bit little endian), the value.
                datagram.push(b'\n');
                datagram.extend_from_slice(&(value.len() as u64).to_le_bytes());
            } else {
                datagram.push(b'=');
            }
            datagram.extend_from_slice(value.as_bytes());
            datagram.push(b'\n');
        }
        if UnixDatagram::unbound().and_then(|s| s.send_to(&datagram, &socket)).is_ok() {
            return;
        }
    }
    sysstate_engine::errln!("sysstate agent: {message}");
}
