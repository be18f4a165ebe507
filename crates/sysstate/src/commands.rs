//! One function per command: resolve the target and passphrase, call the engine, print.

use crate::cli::{Cli, Command, ForgetArgs, KeyCommand};
use crate::output::{bytes, print_json};
use serde_json::json;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use sysstate_engine::config::Config;
use sysstate_engine::{credentials, ops, paths, EngineError, ErrorCode, Result};
use sysstate_repo::archiver::{Progress, Warning};
use sysstate_repo::keys::KdfParams;
use sysstate_repo::lock::Lease;
use sysstate_repo::tree::NodeKind;
use sysstate_repo::{Id, Repository};

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
}

struct Context<'a> {
    cli: &'a Cli,
    config: Config,
    target: String,
}

impl Context<'_> {
    fn say(&self, text: impl AsRef<str>) {
        if !self.cli.global.quiet && !self.cli.global.json {
            println!("{}", text.as_ref());
        }
    }

    /// The passphrase: environment, file, the state directory's key file, or a prompt.
    fn passphrase(&self, target: &str, passphrase_file: Option<&Path>) -> Result<Option<Vec<u8>>> {
        if let Some(found) = credentials::find(target, passphrase_file, &paths::state_dir())? {
            return Ok(Some(found));
        }
        if !self.cli.global.quiet && std::io::stdin().is_terminal() {
            return prompt(&format!("passphrase for `{target}`: ")).map(Some);
        }
        Ok(None)
    }

    fn require_passphrase(&self, target: &str) -> Result<Vec<u8>> {
        self.passphrase(target, self.cli.global.passphrase_file.as_deref())?.ok_or_else(|| {
            EngineError::new(ErrorCode::WrongPassphrase, format!("no passphrase for the repository at `{target}`"))
                .with_cause("no passphrase was given and there is no terminal to ask on")
                .with_resolution("set `SYSSTATE_PASSPHRASE`, or pass `--passphrase-file FILE`")
        })
    }

    fn open(&self) -> Result<Repository> {
        let passphrase = self.require_passphrase(&self.target)?;
        ops::open(&self.target, &passphrase)
    }
}

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

/// Prints warnings as they come (not with --quiet or --json), draws the progress bar, and
/// feeds the job's progress.
struct Printer<'a> {
    show: bool,
    progress: Option<&'a sysstate_engine::jobs::ProgressWriter<'a>>,
    bar: crate::output::Bar,
}

impl<'a> Printer<'a> {
    fn new(context: &Context<'_>, what: &str, progress: Option<&'a sysstate_engine::jobs::ProgressWriter<'a>>) -> Self {
        let show = !context.cli.global.quiet && !context.cli.global.json;
        Printer { show, progress, bar: crate::output::Bar::new(show, what) }
    }

    /// `done` of `total` bytes (check, prune).
    fn set(&self, done: u64, total: u64) {
        self.bar.set(done, total);
        if let Some(progress) = self.progress {
            progress.set_bytes(done, total);
        }
    }
}

impl Progress for Printer<'_> {
    fn file_done(&self, bytes: u64) {
        self.bar.add(bytes);
        if let Some(progress) = self.progress {
            progress.add(bytes);
        }
    }

    fn warning(&self, warning: &Warning) {
        if self.show {
            self.bar.println(&format!("warning: `{}` {}", warning.path, warning.message));
        }
    }

    fn total(&self, bytes: u64) {
        self.bar.set(0, bytes);
        if let Some(progress) = self.progress {
            progress.total(bytes);
        }
    }
}

pub fn run(cli: &Cli) -> Result<Outcome> {
    // The doctor checks the config itself: it runs even when the config does not parse.
    if let Command::Doctor { fix, no_validate } = &cli.command {
        return crate::doctor::doctor(cli, *fix, !*no_validate);
    }
    let config_file = cli.global.config.clone().unwrap_or_else(paths::config_file);
    let config = Config::load(&config_file, cli.global.config.is_some())?;
    let target =
        cli.global.target.clone().or_else(|| config.backup.target.clone()).unwrap_or_else(paths::default_target);
    let context = Context { cli, config, target };
    match &cli.command {
        Command::Backup { components, tags, threads, wait } => {
            backup(&context, components, tags, *threads, wait.as_deref())
        }
        Command::Versions => versions(&context),
        Command::Items { version, components } => items(&context, version, components),
        Command::Restore { version, components, to, in_place, dry_run, apply_packages, undo, threads } => {
            if let Some(job) = undo {
                return as_job(&context, "undo", &[], |_, _| Ok((undo_in_place(&context, job)?, None)));
            }
            if *in_place {
                let kind = if *dry_run { "restore-dry-run" } else { "restore-in-place" };
                return as_job(&context, kind, components, |_, job| {
                    let request = sysstate_engine::inplace::InPlaceRequest {
                        root: context.cli.global.root.clone(),
                        version: version.clone(),
                        components: components.clone(),
                        dry_run: *dry_run,
                        apply_packages: *apply_packages,
                        job: job.to_string(),
                    };
                    restore_in_place(&context, &request)
                });
            }
            let to = to.as_ref().ok_or_else(|| {
                EngineError::new(ErrorCode::InvalidInput, "restore needs `--to DIR`, `--in-place` or `--undo JOB`")
            })?;
            as_job(&context, "restore", components, |store, job| {
                let progress = sysstate_engine::jobs::ProgressWriter::new(store, job);
                let outcome = restore(&context, version, components, to, *threads, &progress);
                progress.flush();
                Ok((outcome?, None))
            })
        }
        Command::Check { read_data } => as_job(&context, "check", &[], |store, job| {
            let progress = sysstate_engine::jobs::ProgressWriter::new(store, job);
            let outcome = check(&context, *read_data, &progress);
            progress.flush();
            Ok((outcome?, None))
        }),
        Command::Forget(args) => as_job(&context, "forget", &[], |_, _| Ok((forget(&context, args)?, None))),
        Command::Prune => as_job(&context, "prune", &[], |store, job| {
            let progress = sysstate_engine::jobs::ProgressWriter::new(store, job);
            let outcome = prune(&context, &progress);
            progress.flush();
            Ok((outcome?, None))
        }),
        Command::Copy { to, to_passphrase_file, versions } => as_job(&context, "copy", &[], |_, _| {
            Ok((copy(&context, to, to_passphrase_file.as_deref(), versions)?, None))
        }),
        Command::Key { command } => key(&context, command),
        Command::Components => components(&context),
        Command::Services => crate::doctor::services(cli, &context.config),
        Command::Doctor { .. } => unreachable!("handled before the config is read"),
        Command::Job { previous } => job(&context, *previous),
        Command::Events { source, level, since, job } => events(&context, source, level, since, job),
        Command::Writers => crate::shadow::writers(&context.config, context.cli.global.json),
        Command::Providers => crate::shadow::providers(context.cli.global.json),
        Command::Shadows { command } => crate::shadow::shadows(&context.config, &context.cli.global, command.as_ref()),
        Command::Shadowstorage { command } => {
            crate::shadow::storage(&context.config, context.cli.global.json, command.as_ref())
        }
    }
}

/// A backup as a job: a row in the job store from start to end, its current operation and
/// progress while it runs, and an event for its failure.
/// Runs `work` as a job of `kind`: a `running` row from start to end, ended with its outcome,
/// the version it made, or its error (also written as an event).
fn as_job(
    context: &Context<'_>,
    kind: &str,
    components: &[String],
    work: impl FnOnce(&std::sync::Arc<sysstate_engine::jobs::JobStore>, &str) -> Result<(Outcome, Option<String>)>,
) -> Result<Outcome> {
    use sysstate_engine::jobs::{source_of, JobStore};
    let store =
        std::sync::Arc::new(JobStore::open(&paths::state_dir())?.with_retention(context.config.job_retention()?));
    let job = store.start(kind, Some(&context.target), components)?;
    match work(&store, &job) {
        Ok((outcome, version)) => {
            let state = match outcome {
                Outcome::Success => "succeeded",
                Outcome::Warnings => "succeeded-with-warnings",
                Outcome::Failed => "failed",
            };
            store.finish(&job, state, version.as_deref(), None, "engine")?;
            Ok(outcome)
        }
        Err(error) => {
            let state = if error.code == ErrorCode::Cancelled { "cancelled" } else { "failed" };
            store.finish(&job, state, None, Some(&error), source_of(error.code))?;
            Err(error)
        }
    }
}

/// A backup as a job, with the shadow set's phases as its current operation, the archiver's
/// progress, and the shadow set's warnings as events as they happen.
fn backup(
    context: &Context<'_>,
    components: &[String],
    tags: &[String],
    threads: usize,
    wait: Option<&str>,
) -> Result<Outcome> {
    as_job(context, "backup", components, |store, job| {
        let progress = sysstate_engine::jobs::ProgressWriter::new(store, job);
        let hook = {
            let (store, job) = (store.clone(), job.to_string());
            sysstate_shadow::PhaseHook(std::sync::Arc::new(move |operation: &str| {
                let _ = store.operation(&job, operation);
            }))
        };
        let warning = {
            let (store, job) = (store.clone(), job.to_string());
            sysstate_shadow::WarningHook(std::sync::Arc::new(move |code: ErrorCode, message: &str| {
                let _ = store.event(Some(&job), sysstate_types::Level::Warning, "shadow", code, message, None);
            }))
        };
        let result = run_backup(context, components, tags, threads, wait, job, hook, warning, &progress);
        progress.flush();
        result.map(|(outcome, report)| (outcome, Some(report.id.to_hex())))
    })
}

#[allow(clippy::too_many_arguments)]
fn run_backup(
    context: &Context<'_>,
    components: &[String],
    tags: &[String],
    threads: usize,
    wait: Option<&str>,
    job: &str,
    hook: sysstate_shadow::PhaseHook,
    warning: sysstate_shadow::WarningHook,
    progress: &sysstate_engine::jobs::ProgressWriter<'_>,
) -> Result<(Outcome, ops::BackupReport)> {
    let wait = wait
        .map(|text| {
            sysstate_engine::shadow::parse_duration(text)
                .map_err(|e| EngineError::new(ErrorCode::InvalidInput, format!("`--wait`: {e}")))
        })
        .transpose()?;
    let global = &context.cli.global;
    let target = &context.target;
    // Refuse unknown or missing components before anything is created (a key file, a repository).
    sysstate_engine::components::select(&context.config, &global.root, components)?;
    let exists = Repository::exists(&*ops::backend(target)?)?;
    let passphrase = match context.passphrase(target, global.passphrase_file.as_deref())? {
        Some(passphrase) => passphrase,
        None if !exists => {
            let (passphrase, path) = credentials::generate(target, &paths::state_dir())?;
            eprintln!(
                "note: no passphrase was given, so the new repository at `{target}` is protected by a random key kept in `{}` (mode 0600). Keep a copy of that file somewhere safe: without it the backups cannot be read.",
                path.display()
            );
            passphrase
        }
        None => context.require_passphrase(target)?,
    };
    let request = ops::BackupRequest {
        config: context.config.clone(),
        root: global.root.clone(),
        target: target.clone(),
        components: components.to_vec(),
        tags: tags.to_vec(),
        threads,
        wait,
        trigger: crate::shadow::signal_trigger(),
        job: Some(job.to_string()),
        phase: Some(hook),
        warning: Some(warning),
    };
    let printer = Printer::new(context, "backing up", Some(progress));
    let report = ops::backup(&request, &passphrase, &printer)?;
    let stats = &report.version.stats;
    if global.json {
        print_json(&json!({
            "job": job,
            "version": report.id.to_hex(),
            "created-repository": report.created,
            "components": report.version.components,
            "skipped-components": report.skipped_components,
            "stats": stats,
            "warnings": report.warnings.iter().map(|w| json!({"path": w.path, "message": w.message})).collect::<Vec<_>>(),
        }));
    } else {
        if report.created {
            context.say(format!("created a new repository at `{target}`"));
        }
        if !report.skipped_components.is_empty() {
            context.say(format!("left out (not on this machine): {}", report.skipped_components.join(", ")));
        }
        context.say(format!(
            "version {} saved: {} files, {} dirs, {} ({} read, {} files unchanged), {} added, {} stored, in {:.2} s",
            report.id.short(),
            stats.files,
            stats.dirs,
            bytes(stats.bytes_total),
            bytes(stats.bytes_read),
            stats.files_unchanged,
            bytes(stats.bytes_added),
            bytes(stats.bytes_stored),
            stats.duration_ms as f64 / 1000.0
        ));
    }
    if report.warnings.is_empty() {
        Ok((Outcome::Success, report))
    } else {
        if !global.quiet && !global.json {
            eprintln!(
                "{} entries could not be backed up (listed above); the version holds everything else",
                report.warnings.len()
            );
        }
        Ok((Outcome::Warnings, report))
    }
}

fn versions(context: &Context<'_>) -> Result<Outcome> {
    let repo = context.open()?;
    let versions = repo.versions()?;
    if context.cli.global.json {
        let list: Vec<_> = versions
            .iter()
            .map(|(id, v)| {
                let mut value = serde_json::to_value(v).expect("versions encode");
                value["id"] = json!(id.to_hex());
                value["time"] = json!(sysstate_types::time::format_utc(v.time_ns));
                value
            })
            .collect();
        print_json(&json!(list));
    } else {
        println!("{:<10} {:<21} {:<16} {:>10}  components", "version", "time (UTC)", "host", "size");
        for (id, v) in &versions {
            let names: Vec<_> = v.components.iter().map(|c| c.name.as_str()).collect();
            println!(
                "{:<10} {:<21} {:<16} {:>10}  {}",
                id.short(),
                sysstate_types::time::format_utc(v.time_ns),
                v.host,
                bytes(v.stats.bytes_total),
                names.join(", ")
            );
        }
    }
    Ok(Outcome::Success)
}

fn items(context: &Context<'_>, version: &str, components: &[String]) -> Result<Outcome> {
    let repo = context.open()?;
    let (id, manifest) = repo.find_version(version)?;
    let include: Vec<String> = manifest
        .components
        .iter()
        .filter(|c| components.is_empty() || components.contains(&c.name))
        .flat_map(|c| c.paths.clone())
        .collect();
    let mut entries = Vec::new();
    walk_items(&repo, &manifest.tree, Path::new("/"), &include, &mut entries)?;
    if context.cli.global.json {
        print_json(&json!({"version": id.to_hex(), "components": manifest.components, "entries": entries}));
    } else {
        for component in &manifest.components {
            println!("component {}: {}", component.name, component.paths.join(", "));
        }
        for entry in &entries {
            println!(
                "{} {:>6o} {:>5}:{:<5} {:>10} {}",
                entry["type"].as_str().unwrap_or("?"),
                entry["mode"].as_u64().unwrap_or(0),
                entry["uid"],
                entry["gid"],
                entry["size"],
                entry["path"].as_str().unwrap_or("")
            );
        }
    }
    Ok(Outcome::Success)
}

fn walk_items(
    repo: &Repository,
    tree: &Id,
    path: &Path,
    include: &[String],
    out: &mut Vec<serde_json::Value>,
) -> Result<()> {
    for node in repo.read_tree(tree)?.nodes {
        let child = path.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&node.name));
        let shown = child.display().to_string();
        let inside = include.iter().any(|p| child.starts_with(p));
        let above = include.iter().any(|p| Path::new(p).starts_with(&child));
        if !inside && !above {
            continue;
        }
        let kind = match &node.kind {
            NodeKind::File(_) => "f",
            NodeKind::Dir { .. } => "d",
            NodeKind::Symlink { .. } => "l",
            NodeKind::CharDevice { .. } => "c",
            NodeKind::BlockDevice { .. } => "b",
            NodeKind::Fifo => "p",
        };
        if inside {
            out.push(json!({"path": shown, "type": kind, "mode": node.mode, "uid": node.uid, "gid": node.gid, "size": node.size, "mtime": sysstate_types::time::format_utc(node.mtime_ns)}));
        }
        if let NodeKind::Dir { subtree } = node.kind {
            walk_items(repo, &subtree, &child, include, out)?;
        }
    }
    Ok(())
}

fn restore(
    context: &Context<'_>,
    version: &str,
    components: &[String],
    to: &Path,
    threads: usize,
    progress: &sysstate_engine::jobs::ProgressWriter<'_>,
) -> Result<Outcome> {
    let repo = context.open()?;
    let printer = Printer::new(context, "restoring", Some(progress));
    let started = std::time::Instant::now();
    let (id, outcome) = ops::restore_to(&repo, version, components, to, threads, Some(&printer))?;
    let stats = &outcome.stats;
    if context.cli.global.json {
        print_json(&json!({
            "version": id.to_hex(),
            "to": to.display().to_string(),
            "files": stats.files, "dirs": stats.dirs, "others": stats.others, "bytes": stats.bytes,
            "warnings": outcome.warnings.iter().map(|w| json!({"path": w.path, "message": w.message})).collect::<Vec<_>>(),
        }));
    } else {
        context.say(format!(
            "restored version {} to `{}`: {} files, {} dirs, {} others, {} in {:.2} s",
            id.short(),
            to.display(),
            stats.files,
            stats.dirs,
            stats.others,
            bytes(stats.bytes),
            started.elapsed().as_secs_f64()
        ));
    }
    if outcome.warnings.is_empty() {
        Ok(Outcome::Success)
    } else {
        if !context.cli.global.quiet && !context.cli.global.json {
            eprintln!("{} entries could not be restored (listed above); everything else was", outcome.warnings.len());
        }
        Ok(Outcome::Warnings)
    }
}

fn restore_in_place(
    context: &Context<'_>,
    request: &sysstate_engine::inplace::InPlaceRequest,
) -> Result<(Outcome, Option<String>)> {
    let repo = context.open()?;
    let report = sysstate_engine::inplace::restore_in_place(&repo, request, &context.config)?;
    if context.cli.global.json {
        print_json(&serde_json::to_value(&report).expect("reports encode"));
        return Ok((Outcome::Success, Some(report.version)));
    }
    for difference in &report.differences {
        context.say(describe(difference));
    }
    let count = |change| report.differences.iter().filter(|d| d.change == change).count();
    use sysstate_repo::inplace::Change;
    let (added, changed, removed) = (count(Change::Add), count(Change::Change), count(Change::Remove));
    let short = &report.version[..12];
    if report.dry_run {
        context.say(format!(
            "version {short} against `{}`: {added} to add, {changed} to change, {removed} to remove (dry run: nothing was changed)",
            request.root.display()
        ));
    } else if report.differences.is_empty() {
        context.say(format!("`{}` already equals version {short}: nothing to restore", request.root.display()));
    } else {
        context.say(format!(
            "restored version {short} in place: {added} added, {changed} changed, {removed} removed; every replaced entry is kept: `sysstate restore --undo {}` puts them back",
            request.job
        ));
    }
    for component in &report.next_boot {
        context.say(format!("component `{component}` changed: it takes effect at the next boot"));
    }
    if let Some(packages) = &report.packages {
        context.say(format!(
            "packages: {} to install, {} to remove to match the version{}",
            packages.to_install.len(),
            packages.to_remove.len(),
            match &packages.selections {
                Some(file) => format!("; its selection is in `{file}`"),
                None => String::new(),
            }
        ));
        if packages.applied {
            context.say("packages: the package set was reconciled");
        } else if !packages.to_install.is_empty() || !packages.to_remove.is_empty() {
            context.say("packages: to reconcile the package set, run (or restore again with --apply-packages):");
            for command in &packages.commands {
                context.say(format!("  {command}"));
            }
        }
    }
    Ok((Outcome::Success, Some(report.version)))
}

/// Lists differences in the form the CLI prints: `+ path`, `~ path (what)`, `- path`.
fn describe(difference: &sysstate_repo::inplace::Difference) -> String {
    use sysstate_repo::inplace::Change;
    let count = if difference.entries > 1 { format!(" ({} entries)", difference.entries) } else { String::new() };
    match difference.change {
        Change::Add => format!("+ {}{count}", difference.path),
        Change::Remove => format!("- {}{count}", difference.path),
        Change::Change => format!("~ {} ({}){count}", difference.path, difference.what.join(", ")),
    }
}

fn undo_in_place(context: &Context<'_>, job: &str) -> Result<Outcome> {
    let report = sysstate_engine::inplace::undo(job)?;
    if context.cli.global.json {
        print_json(&serde_json::to_value(&report).expect("reports encode"));
    } else {
        for difference in &report.differences {
            context.say(describe(difference));
        }
        context.say(format!(
            "undid the in-place restore {job}: {} entries put back as they were",
            report.differences.len()
        ));
    }
    Ok(Outcome::Success)
}

fn check(
    context: &Context<'_>,
    read_data: bool,
    progress: &sysstate_engine::jobs::ProgressWriter<'_>,
) -> Result<Outcome> {
    let repo = context.open()?;
    let _lease = Lease::acquire(repo.backend().clone(), false, "check")?;
    let printer = Printer::new(context, "checking", Some(progress));
    let report = sysstate_repo::check::check(&repo, read_data, &|done, total| printer.set(done, total))?;
    drop(printer);
    let failure = (!report.is_clean()).then(|| {
        EngineError::new(
            ErrorCode::RepositoryCorrupt,
            format!(
                "the repository at `{}` is damaged: {} problems in packs {}; versions affected: {}",
                context.target,
                report.errors.len(),
                report.damaged_packs.iter().map(|p| &p[..8]).collect::<Vec<_>>().join(", "),
                report.damaged_versions.join(", ")
            ),
        )
        .with_cause("pack files were changed or lost after they were written (disk or storage fault, or tampering)")
        .with_resolution("run a new backup to store the damaged files again, then `sysstate forget` the damaged versions and `sysstate prune`")
    });
    if context.cli.global.json {
        let mut value = serde_json::to_value(&report).expect("report encodes");
        if let Some(error) = &failure {
            value["error"] = crate::output::error_json(error);
            crate::output::print_error_text(error);
        }
        print_json(&value);
        return Ok(match failure {
            Some(_) => Outcome::Failed,
            None if report.warnings.is_empty() => Outcome::Success,
            None => Outcome::Warnings,
        });
    }
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    for error in &report.errors {
        eprintln!("damage: {error}");
    }
    for file in &report.damaged_files {
        eprintln!("cannot be restored whole: {file}");
    }
    context.say(format!(
        "checked {} versions, {} packs, {} blobs{}: {}",
        report.versions,
        report.packs,
        report.blobs,
        if read_data { format!(", read {}", bytes(report.bytes_read)) } else { String::new() },
        if report.is_clean() { "no damage found" } else { "DAMAGE FOUND" }
    ));
    match failure {
        Some(error) => Err(error),
        None if report.warnings.is_empty() => Ok(Outcome::Success),
        None => Ok(Outcome::Warnings),
    }
}

fn forget(context: &Context<'_>, args: &ForgetArgs) -> Result<Outcome> {
    let policy = sysstate_repo::forget::Policy {
        last: args.keep_last,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
        yearly: args.keep_yearly,
    };
    if policy.is_empty() {
        return Err(EngineError::new(ErrorCode::InvalidInput, "forget needs at least one `--keep-…` option")
            .with_cause("without a rule every version would be dropped")
            .with_resolution("for example `sysstate forget --keep-daily 7 --keep-weekly 4`"));
    }
    let repo = context.open()?;
    let _lease = Lease::acquire(repo.backend().clone(), false, "forget")?;
    let versions = repo.versions()?;
    let (keep, drop) = sysstate_repo::forget::plan(&versions, &policy);
    if !args.dry_run {
        for id in &drop {
            repo.backend().remove(sysstate_repo::backend::FileKind::Version, &id.to_hex())?;
        }
    }
    if context.cli.global.json {
        print_json(
            &json!({"keep": keep.iter().map(Id::to_hex).collect::<Vec<_>>(), "drop": drop.iter().map(Id::to_hex).collect::<Vec<_>>(), "dry-run": args.dry_run}),
        );
    } else {
        for id in &drop {
            context.say(format!("{} version {}", if args.dry_run { "would drop" } else { "dropped" }, id.short()));
        }
        context.say(format!(
            "{} versions kept, {} {}; run `sysstate prune` to free their space",
            keep.len(),
            drop.len(),
            if args.dry_run { "would be dropped" } else { "dropped" }
        ));
    }
    Ok(Outcome::Success)
}

fn prune(context: &Context<'_>, progress: &sysstate_engine::jobs::ProgressWriter<'_>) -> Result<Outcome> {
    let repo = context.open()?;
    let _lease = Lease::acquire(repo.backend().clone(), true, "prune")?;
    let printer = Printer::new(context, "pruning", Some(progress));
    let report = sysstate_repo::prune::prune(&repo, &|done, total| printer.set(done, total))?;
    drop(printer);
    if context.cli.global.json {
        print_json(&serde_json::to_value(&report).expect("report encodes"));
    } else {
        context.say(format!(
            "pruned: {} blobs kept, {} dropped; {} packs deleted, {} repacked, {} left by interrupted backups deleted; {} freed, {} written",
            report.blobs_used,
            report.blobs_dropped,
            report.packs_deleted,
            report.packs_repacked,
            report.orphan_packs_deleted,
            bytes(report.bytes_freed),
            bytes(report.bytes_written)
        ));
    }
    Ok(Outcome::Success)
}

fn copy(context: &Context<'_>, to: &str, to_passphrase_file: Option<&Path>, versions: &[String]) -> Result<Outcome> {
    let from = context.open()?;
    let to_passphrase = match std::env::var_os("SYSSTATE_TO_PASSPHRASE") {
        Some(value) => std::os::unix::ffi::OsStrExt::as_bytes(value.as_os_str()).to_vec(),
        None => match to_passphrase_file {
            Some(path) => credentials::read_passphrase_file(path)?,
            None => context.require_passphrase(&context.target)?,
        },
    };
    let backend = ops::backend(to)?;
    let destination = if Repository::exists(&*backend)? {
        Repository::open(backend, &to_passphrase)?
    } else {
        Repository::init(backend, &to_passphrase, KdfParams::default())?
    };
    destination.load_index()?;
    let _from_lease = Lease::acquire(from.backend().clone(), false, "copy")?;
    let _to_lease = Lease::acquire(destination.backend().clone(), false, "copy")?;
    let existing: Vec<(i64, String, String)> =
        destination.versions()?.into_iter().map(|(_, v)| (v.time_ns, v.host, v.root_path)).collect();
    let chosen: Vec<(Id, sysstate_repo::version::Version)> = if versions.is_empty() {
        from.versions()?
    } else {
        versions.iter().map(|v| from.find_version(v)).collect::<std::result::Result<_, _>>()?
    };
    let mut copied = Vec::new();
    for (id, version) in chosen {
        if existing.contains(&(version.time_ns, version.host.clone(), version.root_path.clone())) {
            context.say(format!("version {} is already in `{to}`", id.short()));
            continue;
        }
        let new = sysstate_repo::copy::copy_version(&from, &destination, &id)?;
        context.say(format!("copied version {} to `{to}` as {}", id.short(), new.short()));
        copied.push(json!({"from": id.to_hex(), "to": new.to_hex()}));
    }
    if context.cli.global.json {
        print_json(&json!(copied));
    }
    Ok(Outcome::Success)
}

fn new_passphrase(file: Option<&Path>) -> Result<Vec<u8>> {
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

fn key(context: &Context<'_>, command: &KeyCommand) -> Result<Outcome> {
    let repo = context.open()?;
    match command {
        KeyCommand::List => {
            let keys = repo.list_keys()?;
            if context.cli.global.json {
                let list: Vec<_> = keys
                    .iter()
                    .map(|(name, key)| json!({"id": name, "current": name == repo.key_name(), "host": key.host, "user": key.user, "created": sysstate_types::time::format_utc(key.created_ns)}))
                    .collect();
                print_json(&json!(list));
            } else {
                for (name, key) in &keys {
                    println!(
                        "{} {:<8} {}@{} {}",
                        if name == repo.key_name() { "*" } else { " " },
                        &name[..8],
                        key.user,
                        key.host,
                        sysstate_types::time::format_utc(key.created_ns)
                    );
                }
            }
        }
        KeyCommand::Add { new_passphrase_file } => {
            let name = repo.add_key(&new_passphrase(new_passphrase_file.as_deref())?, KdfParams::default())?;
            context.say(format!("added key {}", &name[..8]));
        }
        KeyCommand::Remove { id } => {
            repo.remove_key(id).map_err(|e| EngineError::new(ErrorCode::InvalidInput, e.to_string()))?;
            context.say(format!("removed key {id}"));
        }
        KeyCommand::Passwd { new_passphrase_file } => {
            let name = repo.add_key(&new_passphrase(new_passphrase_file.as_deref())?, KdfParams::default())?;
            repo.backend().remove(sysstate_repo::backend::FileKind::Key, repo.key_name())?;
            context.say(format!("passphrase changed: key {} replaces {}", &name[..8], &repo.key_name()[..8]));
        }
    }
    Ok(Outcome::Success)
}

fn job(context: &Context<'_>, previous: Option<usize>) -> Result<Outcome> {
    let store =
        sysstate_engine::jobs::JobStore::open(&paths::state_dir())?.with_retention(context.config.job_retention()?);
    let jobs = match previous {
        Some(count) => store.previous(count)?,
        None => store.running()?,
    };
    if context.cli.global.json {
        print_json(&serde_json::to_value(&jobs).expect("jobs encode"));
        return Ok(Outcome::Success);
    }
    if jobs.is_empty() {
        println!("{}", if previous.is_some() { "no job has ended yet" } else { "no job is running" });
    }
    for job in &jobs {
        println!("job {} ({}): {}", job.id, job.kind, job.state);
        println!(
            "   started: {}{}",
            job.started,
            job.ended.as_ref().map(|e| format!(", ended: {e}")).unwrap_or_default()
        );
        if let Some(operation) = &job.current_operation {
            println!("   current operation: {operation}");
        }
        let progress = &job.progress;
        println!("   progress: {} files, {}", progress.files_done, bytes(progress.bytes_done));
        if let Some(version) = &job.version {
            println!("   version: {}", &version[..8.min(version.len())]);
        }
        if let Some(error) = &job.error {
            println!("   error[{}]: {}", error.code, error.message);
            println!("     cause: {}", error.cause);
            println!("     resolution: {}", error.resolution);
        }
        if let Some(log) = &job.log_path {
            println!("   log: {log}");
        }
    }
    Ok(Outcome::Success)
}

fn events(
    context: &Context<'_>,
    source: &Option<String>,
    level: &Option<String>,
    since: &Option<String>,
    job: &Option<String>,
) -> Result<Outcome> {
    let level = match level.as_deref() {
        None => None,
        Some("info") => Some(sysstate_types::Level::Info),
        Some("warning") => Some(sysstate_types::Level::Warning),
        Some("error") => Some(sysstate_types::Level::Error),
        Some(other) => {
            return Err(EngineError::new(
                ErrorCode::InvalidInput,
                format!("`--level {other}`: use info, warning or error"),
            ))
        }
    };
    let since_ns = match since {
        None => None,
        Some(text) => Some(match sysstate_types::time::parse_utc(text) {
            Some(ns) => ns,
            None => {
                let ago = sysstate_engine::shadow::parse_duration(text)
                    .map_err(|_| EngineError::new(ErrorCode::InvalidInput, format!("`--since {text}`: use a date (`2026-11-24`), a time (`2026-11-24T10:00:00Z`) or a duration (`2h`)")))?;
                sysstate_repo::lock::now_ns() - ago.as_nanos() as i64
            }
        }),
    };
    let store =
        sysstate_engine::jobs::JobStore::open(&paths::state_dir())?.with_retention(context.config.job_retention()?);
    let filter = sysstate_engine::jobs::EventFilter { source: source.clone(), level, since_ns, job: job.clone() };
    let events = store.events(&filter)?;
    if context.cli.global.json {
        print_json(&serde_json::to_value(&events).expect("events encode"));
    } else {
        for event in &events {
            println!(
                "{} {:<7} {:<10} {} {}: {}{}",
                event.time,
                event.level,
                event.source,
                event.event_id,
                event.code,
                event.message,
                event.job.as_ref().map(|j| format!(" (job {j})")).unwrap_or_default()
            );
        }
    }
    Ok(Outcome::Success)
}

fn components(context: &Context<'_>) -> Result<Outcome> {
    let served = sysstate_engine::shadow::served_components(&context.config);
    let report = sysstate_engine::components::report(&context.config, &context.cli.global.root, &served)?;
    if context.cli.global.json {
        print_json(&serde_json::to_value(&report).expect("components encode"));
        return Ok(Outcome::Success);
    }
    for component in &report {
        println!("{}{}", component.name, if component.builtin { "" } else { " (from the config)" });
        if component.paths.is_empty() {
            println!("   not on this machine (looked for {})", component.missing.join(", "));
            continue;
        }
        println!("   paths: {}", component.paths.join(", "));
        println!(
            "   size: {} in {} files, on {}",
            bytes(component.size),
            component.files,
            component.filesystem.as_deref().unwrap_or("?")
        );
        if !component.writers.is_empty() {
            println!("   writers: {}", component.writers.join(", "));
        }
        println!("   lock state: {}", component.lock_state);
    }
    Ok(Outcome::Success)
}
