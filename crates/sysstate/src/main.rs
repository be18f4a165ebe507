//! The `sysstate` command: argument parsing, passphrases, printing, exit codes. Everything else
//! lives in the library crates.

mod cli;
mod commands;
mod output;
mod passphrase;

use clap::Parser;

/// glibc gives each thread that allocates its own arena (up to eight per core) and, after the
/// first large buffer is freed, serves buffers of that size from them, where they stay after
/// they are freed: with eight fetchers and four uploaders moving 8 MiB packs, a restore from
/// object storage peaked at 346 MiB of which about half was such free memory. Two arenas and
/// buffers of 1 MiB and more always mapped (and unmapped when freed): 174 MiB, as fast (measured
/// with `MALLOC_ARENA_MAX` and `MALLOC_MMAP_THRESHOLD_`, which still override this).
fn bound_the_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |variable: &str| std::env::var_os(variable).is_some();
        // SAFETY: mallopt only changes the allocator's parameters, before any other thread runs.
        unsafe {
            if !set("MALLOC_ARENA_MAX") {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
            if !set("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
            }
        }
    }
}

fn main() {
    sysstate_fs::private_umask();
    bound_the_allocator();
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
