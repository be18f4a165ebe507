use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// System-state backup for Linux servers.
#[derive(Debug, Parser)]
#[command(name = "sysstate", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// The config file (default /etc/sysstate/config.toml as root).
    #[arg(long, global = true, env = "SYSSTATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Treat DIR as `/`: back up or restore an offline or fake system tree.
    #[arg(long, global = true, env = "SYSSTATE_ROOT")]
    pub root: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print nothing but errors; never prompt.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// More logging (-v, -vv).
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Read the repository passphrase from this file.
    #[arg(long, global = true)]
    pub passphrase_file: Option<PathBuf>,
    /// The repository: a directory, or s3://, az://, gs:// URL (default: `backup.target`).
    #[arg(long, global = true)]
    pub target: Option<String>,
    /// Commands that only read (restore, check, copy's source) take no lease on the repository.
    /// A read-only repository is read without one anyway.
    #[arg(long, global = true)]
    pub no_lock: bool,
}

impl Global {
    /// The root (`/` unless `--root`), absolute and resolved: what a journal records and a
    /// version names does not depend on the folder sysstate was started in.
    pub fn root(&self) -> PathBuf {
        let given = self.root.clone().unwrap_or_else(|| PathBuf::from("/"));
        std::fs::canonicalize(&given).unwrap_or(given)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a repository at the target (a backup creates one on first use too). Refused in a
    /// folder of other files, inside another repository, and under a mount point that is not
    /// mounted.
    Init,
    /// Back up the system state (or some components).
    Backup {
        /// Only this component (repeat for more).
        #[arg(long = "component", short = 'c')]
        components: Vec<String>,
        /// Tag the version.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Reader and sealer threads each (default: one per core; at most 256).
        #[arg(long, default_value_t = 0, value_parser = threads)]
        threads: usize,
        /// Wait this long for another shadow set to finish (`30s`, `10m`) instead of failing.
        #[arg(long)]
        wait: Option<String>,
        /// When the agent runs, ask it to back up now (the machine keeps one queue) and follow
        /// the job to its end; without an agent, back up here.
        #[arg(long, conflicts_with_all = ["tags", "threads", "wait"])]
        now: bool,
    },
    /// List the versions in the target.
    Versions {
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell), made
    /// from this program's own options: `sysstate completions bash > /etc/bash_completion.d/sysstate`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), made from this program's own options: `sysstate man >
    /// /usr/local/share/man/man8/sysstate.8`.
    Man,
    /// The configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Protect a version: never forgotten (by a policy or by name) until unprotected.
    Protect {
        /// The version: `latest` or an id prefix.
        version: String,
    },
    /// Lift a version's protection.
    Unprotect {
        /// The version: an id prefix.
        version: String,
    },
    /// List the components and files of a version.
    Items {
        /// The version: `latest` or an id prefix.
        #[arg(long, default_value = "latest")]
        version: String,
        /// Only this component.
        #[arg(long = "component", short = 'c')]
        components: Vec<String>,
    },
    /// Restore a version to an alternate root, or in place.
    Restore(RestoreArgs),
    /// Rebuild a machine from a version onto a blank disk or disk image: partitions,
    /// filesystems, base system, packages, system state, boot loader.
    Recover(RecoverArgs),
    /// Check the repository's structure; with --read-data, every byte.
    Check {
        /// Read, decrypt and verify every blob.
        #[arg(long)]
        read_data: bool,
        /// Read, decrypt and verify the blobs of a random sample of the packs (`5%`): scheduled
        /// checks come round to every pack in time.
        #[arg(long, value_name = "PERCENT", conflicts_with = "read_data")]
        read_data_sample: Option<String>,
    },
    /// Drop versions by a retention policy (then run `prune`).
    Forget(ForgetArgs),
    /// Remove data no version needs.
    Prune {
        /// Show what would be deleted and repacked; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Mend a damaged repository (`sysstate check` says which repair to run).
    Repair {
        #[command(subcommand)]
        part: RepairCommand,
    },
    /// Copy versions to another repository.
    Copy {
        /// The destination repository.
        #[arg(long)]
        to: String,
        /// The destination's passphrase file (default: SYSSTATE_TO_PASSPHRASE or the same).
        #[arg(long)]
        to_passphrase_file: Option<PathBuf>,
        /// Only these versions (default: all the destination lacks).
        #[arg(long = "version")]
        versions: Vec<String>,
        /// The most bytes per second to send (`20MiB`; default: no limit).
        #[arg(long)]
        bandwidth: Option<String>,
    },
    /// Manage the repository's keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// The components of system state on this machine: paths, size, writers, lock state.
    Components,
    /// Check every prerequisite, run a validation backup, and diagnose recent failed jobs.
    Doctor {
        /// Repair what can be repaired (the state directory's owner and mode) and say what changed.
        #[arg(long)]
        fix: bool,
        /// Skip the validation backup.
        #[arg(long)]
        no_validate: bool,
    },
    /// The parts of the service (event log, coordinator, providers, writers) and their state.
    Services,
    /// The running job (like `Get-WBJob`), or the N most recent ended jobs.
    Job {
        /// The N most recent ended jobs, newest first.
        #[arg(long)]
        previous: Option<usize>,
        #[command(subcommand)]
        command: Option<JobCommand>,
    },
    /// The agent: scheduled backups, retention, the local API (systemd runs it).
    Agent {
        #[command(subcommand)]
        command: Option<AgentCommand>,
    },
    /// The vault: an off-machine, append-only repository service for many hosts.
    Vault {
        /// The vault's folder (its settings, certificates and records).
        #[arg(long, env = "SYSSTATE_VAULT_DIR", default_value = "/var/lib/sysstate-vault")]
        dir: PathBuf,
        #[command(subcommand)]
        command: VaultCommand,
    },
    /// The agent's notifications (`[notify]`).
    Notify {
        #[command(subcommand)]
        command: NotifyCommand,
    },
    /// The event log.
    Events {
        /// Only this source: repository, shadow, writer, engine.
        #[arg(long)]
        source: Option<String>,
        /// Only this level and above: info, warning, error.
        #[arg(long)]
        level: Option<String>,
        /// Only since this time (`2026-11-24`, `2026-11-24T10:00:00Z`) or this long ago (`2h`).
        #[arg(long)]
        since: Option<String>,
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
    },
    /// The writers and their states (like `vssadmin list writers`).
    Writers,
    /// The shadow copy providers.
    Providers,
    /// Persistent shadow copies: list, create, delete.
    Shadows {
        #[command(subcommand)]
        command: Option<ShadowsCommand>,
    },
    /// Shadow storage: list, resize.
    Shadowstorage {
        #[command(subcommand)]
        command: Option<StorageCommand>,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Cancel a running job: the agent's through its API, a command's by SIGTERM to its
    /// process (either way its writers are thawed and nothing half-stored).
    Cancel {
        /// The job's id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum NotifyCommand {
    /// Send a test message to every target in `[notify]` and say how each delivery went.
    Test,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// The agent's state: the job running, the queue, each schedule's next run, the last
    /// success and failure of each kind of job.
    Status,
    /// Register this host with a vault: exchange the credentials file the vault made for this
    /// host's own token (kept in the state folder, 0600).
    Register {
        /// The vault credentials file (`sysstate vault credentials --host NAME` made it).
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum VaultCommand {
    /// Make the vault: its folder, its own certificate authority and server certificate, its
    /// settings.
    Init {
        /// Where the repository is stored: a folder, or `s3://bucket/prefix`, `az://container/prefix`.
        #[arg(long)]
        storage: String,
        /// The URL hosts reach the vault at (`vault://vault.example:8443`).
        #[arg(long)]
        url: String,
        /// The address to serve on.
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: String,
    },
    /// Serve the vault (systemd runs it) until SIGTERM.
    Serve,
    /// Write a single-use credentials file for a host to register with (`sysstate agent
    /// register FILE` on the host).
    Credentials {
        /// The host's name (unique in the vault).
        #[arg(long)]
        host: String,
        /// How long the file is good.
        #[arg(long, default_value = "10d")]
        expires: String,
        /// Where to write it (default: `HOST.vault-credentials` here).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// The registered hosts; `revoke NAME` refuses a host's token from now on.
    Hosts {
        #[command(subcommand)]
        command: Option<VaultHostsCommand>,
    },
    /// The versions in the vault: host, arrival, and for a soft-deleted one until when it can be
    /// undeleted.
    Versions,
    /// Soft-delete a version: hidden from its host, undeletable for the soft-delete window (14
    /// days by default), then purged.
    Forget {
        /// The version (an id or a unique prefix).
        #[arg(long)]
        version: String,
    },
    /// Bring a soft-deleted version back.
    Undelete {
        /// The version (an id or a unique prefix).
        #[arg(long)]
        version: String,
    },
    /// Delete the manifests of versions soft-deleted longer ago than the window.
    Purge,
    /// Let one host read another's versions, to restore them onto itself.
    Grant {
        /// Whose versions.
        #[arg(long)]
        restore_from: String,
        /// Who may read them.
        #[arg(long)]
        to: String,
    },
    /// The vault's retention of each host's versions (on when they arrived): show it, `set` it,
    /// or `apply` it now (the vault applies it every day by itself).
    Retention {
        #[command(subcommand)]
        command: Option<VaultRetentionCommand>,
    },
    /// Read the vault's storage and check every file against its name (`--sample`: only a
    /// rotating share of the packs, as the nightly job does).
    Verify {
        /// Read this percent of the packs, a different share each day (default: all).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(1..=100))]
        sample: u8,
    },
    /// Per host, the last version received, the versions kept and soft-deleted, whether one is
    /// overdue; the storage used; the last run of each of the vault's jobs.
    Report,
    /// The vault's immutability: show it, `enable` or `disable` it, or `lock` it for good.
    Immutability {
        #[command(subcommand)]
        command: Option<VaultImmutabilityCommand>,
    },
}

#[derive(Debug, Subcommand)]
pub enum VaultRetentionCommand {
    /// Set the policy of one host (`--host`) or of every host without its own; a policy with no
    /// rule keeps every version.
    Set {
        /// The host (default: every host without a policy of its own).
        #[arg(long)]
        host: Option<String>,
        /// Keep the newest N.
        #[arg(long, default_value_t = 0)]
        last: usize,
        /// Keep the newest of each of the last N days.
        #[arg(long, default_value_t = 0)]
        daily: usize,
        /// … weeks.
        #[arg(long, default_value_t = 0)]
        weekly: usize,
        /// … months.
        #[arg(long, default_value_t = 0)]
        monthly: usize,
        /// … years.
        #[arg(long, default_value_t = 0)]
        yearly: usize,
        /// Keep every version that arrived within this long before the host's newest (`30d`).
        #[arg(long)]
        within: Option<String>,
    },
    /// Soft-delete now what the policies drop.
    Apply {
        /// Only say what would be soft-deleted.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum VaultImmutabilityCommand {
    /// Refuse shorter retention and deletions before expiry (can be disabled again).
    Enable,
    /// Allow them again (refused once locked).
    Disable,
    /// Make the vault immutable forever: no command can disable it again.
    Lock,
}

#[derive(Debug, Subcommand)]
pub enum VaultHostsCommand {
    /// Revoke a host: its token is refused from now on.
    Revoke {
        /// The host.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ShadowsCommand {
    /// List the shadow copies.
    List,
    /// Make a persistent shadow copy of the components (kept until deleted or pushed out).
    Create {
        /// The components to copy (repeat for more; default: `backup.components`, else every
        /// component present).
        #[arg(long = "component", short = 'c')]
        components: Vec<String>,
    },
    /// Delete shadow copies.
    Delete {
        /// This copy.
        #[arg(long)]
        id: Option<String>,
        /// The oldest copy.
        #[arg(long)]
        oldest: bool,
        /// Every copy.
        #[arg(long)]
        all: bool,
    },
    /// Undo what a shadow set whose process died left: thaw and abort its writers, delete its
    /// copies (a backup does it too when it finds the lock of a process that is gone).
    Recover,
}

#[derive(Debug, Subcommand)]
pub enum StorageCommand {
    /// List the storage areas with their sizes.
    List,
    /// Set a storage area's maximum size (shrinking deletes the oldest copies that no longer fit).
    Resize {
        /// The volume (its mount point) whose copies the area holds.
        #[arg(long = "for")]
        for_volume: String,
        /// The folder the copies live in.
        #[arg(long)]
        on: String,
        /// Bytes (`512MiB`), a percentage of the `on` volume (`10%`), or `unbounded`.
        #[arg(long)]
        max_size: String,
    },
}

#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// Keep the N newest versions.
    #[arg(long, default_value_t = 0)]
    pub keep_last: usize,
    /// Keep the newest version of each of the N last days that have one.
    #[arg(long, default_value_t = 0)]
    pub keep_daily: usize,
    /// … of each of the N last weeks.
    #[arg(long, default_value_t = 0)]
    pub keep_weekly: usize,
    /// … of each of the N last months.
    #[arg(long, default_value_t = 0)]
    pub keep_monthly: usize,
    /// … of each of the N last years.
    #[arg(long, default_value_t = 0)]
    pub keep_yearly: usize,
    /// Keep every version taken within this long before the group's newest (`30d`, `2w`).
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<String>,
    /// Keep every version with this tag (repeat for more).
    #[arg(long, value_name = "TAG")]
    pub keep_tag: Vec<String>,
    /// What makes a group the policy applies to on its own: any of host, root, components,
    /// tags, comma-separated (empty: all versions are one group).
    #[arg(long, default_value = "host,root,components")]
    pub group_by: String,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Drop these versions (id prefixes; a damaged manifest too), instead of a policy.
    #[arg(long = "version", value_name = "ID", conflicts_with_all = ["keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly", "keep_within", "keep_tag"])]
    pub versions: Vec<String>,
    /// Show what would be dropped.
    #[arg(long)]
    pub dry_run: bool,
}

/// Which versions a command looks at.
#[derive(Debug, Args, Default)]
pub struct FilterArgs {
    /// Only versions of this host (repeat for more).
    #[arg(long)]
    pub host: Vec<String>,
    /// Only versions with this tag (repeat for more: any of them).
    #[arg(long)]
    pub tag: Vec<String>,
    /// Only versions holding this component (repeat for more: all of them).
    #[arg(long = "component", short = 'c')]
    pub components: Vec<String>,
}

impl FilterArgs {
    /// The filter.
    pub fn filter(&self) -> sysstate_repo::forget::Filter {
        sysstate_repo::forget::Filter {
            hosts: self.host.clone(),
            tags: self.tag.clone(),
            components: self.components.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// The effective configuration: every key with the value commands use (the file's or the
    /// default), the built-in components and writers included; TOML, or JSON with --json.
    Show,
}

#[derive(Debug, Subcommand)]
pub enum RepairCommand {
    /// Build a new index from the packs' own headers (a lost or damaged index file, packs no
    /// index lists).
    Index {
        /// Say what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Read every pack; move the intact blobs of damaged packs to new packs and take damaged
    /// blobs out of the index, so the next backup stores their content again (also `packs`).
    #[command(visible_alias = "packs")]
    Blobs {
        /// Say what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Put manifests stored under another name back under their own; remove damaged ones and
    /// stray files in `versions/`.
    Versions {
        /// Say what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// List the keys.
    List,
    /// Add a key; its passphrase comes from --new-passphrase-file or SYSSTATE_NEW_PASSPHRASE.
    Add {
        /// The new key's passphrase, from this file.
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Remove a key by id prefix (not the one in use).
    Remove {
        /// The key's id, or a unique prefix of it (`sysstate key list`).
        id: String,
    },
    /// Change the passphrase of the key in use (adds the new key, then removes the old).
    Passwd {
        /// The new passphrase, from this file.
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// The version: `latest` or an id prefix.
    #[arg(long, default_value = "latest")]
    pub version: String,
    /// The blank disk to rebuild onto: a block device (`/dev/sdb`) or a disk image file.
    #[arg(long)]
    pub disk: PathBuf,
    /// Print the plan (partitions, filesystems, base system, packages, components, boot
    /// loader) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Recover over a disk that holds a partition table or filesystems, destroying them.
    #[arg(long)]
    pub overwrite: bool,
    /// The Debian mirror debootstrap and apt install from.
    #[arg(long, default_value = sysstate_engine::recover::DEFAULT_MIRROR)]
    pub mirror: String,
    /// Install the base system from this debootstrap tarball (`debootstrap --make-tarball`)
    /// instead of downloading it.
    #[arg(long, value_name = "FILE")]
    pub base_tarball: Option<PathBuf>,
    /// Restore only this component over the new system (repeat for more; default: all of the
    /// version's but `packages`, which apt installs).
    #[arg(long = "component", short = 'c')]
    pub components: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The version: `latest` or an id prefix.
    #[arg(long, default_value = "latest")]
    pub version: String,
    /// Only this component (repeat for more).
    #[arg(long = "component", short = 'c')]
    pub components: Vec<String>,
    /// The directory that stands for `/`.
    #[arg(long)]
    pub to: Option<PathBuf>,
    /// Restore over the live system (or `--root`): staged, journaled, undoable.
    #[arg(long, conflicts_with = "to")]
    pub in_place: bool,
    /// List what the restore would do and change nothing: with --to, the entries it would
    /// write; with --in-place, what would be added, changed and removed.
    #[arg(long, conflicts_with = "undo")]
    pub dry_run: bool,
    /// With --in-place: also run the commands that reconcile the package set.
    #[arg(long, requires = "in_place")]
    pub apply_packages: bool,
    /// With --in-place onto another machine: `keep` gives it the version's host name,
    /// machine-id, SSH host keys and network configuration (a replacement server); `leave`
    /// keeps its own (a clone).
    #[arg(long, requires = "in_place", value_parser = ["keep", "leave"])]
    pub identity: Option<String>,
    /// Put back what the in-place restore JOB replaced or removed, and remove what it added.
    #[arg(long, value_name = "JOB", conflicts_with_all = ["to", "in_place"])]
    pub undo: Option<String>,
    /// Reader threads (default: one per core; at most 256).
    #[arg(long, default_value_t = 0, value_parser = threads)]
    pub threads: usize,
}

/// `--threads`: 0 (one per core) to 256; more only exhausts the machine (100,000 made the
/// backup panic when the threads could not be started).
fn threads(text: &str) -> Result<usize, String> {
    let count: usize = text.parse().map_err(|_| format!("`{text}` is not a number of threads"))?;
    if count > 256 {
        return Err(format!("{count} threads is too many: give at most 256 (0 means one per core)"));
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command and every option says what it is for (`--help`, completions and the man
    /// page are made from these).
    #[test]
    fn every_command_and_option_has_help_text() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                if sub.get_name() == "help" {
                    continue;
                }
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(path.clone());
                }
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "sysstate", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:#?}");
        Cli::command().debug_assert();
    }
}
