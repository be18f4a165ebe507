//! Passphrases: found (environment, file, the state directory's key file), asked for on the
//! terminal, or — for a new repository with none given — generated and kept.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use sysstate_engine::{credentials, paths, EngineError, ErrorCode, Result};

/// The passphrase of the repository at `target`: environment, file, the state directory's key
/// file, or a prompt when a terminal is there to ask on (never with `--quiet`).
pub fn find(target: &str, passphrase_file: Option<&Path>, quiet: bool) -> Result<Option<Vec<u8>>> {
    if let Some(found) = credentials::find(target, passphrase_file, &paths::state_dir())? {
        return Ok(Some(found));
    }
    if !quiet && std::io::stdin().is_terminal() {
        return prompt(&format!("passphrase for `{target}`: ")).map(Some);
    }
    Ok(None)
}

/// Like [`find`], but a missing passphrase is an error that says how to give one.
pub fn require(target: &str, passphrase_file: Option<&Path>, quiet: bool) -> Result<Vec<u8>> {
    find(target, passphrase_file, quiet)?.ok_or_else(|| {
        EngineError::new(ErrorCode::WrongPassphrase, format!("no passphrase for the repository at `{target}`"))
            .with_cause("no passphrase was given and there is no terminal to ask on")
            .with_resolution("set `SYSSTATE_PASSPHRASE`, or pass `--passphrase-file FILE`")
    })
}

/// The passphrase for a backup: as [`find`]; for a target with no repository yet and none given,
/// a random key generated and kept in the state directory (the note says where).
pub fn for_backup(target: &str, passphrase_file: Option<&Path>, quiet: bool) -> Result<Vec<u8>> {
    if let Some(passphrase) = find(target, passphrase_file, quiet)? {
        return Ok(passphrase);
    }
    if sysstate_engine::ops::exists(target)? {
        return require(target, passphrase_file, quiet);
    }
    let (passphrase, path) = credentials::generate(target, &paths::state_dir())?;
    eprintln!(
        "note: no passphrase was given, so the new repository at `{target}` is protected by a random key kept in `{}` (mode 0600). Keep a copy of that file somewhere safe: without it the backups cannot be read.",
        path.display()
    );
    Ok(passphrase)
}

/// A new passphrase: `SYSSTATE_NEW_PASSPHRASE`, the file, or asked twice on the terminal.
pub fn new(file: Option<&Path>) -> Result<Vec<u8>> {
    if let Some(value) = std::env::var_os("SYSSTATE_NEW_PASSPHRASE") {
        return Ok(std::os::unix::ffi::OsStrExt::as_bytes(value.as_os_str()).to_vec());
    }
    match file {
        Some(path) => credentials::read_passphrase_file(path),
        None if std::io::stdin().is_terminal() => {
            let first = prompt("new passphrase: ")?;
            if prompt("again: ")? != first {
                return Err(EngineError::new(ErrorCode::InvalidInput, "the two passphrases differ"));
            }
            Ok(first)
        }
        None => Err(EngineError::new(ErrorCode::InvalidInput, "no new passphrase given")
            .with_resolution("set `SYSSTATE_NEW_PASSPHRASE` or pass `--new-passphrase-file FILE`")),
    }
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
