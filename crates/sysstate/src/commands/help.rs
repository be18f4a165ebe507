//! `sysstate completions SHELL` and `sysstate man`: made from the CLI's own definition, so they
//! never drift from it.

use super::Outcome;
use crate::cli::Cli;
use clap::CommandFactory;
use sysstate_engine::{EngineError, ErrorCode, Result};

pub fn completions(shell: clap_complete::Shell) -> Result<Outcome> {
    // Made in memory and printed through `outln!`: a closed pipe (`| head`) is no panic.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "sysstate", &mut script);
    crate::outln!("{}", String::from_utf8_lossy(&script).trim_end());
    Ok(Outcome::Success)
}

pub fn man() -> Result<Outcome> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .section("8")
        .render(&mut page)
        .map_err(|e| EngineError::new(ErrorCode::Internal, format!("cannot render the manual page: {e}")))?;
    crate::outln!("{}", String::from_utf8_lossy(&page));
    Ok(Outcome::Success)
}
