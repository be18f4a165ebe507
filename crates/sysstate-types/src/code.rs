use serde::{Deserialize, Serialize};

/// Severity of an event or an error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    /// Something happened that needs no action.
    Info,
    /// The job went on, but something deserves a look.
    Warning,
    /// The job, or part of it, failed.
    Error,
}

macro_rules! error_codes {
    ($( $variant:ident = $name:literal, $id:literal, $level:ident,
        cause: $cause:literal, resolution: $resolution:literal; )*) => {
        /// A stable error code (DESIGN §4). Each has a kebab-case name, a numeric event id, a
        /// level, a generic cause and a generic resolution; the message that accompanies it at
        /// run time names the object and the culprit.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        pub enum ErrorCode { $( #[doc = $cause] $variant, )* }

        impl ErrorCode {
            /// Every code, in catalogue order.
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$variant, )* ];

            /// The stable kebab-case name, as printed in `error[NAME]`.
            pub fn as_str(self) -> &'static str {
                match self { $( ErrorCode::$variant => $name, )* }
            }

            /// The numeric event id written to the event log.
            pub fn event_id(self) -> u32 {
                match self { $( ErrorCode::$variant => $id, )* }
            }

            /// The level of the event this code produces.
            pub fn level(self) -> Level {
                match self { $( ErrorCode::$variant => Level::$level, )* }
            }

            /// What usually causes it, in one sentence.
            pub fn cause(self) -> &'static str {
                match self { $( ErrorCode::$variant => $cause, )* }
            }

            /// What the administrator should do, in one sentence.
            pub fn resolution(self) -> &'static str {
                match self { $( ErrorCode::$variant => $resolution, )* }
            }

            /// Looks a code up by its kebab-case name.
            pub fn from_name(name: &str) -> Option<ErrorCode> {
                ErrorCode::ALL.iter().copied().find(|code| code.as_str() == name)
            }
        }
    };
}

error_codes! {
    WriterTimeout = "writer-timeout", 1001, Error,
        cause: "a writer stayed frozen longer than its freeze-timeout: the system was short of CPU or memory, the provider commit was slow, or another shadow set was using the writer",
        resolution: "look at the load and memory pressure named in the message, stop what takes the resources or wait for the other backup to finish, then run the backup again; raise the writer's freeze-timeout only if the freeze is legitimately slow";
    WriterRetryable = "writer-retryable", 1002, Error,
        cause: "a writer reported a transient error (for example the application was busy)",
        resolution: "run the backup again; if it keeps failing, read the writer's own message";
    WriterNonretryable = "writer-nonretryable", 1003, Error,
        cause: "a writer reported an error that will not go away by retrying",
        resolution: "fix what the writer's own message names, then run the backup again";
    WriterOutOfResources = "writer-out-of-resources", 1004, Error,
        cause: "a writer ran out of memory, disk space or another resource",
        resolution: "free the resource the writer's message names, then run the backup again";
    WriterInconsistent = "writer-inconsistent", 1005, Error,
        cause: "a writer could not bring its application to a consistent state",
        resolution: "check the application's health as the writer's message says, then run the backup again";
    WriterNotResponding = "writer-not-responding", 1006, Error,
        cause: "a writer process died or stopped answering",
        resolution: "check why the writer process exited or hung (what it printed on stderr is in the job's log: `sysstate job` names it), fix it, and run the backup again";
    ShadowSetInProgress = "shadow-set-in-progress", 1010, Error,
        cause: "another shadow set (usually another backup) holds the machine's shadow-set lock",
        resolution: "wait for the job named in the message to finish, or run with `--wait DURATION`";
    CommitTimeout = "commit-timeout", 1011, Error,
        cause: "the provider took longer than `shadow.commit-timeout` to commit the shadow copies",
        resolution: "check the I/O load on the volumes named, use a faster provider (reflink or btrfs), or raise `shadow.commit-timeout`";
    ShadowStorageFull = "shadow-storage-full", 1012, Error,
        cause: "the shadow storage could not grow: its maximum size or its volume's free space is too small for the shadow copies",
        resolution: "free space on the storage volume, or raise the maximum with `sysstate shadowstorage resize`";
    ShadowStorageOldestDeleted = "shadow-storage-oldest-deleted", 1013, Warning,
        cause: "an older persistent shadow copy was deleted to make room for a new one",
        resolution: "nothing is needed; raise the shadow storage maximum size to keep more copies";
    ProviderUnsupported = "provider-unsupported", 1014, Error,
        cause: "the configured shadow copy provider cannot copy this volume (reflink on a filesystem without FICLONE, btrfs off a btrfs subvolume)",
        resolution: "set `shadow.provider` to `auto` (or to one that works on this filesystem: `sysstate providers` says what each needs)";
    ComponentLocked = "component-locked", 1020, Error,
        cause: "another program holds a lock on, or is writing to, a file of the component",
        resolution: "wait for the named process to finish, or stop it, and run the backup again";
    ComponentMissing = "component-missing", 1021, Error,
        cause: "a component named in the config or on the command line does not exist on this machine",
        resolution: "check the component's name and paths in the config, or drop it from `backup.components`";
    ComponentIncomplete = "component-incomplete", 1022, Error,
        cause: "a path of a component exists on the system but the shadow copy the backup read holds nothing of it, so the version would have lied: none was saved",
        resolution: "run the backup again (a path removed while the backup ran is not there the next time); if it fails the same way, check the `[[shadow.storage]]` of that path's volume with `sysstate doctor` and report the message";
    EntrySkipped = "entry-skipped", 1023, Warning,
        cause: "one entry could not be backed up or restored (a socket, a file that vanished, changed or could not be read or written)",
        resolution: "the warning names the entry and why; everything else of the version or the restore is whole";
    TargetUnavailable = "target-unavailable", 1030, Error,
        cause: "the backup target cannot be reached or does not exist",
        resolution: "check that the target path is mounted or the object store is reachable and the credentials are right";
    TargetFull = "target-full", 1031, Error,
        cause: "the backup target has no space left",
        resolution: "free space on the target, or run `sysstate forget` and `sysstate prune` to drop old versions";
    TargetPermission = "target-permission", 1032, Error,
        cause: "sysstate may not read or write the backup target",
        resolution: "give the service user write access to the target (owner and mode of the directory, or the bucket's policy)";
    RepositoryLocked = "repository-locked", 1033, Error,
        cause: "another process holds an exclusive lease on the repository",
        resolution: "wait for the process named in the message to finish; a lease of a dead process expires by itself";
    RepositoryCorrupt = "repository-corrupt", 1034, Error,
        cause: "data in the repository does not match its checksums, cannot be decoded, or is missing",
        resolution: "run `sysstate check --read-data`: it names the damaged files and the `sysstate repair` to run, then a backup stores the lost content again";
    WrongPassphrase = "wrong-passphrase", 1035, Error,
        cause: "no key of the repository opens with the passphrase given",
        resolution: "give the right passphrase through `SYSSTATE_PASSPHRASE`, `--passphrase-file` or the prompt";
    StateDirPermission = "state-dir-permission", 1040, Error,
        cause: "the state directory is not owned by the service user, is open to others, or is not writable; or its filesystem is full",
        resolution: "run `sysstate doctor --fix`, or set its owner to the service user and its mode to 0700; if its filesystem is full, free space on it";
    InvalidInput = "invalid-input", 1050, Error,
        cause: "a command-line argument or configuration value is not valid",
        resolution: "correct the argument or configuration key named in the message";
    Cancelled = "cancelled", 1070, Error,
        cause: "the job was stopped by SIGINT or SIGTERM (Ctrl-C, `kill`, or the service manager stopping it)",
        resolution: "nothing was stored and every writer was thawed; run the job again when ready";
    AgentRunning = "agent-running", 1080, Error,
        cause: "another agent runs on this machine: it holds the agent's lock in the runtime folder",
        resolution: "use the agent that runs (`sysstate agent status`), or stop it (`systemctl stop sysstate-agent`) before starting another";
    ScheduleSkipped = "schedule-skipped", 1081, Warning,
        cause: "a scheduled run came while the previous run of its kind was still running or queued",
        resolution: "let the running job end; if runs keep overlapping, space the schedule's times further apart";
    RetentionRefused = "retention-refused", 1082, Error,
        cause: "the retention policy would drop every version of a group, or the backup just made",
        resolution: "keep more in `[retention]` (`daily = 7`, a longer `within`); `sysstate forget --dry-run` with the same rules shows what they keep";
    NotificationFailed = "notification-failed", 1083, Warning,
        cause: "a notification could not be delivered: the webhook or mail server refused it or did not answer",
        resolution: "check the target named in `[notify]` (address, port, that the server runs); `sysstate notify test` tries every target and says how each went";
    VaultUnreachable = "vault-unreachable", 1090, Error,
        cause: "the vault did not answer: it is not running, the address is wrong, a firewall drops the connection, or its certificate is not the one this host pinned",
        resolution: "check that `sysstate vault serve` runs on the vault's machine and that this host reaches its address (the URL in the message); a vault re-initialised with a new certificate needs the host registered again";
    VaultForbidden = "vault-forbidden", 1091, Error,
        cause: "the vault refused what this host asked: a host may add data and read its own versions, never delete, overwrite or read another host's versions; or its token was revoked",
        resolution: "what the vault allows is in the message; to restore another host's versions, the vault's administrator grants it (`sysstate vault grant --restore-from A --to B`); a revoked host registers again with new credentials";
    VaultCredentialsExpired = "vault-credentials-expired", 1092, Error,
        cause: "the vault credentials file has expired or was used already: each is good for one registration, for 10 days by default",
        resolution: "on the vault, make a new one (`sysstate vault credentials --host NAME`) and register with it (`sysstate agent register FILE`)";
    HostNameTaken = "host-name-taken", 1093, Error,
        cause: "a host of that name is registered with the vault already",
        resolution: "register under another name, or revoke the old host on the vault first (`sysstate vault hosts revoke NAME`) when it is the same machine rebuilt";
    VaultImmutable = "vault-immutable", 1094, Error,
        cause: "the vault is immutable: it refuses to reduce a retention policy, to delete a version its retention still keeps, and, once locked, to be made mutable again",
        resolution: "give a retention that keeps at least as much, or wait until the retention drops the version; `sysstate vault immutability` says since when the vault is immutable, and whether it is locked (forever)";
    RestoreFailed = "restore-failed", 1060, Error,
        cause: "a file could not be restored",
        resolution: "read the message for the file and the reason, fix the destination, and run the restore again";
    RestoreDestination = "restore-destination", 1061, Error,
        cause: "the restore's destination cannot be created or written (a file in the way, a read-only or missing mount, no permission)",
        resolution: "choose a destination directory sysstate can create and write, or fix the one named in the message, and run the restore again";
    RecoverDiskTooSmall = "recover-disk-too-small", 1062, Error,
        cause: "the disk given to `sysstate recover` is smaller than the partitions the version's layout records",
        resolution: "recover onto a disk at least as large as the message says (a larger one is fine: the space after the last partition stays free)";
    ReleaseMismatch = "release-mismatch", 1063, Error,
        cause: "the system state is of another release than the system it would be applied to: a newer release onto an older one, or a base system of another release than the version's",
        resolution: "apply it to a machine of the version's release (upgrade the older one first), or recover with a base system of that release";
    RecoverUnsupported = "recover-unsupported", 1064, Error,
        cause: "the version's disk layout or system holds something `sysstate recover` cannot rebuild yet (LVM, RAID, LUKS, several disks, btrfs subvolumes, a filesystem with no mkfs here, a system that is not Debian-based, another architecture)",
        resolution: "rebuild that part by hand, then restore the version's components over it (`sysstate restore --to`); `docs/recovery.md` says what is recreated and what is not";
    RecoverFailed = "recover-failed", 1065, Error,
        cause: "a step of the recovery failed: partitioning, a mkfs, the base system, the packages, the restore or the boot loader",
        resolution: "the message names the step, its command and what it printed; fix the cause (a mirror, a tool missing from the rescue system) and run `sysstate recover --overwrite` again: it starts over from the partitions";
    Internal = "internal", 1099, Error,
        cause: "an unexpected error inside sysstate",
        resolution: "run the command again with `-v`, and report the message and the job log";
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_event_ids_are_unique_and_round_trip() {
        let mut ids = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(ids.insert(code.event_id()), "duplicate event id for {code}");
            assert!(names.insert(code.as_str()), "duplicate name {code}");
            assert_eq!(ErrorCode::from_name(code.as_str()), Some(*code));
        }
        assert_eq!(ErrorCode::from_name("no-such-code"), None);
    }
}
