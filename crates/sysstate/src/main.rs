//! The `sysstate` command: argument parsing, passphrases, printing, exit codes. Everything else
//! lives in the library crates.

mod cli;
mod commands;
mod output;
mod passphrase;

use clap::Parser;

fn main() {
    sysstate_fs::private_umask();
    let cli = cli::Cli::parse();
    output::init_tracing(cli.global.verbose, cli.global.quiet);
    let code = match commands::run(&cli) {
        Ok(outcome) => outcome.exit_code(),
        Err(error) => {
            output::print_error(&error, cli.global.json);
            2
        }
    };
    std::process::exit(code);
}
