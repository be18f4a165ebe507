//! Passphrases: found (environment, file, the state directory's key file), asked for on the
//! terminal, or — for a new repository with none given — generated and kept.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use sysstate_engine::{credentials, paths, EngineError, ErrorCode, Result};

/// The passphrase of the repository at `target`: file, environment, the state directory's key
/// file, or a prompt when a terminal is there to ask on (never with `--quiet`).
pub fn find(target: &str, passphrase_file: Option<&Path>, quiet: bool) -> Result<Option<Vec<u8>>> {
    if let Some(found) = credentials::find(target, passphrase_file, &paths::state_dir())? {
        return Ok(Some(found));
    }
    if !quiet && std::io::stdin().is_terminal() {
        let given = prompt(&format!("passphrase for `{target}`: "))?;
        return credentials::not_empty(given, "the passphrase typed").map(Some);
    }
    Ok(None)
}

/// Like [`find`], but a missing passphrase is an error that says how to give one.
pub fn require(target: &str, passphrase_file: Option<&Path>, quiet: bool) -> Result<Vec<u8>> {
    find(target, passphrase_file, quiet)?.ok_or_else(|| credentials::missing(target, &paths::state_dir()))
}

/// The passphrase for a backup: as [`find`]; for a target with no repository yet and none given,
/// a random key generated and kept in the state directory (the backup's note says where; true
/// when it was generated now).
pub fn for_backup(target: &str, passphrase_file: Option<&Path>, quiet: bool) -> Result<(Vec<u8>, bool)> {
    if let Some(found) = credentials::find(target, passphrase_file, &paths::state_dir())? {
        return Ok((found, false));
    }
    if !quiet && std::io::stdin().is_terminal() {
        if sysstate_engine::ops::exists(target)? {
            let given = prompt(&format!("passphrase for `{target}`: "))?;
            return credentials::not_empty(given, "the passphrase typed").map(|given| (given, false));
        }
        // A new repository: the passphrase is asked twice, so a typo does not lock it forever.
        let first = credentials::not_empty(
            prompt(&format!("passphrase for the new repository at `{target}`: "))?,
            "the passphrase typed",
        )?;
        if prompt("again: ")? != first {
            return Err(EngineError::new(ErrorCode::InvalidInput, "the two passphrases differ: nothing was created")
                .with_resolution("run the backup again and type the same passphrase twice"));
        }
        return Ok((first, false));
    }
    credentials::unattended(target, passphrase_file, &paths::state_dir())
}

/// A new passphrase: the file, `SYSSTATE_NEW_PASSPHRASE`, or asked twice on the terminal.
pub fn new(file: Option<&Path>) -> Result<Vec<u8>> {
    if let Some(path) = file {
        return credentials::read_passphrase_file(path);
    }
    if let Some(value) = std::env::var_os("SYSSTATE_NEW_PASSPHRASE") {
        let value = std::os::unix::ffi::OsStrExt::as_bytes(value.as_os_str()).to_vec();
        return credentials::not_empty(value, "`SYSSTATE_NEW_PASSPHRASE`");
    }
    if !std::io::stdin().is_terminal() {
        return Err(EngineError::new(ErrorCode::InvalidInput, "no new passphrase given")
            .with_resolution("set `SYSSTATE_NEW_PASSPHRASE` or pass `--new-passphrase-file FILE`"));
    }
    let first = credentials::not_empty(prompt("new passphrase: ")?, "the passphrase typed")?;
    if prompt("again: ")? != first {
        return Err(EngineError::new(ErrorCode::InvalidInput, "the two passphrases differ"));
    }
    Ok(first)
}

/// Asks on the terminal with echo off.
fn prompt(text: &str) -> Result<Vec<u8>> {
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|e| EngineError::new(ErrorCode::WrongPassphrase, format!("cannot open the terminal: {e}")))?;
    let saved = rustix::termios::tcgetattr(&tty).ok();
    if let Some(mut quiet) = saved.clone() {
        quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
        let _ = rustix::termios::tcsetattr(&tty, rustix::termios::OptionalActions::Now, &quiet);
    }
    let mut writer = &tty;
    let _ = write!(writer, "{text}");
    let _ = writer.flush();
    let mut line = String::new();
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    if let Some(saved) = saved {
        let _ = rustix::termios::tcsetattr(&tty, rustix::termios::OptionalActions::Now, &saved);
    }
    let _ = writeln!(writer);
    read.map_err(|e| EngineError::new(ErrorCode::WrongPassphrase, format!("cannot read the passphrase: {e}")))?;
    Ok(line.trim_end_matches(['\n', '\r']).as_bytes().to_vec())
}

/// Tells where the random key of a new repository was kept, and that it must be kept safe.
pub fn note_generated_key(target: &str, key: &Path) {
    sysstate_engine::errln!(
        "note: no passphrase was given, so the new repository at `{target}` is protected by a random key kept in `{}` (mode 0600). Keep a copy of that file somewhere safe: without it the backups cannot be read. It works as `--passphrase-file`.",
        key.display()
    );
}
