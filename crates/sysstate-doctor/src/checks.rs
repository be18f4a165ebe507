//! The checks, in the seed's order: installation, the state directory (the "System Volume
//! Information" of sysstate), the service's parts, shadow storage, the target, and a real
//! validation backup through the normal job path.

use crate::{Check, Options};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use sysstate_engine::config::{ComponentConfig, Config};
use sysstate_engine::generated::installed;
use sysstate_engine::jobs::{self, JobKind, JobState, JobStore};
use sysstate_engine::{components, paths};
use sysstate_repo::backend::FileKind;
use sysstate_repo::NoProgress;
use sysstate_types::units::bytes;

/// Version, config, and the tools the provider and the components need. Returns the config
/// when it parses.
pub(crate) fn installation(options: &Options, checks: &mut Vec<Check>) -> Option<Config> {
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "sysstate".into());
    checks.push(Check::ok("installation.version", format!("sysstate {} at `{exe}`", env!("CARGO_PKG_VERSION"))));
    let config = match Config::load(&options.config_file, options.config_required) {
        Ok(config) => {
            let found = if options.config_file.exists() {
                format!("`{}` parses", options.config_file.display())
            } else {
                format!("no config file at `{}`: the embedded defaults apply", options.config_file.display())
            };
            checks.push(Check::ok("installation.config", found));
            config
        }
        Err(error) => {
            checks.push(Check::failed("installation.config", error.message.clone(), error.resolution()));
            return None;
        }
    };

    let provider = config.shadow.provider.clone().unwrap_or_else(|| "auto".into());
    if provider == "btrfs" && !installed("btrfs") {
        checks.push(Check::failed(
            "installation.provider-tools",
            "`shadow.provider = \"btrfs\"` needs the `btrfs` program (package btrfs-progs), which is not installed",
            "install it (`apt-get install btrfs-progs`), or set `shadow.provider = \"auto\"`",
        ));
    } else {
        checks.push(Check::ok("installation.provider-tools", format!("provider `{provider}` has what it needs")));
    }

    let root = &options.root;
    let live = root == Path::new("/");
    let mut wanted: Vec<(&str, &str, &str)> = Vec::new(); // (program, package, component)
    if root.join("var/lib/dpkg").is_dir() {
        wanted.extend([("dpkg", "dpkg", "packages"), ("apt-mark", "apt", "packages")]);
    }
    if root.join("var/lib/rpm").is_dir() {
        wanted.push(("rpm", "rpm", "packages"));
    }
    if live {
        wanted.extend([
            ("lsblk", "util-linux", "disk-layout"),
            ("blkid", "util-linux", "disk-layout"),
            ("findmnt", "util-linux", "disk-layout"),
            ("sfdisk", "fdisk", "disk-layout"),
        ]);
        if Path::new("/sys/firmware/efi").exists() {
            wanted.push(("efibootmgr", "efibootmgr", "bootloader"));
        }
        if Path::new("/etc/crypttab").exists() {
            wanted.push(("cryptsetup", "cryptsetup-bin", "disk-layout"));
        }
        if Path::new("/etc/lvm").exists() {
            wanted.push(("lvm", "lvm2", "disk-layout"));
        }
    }
    let missing: Vec<_> = wanted.iter().filter(|(program, _, _)| !installed(program)).collect();
    if missing.is_empty() {
        checks
            .push(Check::ok("installation.component-tools", "every program the generated components run is installed"));
    } else {
        let list: Vec<String> = missing
            .iter()
            .map(|(program, package, component)| format!("`{program}` ({package}) for {component}"))
            .collect();
        let packages: std::collections::BTreeSet<&str> = missing.iter().map(|(_, package, _)| *package).collect();
        checks.push(Check::warning(
            "installation.component-tools",
            format!("not installed: {}; their output is left out of the version", list.join(", ")),
            format!("install them: `apt-get install {}`", packages.into_iter().collect::<Vec<_>>().join(" ")),
        ));
    }
    Some(config)
}

/// The state directory: owner, mode 0700, writable, free space; `--fix` repairs owner and mode.
pub(crate) fn state_dir(options: &Options, checks: &mut Vec<Check>) {
    let dir = paths::state_dir();
    let shown = dir.display().to_string();
    let euid = rustix::process::geteuid().as_raw();
    if !dir.exists() {
        if options.fix {
            use std::os::unix::fs::DirBuilderExt;
            match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir) {
                Ok(()) => checks.push(Check {
                    fixed: Some(format!("created `{shown}` with mode 0700")),
                    ..Check::ok("state-dir.exists", format!("`{shown}` did not exist"))
                }),
                Err(error) => checks.push(Check::failed(
                    "state-dir.exists",
                    format!("`{shown}` does not exist and cannot be created: {error}"),
                    "create it as the service user with mode 0700",
                )),
            }
        } else {
            // Not a fault: the first job makes it, private (as `--fix` would now).
            checks.push(Check::ok(
                "state-dir.exists",
                format!("`{shown}` does not exist yet; the first job creates it with mode 0700"),
            ));
            return;
        }
    }
    let Ok(meta) = std::fs::metadata(&dir) else { return };

    let id = "state-dir.owner";
    if meta.uid() == euid {
        checks.push(Check::ok(id, format!("`{shown}` is owned by the service user (uid {euid})")));
    } else if options.fix {
        match chown_tree(&dir, euid, rustix::process::getegid().as_raw()) {
            Ok(count) => checks.push(Check {
                fixed: Some(format!(
                    "changed the owner of `{shown}` and {count} entries under it from uid {} to uid {euid}",
                    meta.uid()
                )),
                ..Check::ok(id, format!("`{shown}` was owned by uid {}, not the service user (uid {euid})", meta.uid()))
            }),
            Err(error) => checks.push(Check::failed(
                id,
                format!("cannot change the owner of `{shown}`: {error}"),
                "run the fix as root",
            )),
        }
    } else {
        checks.push(Check::failed(
            id,
            format!("`{shown}` is owned by uid {}, not the service user (uid {euid}): the job store, keys and shadow copies may be changed by another user", meta.uid()),
            format!("run `sysstate doctor --fix`, or `chown -R {euid} {shown}`"),
        ));
    }

    let id = "state-dir.mode";
    let mode = meta.mode() & 0o7777;
    if mode == 0o700 {
        checks.push(Check::ok(id, format!("`{shown}` has mode 0700")));
    } else if options.fix {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)) {
            Ok(()) => checks.push(Check {
                fixed: Some(format!("changed the mode of `{shown}` from {mode:04o} to 0700")),
                ..Check::ok(id, format!("`{shown}` had mode {mode:04o}"))
            }),
            Err(error) => checks.push(Check::failed(
                id,
                format!("cannot change the mode of `{shown}`: {error}"),
                "run the fix as root",
            )),
        }
    } else {
        checks.push(Check::failed(
            id,
            format!("`{shown}` has mode {mode:04o}: others can read the job history, key files and shadow copies"),
            format!("run `sysstate doctor --fix`, or `chmod 0700 {shown}`"),
        ));
    }

    match probe_write(&dir) {
        Ok(()) => checks.push(Check::ok("state-dir.writable", format!("`{shown}` is writable"))),
        Err(error) => checks.push(Check::failed(
            "state-dir.writable",
            format!("`{shown}` cannot be written: {error}"),
            "remount its filesystem read-write, or free space on it",
        )),
    }
    space_check("state-dir.space", &dir, checks);
}

/// Changes the owner of `dir` and everything under it; returns the entries changed below it.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<u64> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    let mut count = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current)? {
            let entry = entry?;
            std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))?;
            count += 1;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(count)
}

/// Creates and removes a file in `dir`.
fn probe_write(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".sysstate-doctor-{}", std::process::id()));
    std::fs::write(&probe, b"probe")?;
    std::fs::remove_file(probe)
}

/// The nearest existing directory at or above `path`.
fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors().find(|p| p.is_dir()).unwrap_or(Path::new("/")).to_path_buf()
}

fn space_check(id: &str, path: &Path, checks: &mut Vec<Check>) {
    const LOW: u64 = 1 << 30;
    match sysstate_shadow::storage::volume_space(&existing_ancestor(path)) {
        Ok((total, free)) if free < LOW.min(total / 20) => checks.push(Check::warning(
            id,
            format!("{} free of {} on the filesystem of `{}`", bytes(free), bytes(total), path.display()),
            "free space on that filesystem",
        )),
        Ok((total, free)) => checks.push(Check::ok(
            id,
            format!("{} free of {} on the filesystem of `{}`", bytes(free), bytes(total), path.display()),
        )),
        Err(error) => checks.push(Check::warning(
            id,
            format!("cannot read the free space of `{}`: {error}", path.display()),
            "check the filesystem",
        )),
    }
}

/// The service's parts: a broken part is a failed check.
pub(crate) fn services(config: &Config, options: &Options, checks: &mut Vec<Check>) {
    for part in crate::services::parts(config, &options.root, &paths::state_dir(), &paths::runtime_dir()) {
        if ["agent", "api", "notifications", "metrics"].contains(&part.name.as_str()) {
            continue; // the agent's own checks say more (`agent.*`)
        }
        let id = format!("services.{}", part.name.replace(' ', "."));
        if part.healthy {
            checks.push(Check::ok(&id, format!("{}: {}", part.role, part.status)));
        } else {
            checks.push(Check::failed(
                &id,
                format!("{}: {}", part.role, part.status),
                "install what is missing, or fix the writer's `[[writer]]` entry; `sysstate services` shows every part",
            ));
        }
    }
}

/// Each shadow storage location: writable, its maximum possible, and room for the shadow
/// copies the components need.
pub(crate) fn shadow_storage(config: &Config, options: &Options, checks: &mut Vec<Check>) {
    let areas = match sysstate_engine::shadow::storage_areas(config, &paths::state_dir()) {
        Ok(areas) => areas,
        Err(error) => {
            checks.push(Check::failed("shadow-storage.config", error.message.clone(), error.resolution()));
            return;
        }
    };
    let resolved = components::select(config, &options.root, &[]).map(|(r, _)| r).unwrap_or_default();
    for area in &areas {
        let on = area.on.display().to_string();
        let volume = area.for_volume.display().to_string();
        let ancestor = existing_ancestor(&area.on);
        match probe_write(&ancestor) {
            Ok(()) => checks.push(Check::ok("shadow-storage.location", format!("`{on}` (for `{volume}`) is writable"))),
            Err(error) => {
                checks.push(Check::failed(
                    "shadow-storage.location",
                    format!("shadow storage `{on}` (for `{volume}`) cannot be written: `{}`: {error}", ancestor.display()),
                    format!("make `{}` writable (or remount it read-write), or point `[[shadow.storage]] on` for `{volume}` at a writable place", ancestor.display()),
                ));
                continue;
            }
        }
        let Ok((total, free)) = sysstate_shadow::storage::volume_space(&ancestor) else { continue };
        let limit = area.max_size.resolve(total);
        let resize =
            |size: u64| format!("sysstate shadowstorage resize --for {volume} --on {on} --max-size {}", size_arg(size));
        if let Some(limit) = limit.filter(|l| *l > total) {
            checks.push(Check::failed(
                "shadow-storage.max-size",
                format!("the maximum size of `{on}` ({}) is larger than its volume ({})", bytes(limit), bytes(total)),
                format!("set a size the volume can hold: `{}`", resize(total / 10)),
            ));
            continue;
        }
        // What the next copy needs: the copy provider copies every file of the components on
        // this volume once; reflink and btrfs copies take almost nothing.
        let paths: Vec<PathBuf> = resolved
            .iter()
            .flat_map(|r| r.present.iter())
            .map(PathBuf::from)
            .filter(|p| {
                sysstate_engine::shadow::mount_point(&components::under_root(&options.root, &p.display().to_string()))
                    == area.for_volume
            })
            .collect();
        let clones = matches!(config.shadow.provider.as_deref(), Some("reflink" | "btrfs"));
        let needed = if clones { 0 } else { sysstate_shadow::provider::estimate(&options.root, &paths) };
        let used = area.used();
        // The copy provider keeps one base copy and refreshes it: it must fit whole.
        let room = limit.unwrap_or(u64::MAX).min(free.saturating_add(used));
        let max = limit.map(bytes).unwrap_or_else(|| "unbounded".into());
        if needed > room {
            checks.push(Check::warning(
                "shadow-storage.room",
                format!(
                    "the components on `{volume}` need {} of shadow copies; `{on}` allows {max} ({} free on its volume, {} used by copies)",
                    bytes(needed),
                    bytes(free),
                    bytes(used)
                ),
                format!("raise its maximum: `{}` (or free space on its volume)", resize(needed + needed / 4)),
            ));
        } else {
            checks.push(Check::ok(
                "shadow-storage.room",
                format!(
                    "`{on}` allows {max}; the components on `{volume}` need {} ({} free)",
                    bytes(needed),
                    bytes(free)
                ),
            ));
        }
    }
}

/// A size as `sysstate shadowstorage resize` takes it (MiB, rounded up).
fn size_arg(size: u64) -> String {
    format!("{}MiB", size.div_ceil(1 << 20).max(1))
}

/// The target: reachable, writable, free space, the repository opens, no stale lease.
pub(crate) fn target(target: &str, options: &Options, checks: &mut Vec<Check>) {
    let Some(reached) = target_reachable(target, checks) else { return };
    target_writable(&reached, checks);
    if let Some(dir) = &reached.local {
        space_check("target.space", dir, checks);
    }
    if !reached.exists {
        checks.push(Check::ok(
            "target.repository",
            format!("no repository at `{target}` yet: the first backup creates it"),
        ));
        return;
    }
    target_repository(&reached, options, checks);
    target_modes(&reached, checks);
    target_leases(&reached, checks);
}

/// `target.modes`: a local repository is its owner's only — its folders, its config and above
/// all its key files, which anyone who can read them may attack offline.
fn target_modes(reached: &Reached<'_>, checks: &mut Vec<Check>) {
    use std::os::unix::fs::MetadataExt;
    let Some(dir) = &reached.local else { return };
    let mut open = Vec::new();
    let mut look = |path: &Path| {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.mode() & 0o077 != 0 {
                open.push(format!("`{}` ({:04o})", path.display(), meta.mode() & 0o7777));
            }
        }
    };
    look(dir);
    look(&dir.join("config"));
    for kind in ["keys", "index", "versions", "data", "locks"] {
        look(&dir.join(kind));
    }
    for key in std::fs::read_dir(dir.join("keys")).into_iter().flatten().flatten() {
        look(&key.path());
    }
    if open.is_empty() {
        checks.push(Check::ok("target.modes", format!("the repository at `{}` is its owner's only", dir.display())));
    } else {
        checks.push(Check::warning(
            "target.modes",
            format!("others can use parts of the repository at `{}`: {}", dir.display(), open.join(", ")),
            format!(
                "`chmod -R go-rwx {}`: a readable key file lets anyone guess the passphrase offline",
                dir.display()
            ),
        ));
    }
}

/// A target that answers: its backend, its folder when local, and whether a repository is there.
struct Reached<'t> {
    target: &'t str,
    backend: std::sync::Arc<dyn sysstate_repo::backend::Backend>,
    local: Option<PathBuf>,
    exists: bool,
}

/// `target.reachable`: the backend opens and answers; a local target or its parent exists.
fn target_reachable<'t>(target: &'t str, checks: &mut Vec<Check>) -> Option<Reached<'t>> {
    let backend = match sysstate_engine::ops::backend(target) {
        Ok(backend) => backend,
        Err(error) => {
            checks.push(Check::failed("target.reachable", error.message.clone(), error.resolution()));
            return None;
        }
    };
    let local = (!target.contains("://")).then(|| PathBuf::from(target));
    if let Some(dir) = local.as_ref().filter(|dir| !dir.exists()) {
        let parent = existing_ancestor(dir);
        if dir.parent().is_some_and(|p| p.is_dir()) {
            checks.push(Check::ok(
                "target.reachable",
                format!("`{target}` does not exist yet; the first backup creates it in `{}`", parent.display()),
            ));
        } else {
            checks.push(Check::failed(
                "target.reachable",
                format!("`{target}` does not exist, nor its parent (the nearest existing folder is `{}`): is its filesystem mounted?", parent.display()),
                "mount the target's filesystem, or correct `backup.target` / `--target`",
            ));
            return None;
        }
    }
    match sysstate_repo::Repository::exists(&*backend) {
        Ok(exists) => {
            if local.as_ref().is_none_or(|d| d.exists()) {
                checks.push(Check::ok("target.reachable", format!("`{target}` answers")));
            }
            Some(Reached { target, backend, local, exists })
        }
        Err(error) => {
            let error = sysstate_engine::EngineError::from(error);
            checks.push(Check::failed(
                "target.reachable",
                format!("`{target}` cannot be reached: {}", error.message),
                error.resolution(),
            ));
            None
        }
    }
}

/// `target.writable`: a probe lease file, written and removed (in the nearest existing folder
/// of a local target not made yet).
fn target_writable(reached: &Reached<'_>, checks: &mut Vec<Check>) {
    let target = reached.target;
    let probe = format!("doctor-probe-{}", std::process::id());
    let write = match &reached.local {
        Some(dir) if !dir.exists() => probe_write(&existing_ancestor(dir)).map_err(|e| e.to_string()),
        _ => reached
            .backend
            .write(FileKind::Lock, &probe, b"{}")
            .and_then(|()| reached.backend.remove(FileKind::Lock, &probe))
            .map_err(|e| e.to_string()),
    };
    match write {
        Ok(()) => checks.push(Check::ok("target.writable", format!("`{target}` takes writes"))),
        Err(error) => checks.push(Check::failed(
            "target.writable",
            format!("`{target}` cannot be written: {error}"),
            sysstate_types::ErrorCode::TargetPermission.resolution(),
        )),
    }
}

/// `target.repository`: the repository opens with the passphrase given.
fn target_repository(reached: &Reached<'_>, options: &Options, checks: &mut Vec<Check>) {
    let target = reached.target;
    let Some(passphrase) = &options.passphrase else {
        checks.push(Check::warning(
            "target.repository",
            format!("a repository is at `{target}`, but no passphrase was found to open it"),
            "set `SYSSTATE_PASSPHRASE` or pass `--passphrase-file` to let the doctor open it",
        ));
        return;
    };
    match sysstate_repo::Repository::open(reached.backend.clone(), passphrase) {
        Ok(repo) => {
            let versions = repo.versions().map(|v| v.len()).unwrap_or(0);
            checks.push(Check::ok(
                "target.repository",
                format!("the repository at `{target}` opens; {versions} versions"),
            ));
        }
        Err(error) => {
            let error = sysstate_engine::EngineError::from(error);
            checks.push(Check::failed("target.repository", error.message.clone(), error.resolution()).code(error.code));
        }
    }
}

/// `target.leases`: no lease held by a process that is gone.
fn target_leases(reached: &Reached<'_>, checks: &mut Vec<Check>) {
    let leases = match sysstate_repo::lock::list_leases(&*reached.backend) {
        Ok(leases) => leases,
        Err(error) => {
            checks.push(Check::warning(
                "target.leases",
                format!("cannot list the leases: {error}"),
                "check the target",
            ));
            return;
        }
    };
    let host = sysstate_repo::lock::host_name();
    let now = sysstate_repo::lock::now_ns();
    let stale: Vec<String> = leases
        .iter()
        .filter_map(|(_, info)| info.as_ref())
        .filter(|i| i.is_stale(now, &host))
        .map(|i| i.describe())
        .collect();
    if stale.is_empty() {
        checks
            .push(Check::ok("target.leases", format!("{} leases, none held by a process that is gone", leases.len())));
    } else {
        checks.push(Check::warning(
            "target.leases",
            format!("leases held by processes that are gone: {}", stale.join("; ")),
            "nothing to do: the next job takes a stale lease over (at once on this host)",
        ));
    }
}

/// A real, small system-state backup of a temporary component into a temporary repository
/// beside the target, through the normal job path, read back from the job store.
pub(crate) fn validation(config: &Config, target: &str, checks: &mut Vec<Check>) {
    let id = "validation.backup";
    let work = paths::state_dir().join("doctor").join(format!("validate-{}", std::process::id()));
    let temp_target = validation_target(target);
    let result = validation_tree(&work).and_then(|root| validation_backup(config, root, &temp_target));
    validation_clean_up(&work, &temp_target);
    match result {
        Ok(found) => checks.push(Check::ok(id, found)),
        Err(error) => checks.push(
            Check::failed(
                id,
                format!(
                    "a backup of a test component into `{temp_target}` failed: error[{}]: {} ({})",
                    error.code,
                    error.message,
                    error.cause()
                ),
                error.resolution(),
            )
            .code(error.code),
        ),
    }
}

/// A repository beside the target, on the same storage, that nothing else uses.
fn validation_target(target: &str) -> String {
    match target.split_once("://") {
        Some(_) => format!("{}/doctor-validate-{}", target.trim_end_matches('/'), std::process::id()),
        None => {
            let path = Path::new(target);
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "target".into());
            path.with_file_name(format!(".{name}-doctor-validate-{}", std::process::id())).display().to_string()
        }
    }
}

/// A root holding one small file to back up, under `work`.
fn validation_tree(work: &Path) -> sysstate_engine::Result<PathBuf> {
    let io = |e: std::io::Error| {
        sysstate_engine::EngineError::new(
            sysstate_types::ErrorCode::StateDirPermission,
            format!("cannot prepare the validation in `{}`: {e}", work.display()),
        )
    };
    let root = work.join("root");
    std::fs::create_dir_all(root.join("data")).map_err(io)?;
    std::fs::write(root.join("data/validation.txt"), b"sysstate doctor validation\n").map_err(io)?;
    Ok(root)
}

/// The backup, as a `validate` job with a random passphrase, and its record read back from
/// the job store as `sysstate job --previous 1` would.
fn validation_backup(config: &Config, root: PathBuf, temp_target: &str) -> sysstate_engine::Result<String> {
    let mut config = config.clone();
    config.components = vec![ComponentConfig {
        name: "doctor-validation".into(),
        paths: vec!["/data".into()],
        exclude: Vec::new(),
        lock_check: None,
    }];
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key).expect("the kernel's random source is available");
    let passphrase = hex::encode(key);
    let store = std::sync::Arc::new(JobStore::open(&paths::state_dir())?);
    let components = vec!["doctor-validation".to_string()];
    let request = sysstate_engine::ops::BackupRequest {
        damage: None,
        journal: None,
        config,
        root,
        target: temp_target.to_string(),
        components: components.clone(),
        tags: vec!["doctor".into()],
        threads: 1,
        wait: Some(std::time::Duration::from_secs(60)),
        trigger: sysstate_shadow::ThawTrigger::default(),
    };
    let report = jobs::run(&store, JobKind::Validate, Some(temp_target), &components, &NoProgress, |job| {
        sysstate_engine::ops::backup(&request, passphrase.as_bytes(), job)
    })?;
    let job = &report.job;
    let record = store.job(job)?.ok_or_else(|| {
        sysstate_engine::EngineError::new(
            sysstate_types::ErrorCode::Internal,
            format!("job {job} is not in the job store"),
        )
    })?;
    match record.state {
        JobState::Succeeded => Ok(format!(
            "a backup of a test component into `{temp_target}` succeeded as job {job} (version {}, {} files), and the job store shows it",
            report.id.short(),
            report.version.stats.files
        )),
        state => Err(sysstate_engine::EngineError::new(
            sysstate_types::ErrorCode::Internal,
            format!("the validation backup ended but the job store shows job {job} as `{state}`"),
        )),
    }
}

/// Removes the validation's tree and repository.
fn validation_clean_up(work: &Path, temp_target: &str) {
    let _ = std::fs::remove_dir_all(work);
    if !temp_target.contains("://") {
        let _ = std::fs::remove_dir_all(temp_target);
        return;
    }
    let Ok(backend) = sysstate_engine::ops::backend(temp_target) else { return };
    for kind in [FileKind::Pack, FileKind::Index, FileKind::Version, FileKind::Key, FileKind::Lock, FileKind::Config] {
        for (name, _) in backend.list(kind).unwrap_or_default() {
            let _ = backend.remove(kind, &name);
        }
    }
}
