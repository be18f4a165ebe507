//! One module per topic; each command resolves its options, calls the engine (through the job
//! runner for the operations that are jobs), and prints what comes back.

mod agent;
mod backup;
mod doctor;
mod help;
mod jobs;
mod keys;
mod read;
mod recover;
mod restore;
mod shadow;
mod upkeep;
mod vault;

use crate::cli::{Cli, Command};
use crate::output::Printer;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use sysstate_engine::config::Config;
use sysstate_engine::jobs::{Job, JobKind, JobOutput, JobStore};
use sysstate_engine::{paths, Result};
use sysstate_repo::{DamageHook, Repository};

/// How a command ended.
pub enum Outcome {
    Success,
    Warnings,
    /// A failure already printed (with `--json`, inside the command's one JSON document).
    Failed,
}

impl Outcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Success => 0,
            Outcome::Warnings => 1,
            Outcome::Failed => 2,
        }
    }

    /// Success, or Warnings when there are some.
    pub fn warned(warnings: usize) -> Outcome {
        if warnings == 0 {
            Outcome::Success
        } else {
            Outcome::Warnings
        }
    }
}

/// What every command sees: the options, the config, the target.
pub struct Context<'a> {
    pub cli: &'a Cli,
    pub config: Config,
    pub target: String,
    /// Damaged repository files passed over so far (each printed as a warning).
    passed_over: Arc<AtomicUsize>,
}

impl Context<'_> {
    /// Prints a line of text output (not with `--quiet` or `--json`).
    pub fn say(&self, text: impl AsRef<str>) {
        if self.shows_text() {
            crate::outln!("{}", text.as_ref());
        }
    }

    /// True when text output is wanted.
    pub fn shows_text(&self) -> bool {
        !self.cli.global.quiet && !self.cli.global.json
    }

    fn json(&self) -> bool {
        self.cli.global.json
    }

    /// The passphrase of the target, or an error saying how to give one.
    fn passphrase(&self) -> Result<Vec<u8>> {
        let global = &self.cli.global;
        crate::passphrase::require(&self.target, global.passphrase_file.as_deref(), global.quiet)
    }

    /// Opens the target's repository with its index loaded. Each damaged file it passes over is
    /// a warning on stderr (with `--quiet` too), and in `job`'s events when there is one.
    fn open(&self, job: Option<&Job<'_>>) -> Result<Repository> {
        let printed = self.damage_printer();
        let hook = match job {
            Some(job) => job.damage_hook(Some(printed)),
            None => printed,
        };
        Ok(sysstate_engine::ops::open_with(&self.target, &self.passphrase()?, hook, &self.config)?
            .without_lock(self.cli.global.no_lock))
    }

    /// Says that the repository was read without a lease, and why.
    fn note_unleased(&self, why: Option<&String>) {
        if let (Some(why), false) = (why, self.cli.global.quiet) {
            sysstate_engine::errln!("note: read without a lease: {why}; a prune elsewhere could remove what is read");
        }
    }

    /// Opens the target's repository with its index loaded, for a command that reports damage
    /// itself (`check`, `repair`): read from the repository itself, never through the cache.
    fn open_unhooked(&self) -> Result<Repository> {
        Ok(sysstate_engine::ops::open(&self.target, &self.passphrase()?)?
            .with_connections(self.config.connections()?)
            .without_lock(self.cli.global.no_lock))
    }

    /// Success, or warnings when there are `warnings` or damaged files were passed over.
    pub fn warned(&self, warnings: usize) -> Outcome {
        Outcome::warned(warnings + self.passed_over.load(Ordering::Relaxed))
    }

    /// Prints a damaged file passed over, and counts it.
    pub fn damage_printer(&self) -> DamageHook {
        let passed_over = self.passed_over.clone();
        DamageHook(Arc::new(move |damaged| {
            passed_over.fetch_add(1, Ordering::Relaxed);
            sysstate_engine::errln!("warning: {damaged}");
        }))
    }

    /// Success, or warnings when damaged files were passed over.
    pub fn outcome(&self) -> Outcome {
        Outcome::warned(self.passed_over.load(Ordering::Relaxed))
    }

    /// The job store, with the config's retention.
    fn job_store(&self) -> Result<Arc<JobStore>> {
        Ok(Arc::new(
            JobStore::open(&paths::state_dir())?
                .with_retention(self.config.job_retention()?)
                .with_undo_max(self.config.undo_max_bytes()?),
        ))
    }

    /// Runs `work` as a job of `kind` on the target, with a progress bar that says `what`.
    fn run_job<T: JobOutput>(
        &self,
        kind: JobKind,
        components: &[String],
        what: &str,
        work: impl FnOnce(&sysstate_engine::jobs::Job<'_>) -> Result<T>,
    ) -> Result<T> {
        let printer = Printer::new(self.shows_text(), what);
        sysstate_engine::jobs::run(&self.job_store()?, kind, Some(&self.target), components, &printer, work)
    }
}

/// Refuses a component name that neither this machine's configuration nor any version in
/// `repo` knows (a typo would otherwise select nothing, silently). The versions are read only for
/// a name the configuration lacks.
fn require_known_components(config: &Config, repo: &Repository, names: &[String]) -> Result<()> {
    let configured = sysstate_engine::components::all(config)?;
    let unconfigured: Vec<&String> = names.iter().filter(|n| !configured.iter().any(|c| &c.name == *n)).collect();
    if unconfigured.is_empty() {
        return Ok(());
    }
    let versions = repo.versions()?;
    let held = |name: &str| versions.iter().any(|(_, v)| v.components.iter().any(|c| c.name == name));
    if let Some(name) = unconfigured.into_iter().find(|n| !held(n)) {
        let mut choices: Vec<String> = configured.iter().map(|c| c.name.clone()).collect();
        choices.extend(versions.iter().flat_map(|(_, v)| v.components.iter().map(|c| c.name.clone())));
        choices.sort();
        choices.dedup();
        return Err(sysstate_engine::EngineError::new(
            sysstate_engine::ErrorCode::ComponentMissing,
            format!("component `{name}` is not known: neither the configuration nor any version has it"),
        )
        .with_resolution(format!("use one of: {}", choices.join(", "))));
    }
    Ok(())
}

/// Prints a command's JSON report, with the failure it found (also on stderr, as text); the
/// command ends `Failed` with one, else as `otherwise`.
fn json_report(
    mut value: serde_json::Value,
    failure: Option<&sysstate_engine::EngineError>,
    otherwise: Outcome,
) -> Outcome {
    if let Some(error) = failure {
        value["error"] = crate::output::error_json(error);
        crate::output::print_error_text(error);
    }
    crate::output::print_json(&value);
    match failure {
        Some(_) => Outcome::Failed,
        None => otherwise,
    }
}

pub fn run(cli: &Cli) -> Result<Outcome> {
    // What describes the program itself needs no config.
    match &cli.command {
        Command::Completions { shell } => return help::completions(*shell),
        Command::Man => return help::man(),
        _ => {}
    }
    // The doctor checks the config itself: it runs even when the config does not parse.
    if let Command::Doctor { fix, no_validate } = &cli.command {
        return doctor::doctor(cli, *fix, !*no_validate);
    }
    let config_file = cli.global.config.clone().unwrap_or_else(paths::config_file);
    let config = Config::load(&config_file, cli.global.config.is_some())?;
    let target =
        cli.global.target.clone().or_else(|| config.backup.target.clone()).unwrap_or_else(paths::default_target);
    let context = Context { cli, config, target, passed_over: Arc::default() };
    match &cli.command {
        Command::Backup { components, now: true, .. } => agent::backup_now(&context, components),
        Command::Backup { components, tags, threads, wait, now: false } => {
            backup::backup(&context, components, tags, *threads, wait.as_deref())
        }
        Command::Agent { command: None } => agent::run(&context),
        Command::Notify { command: crate::cli::NotifyCommand::Test } => agent::notify_test(&context),
        Command::Agent { command: Some(crate::cli::AgentCommand::Status) } => agent::status(&context),
        Command::Agent { command: Some(crate::cli::AgentCommand::Register { file }) } => {
            vault::register(&context, file)
        }
        Command::Vault { dir, command } => vault::vault(&context, dir, command),
        Command::Job { command: Some(crate::cli::JobCommand::Cancel { id }), .. } => agent::cancel(&context, id),
        Command::Init => keys::init(&context),
        Command::Config { command: crate::cli::ConfigCommand::Show } => read::config_show(&context),
        Command::Versions { filter } => read::versions(&context, &filter.filter()),
        Command::Protect { version } => upkeep::protect(&context, version, true),
        Command::Unprotect { version } => upkeep::protect(&context, version, false),
        Command::Items { version, components } => read::items(&context, version, components),
        Command::Components => read::components(&context),
        Command::Restore(args) => restore::restore(&context, args),
        Command::Recover(args) => recover::recover(&context, args),
        Command::Check { read_data, read_data_sample } => {
            upkeep::check(&context, *read_data, read_data_sample.as_deref())
        }
        Command::Forget(args) => upkeep::forget(&context, args),
        Command::Prune { dry_run } => upkeep::prune(&context, *dry_run),
        Command::Repair { part } => upkeep::repair(&context, part),
        Command::Copy { to, to_passphrase_file, versions, bandwidth } => {
            upkeep::copy(&context, to, to_passphrase_file.as_deref(), versions, bandwidth.as_deref())
        }
        Command::Key { command } => keys::key(&context, command),
        Command::Services => doctor::services(cli, &context.config),
        Command::Doctor { .. } | Command::Completions { .. } | Command::Man => {
            unreachable!("handled before the config is read")
        }
        Command::Job { previous, command: None } => jobs::job(&context, *previous),
        Command::Events { source, level, since, job } => jobs::events(&context, source, level, since, job),
        Command::Writers => shadow::writers(&context),
        Command::Providers => shadow::providers(&context),
        Command::Shadows { command } => shadow::shadows(&context, command.as_ref()),
        Command::Shadowstorage { command } => shadow::storage(&context, command.as_ref()),
    }
}
