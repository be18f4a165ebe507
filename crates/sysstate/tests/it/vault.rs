//! The vault, run for real: `sysstate vault serve` over HTTPS on 127.0.0.1 with its own
//! certificate authority, hosts registered with credentials files, each host a sandbox of its own
//! (its own state folder and token), and what a host may not do tried with curl as an attacker
//! holding the host's token would.

use crate::support::{assert_job_failed, assert_same, make_tree, snapshot, text, Entry, Sandbox};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// A vault serving a folder; stopped when dropped.
pub(crate) struct Vault {
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    port: u16,
}

impl Vault {
    /// A vault whose storage is a folder of its own.
    pub(crate) fn start() -> Vault {
        Vault::start_on(None)
    }

    /// A vault whose storage is `Some((url, storage.env))`, or a folder of its own.
    fn start_on(storage: Option<(&str, &str)>) -> Vault {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut vault = Vault { dir, child: None, port };
        let url = vault.url();
        let folder = vault.dir.path().join("storage").display().to_string();
        let listen = format!("127.0.0.1:{port}");
        let made = vault
            .command(&[
                "init",
                "--storage",
                storage.map_or(folder.as_str(), |s| s.0),
                "--url",
                &url,
                "--listen",
                &listen,
            ])
            .output()
            .unwrap();
        assert!(made.status.success(), "{}", text(&made.stderr));
        if let Some((_, settings)) = storage {
            vault.write_storage_env(settings);
        }
        vault.serve();
        vault
    }

    /// A second process of this vault, as behind a load balancer: its certificates and
    /// settings, its storage reached with `settings` (another endpoint), its own port.
    fn beside(&self, settings: &str) -> Vault {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut vault = Vault { dir, child: None, port };
        std::fs::create_dir(vault.dir.path().join("vault")).unwrap();
        for name in ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"] {
            std::fs::copy(self.dir.path().join("vault").join(name), vault.dir.path().join("vault").join(name)).unwrap();
        }
        let config = std::fs::read_to_string(self.dir.path().join("vault/vault.toml")).unwrap();
        let config = config.replace(&self.port.to_string(), &port.to_string());
        std::fs::write(vault.dir.path().join("vault/vault.toml"), config).unwrap();
        vault.write_storage_env(settings);
        vault.serve();
        vault
    }

    fn write_storage_env(&self, settings: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join("vault/storage.env");
        std::fs::write(&path, settings).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn serve(&mut self) {
        self.serve_with(&[]);
    }

    /// Serves with more environment (failpoints).
    fn serve_with(&mut self, env: &[(&str, &str)]) {
        let mut command = self.command(&["serve"]);
        command.envs(env.iter().copied()).stderr(std::process::Stdio::null());
        self.child = Some(command.spawn().unwrap());
        let until = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < until, "the vault did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::Term)
                .unwrap();
            assert!(child.wait().unwrap().success());
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("vault://127.0.0.1:{}", self.port)
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sysstate"));
        command
            .arg("vault")
            .args(args)
            .env("SYSSTATE_VAULT_DIR", self.dir.path().join("vault"))
            .env("SYSSTATE_CONFIG", self.dir.path().join("none.toml"))
            .env("SYSSTATE_STATE_DIR", self.dir.path().join("state"))
            .env("SYSSTATE_RUNTIME_DIR", self.dir.path().join("run"))
            .stdin(std::process::Stdio::null());
        let _ = std::fs::write(self.dir.path().join("none.toml"), "");
        command
    }

    /// Runs a command that the vault refuses with `code` (exit code 2).
    fn refused(&self, args: &[&str], code: &str) -> String {
        let output = self.command(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "`vault {}`: {}", args.join(" "), text(&output.stderr));
        assert!(text(&output.stderr).contains(&format!("error[{code}]")), "{}", text(&output.stderr));
        text(&output.stderr)
    }

    fn ok(&self, args: &[&str]) -> String {
        let output = self.command(args).output().unwrap();
        assert!(output.status.success(), "`vault {}`: {}", args.join(" "), text(&output.stderr));
        text(&output.stdout)
    }

    /// Runs a command that changes what hosts may do (revoke, grant, forget, undelete), and
    /// waits until every vault process reads the records again: they judge requests by records
    /// at most 2 s old.
    fn change(&self, args: &[&str]) {
        self.ok(args);
        std::thread::sleep(std::time::Duration::from_millis(2_100));
    }

    fn revoke(&self, host: &str) {
        self.change(&["hosts", "revoke", host]);
    }

    /// A credentials file for `host`, good for `expires`.
    pub(crate) fn credentials(&self, host: &str, expires: &str) -> PathBuf {
        let file = self.dir.path().join(format!("{host}.vault-credentials"));
        let _ = std::fs::remove_file(&file);
        self.ok(&["credentials", "--host", host, "--expires", expires, "--output", file.to_str().unwrap()]);
        file
    }
}

impl Drop for Vault {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A host: a sandbox whose target is the vault, registered as `name`, with a small tree.
fn host(vault: &Vault, name: &str, seed: u64) -> (Sandbox, PathBuf) {
    let mut sandbox = Sandbox::new().with_data_component();
    sandbox.target = vault.url();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 30, seed);
    let file = vault.credentials(name, "10d");
    let registered = sandbox.ok(&["agent", "register", file.to_str().unwrap()]);
    assert!(text(&registered.stdout).contains(&format!("registered as `{name}`")), "{}", text(&registered.stdout));
    (sandbox, root)
}

fn token_of(sandbox: &Sandbox) -> String {
    let credentials: Value =
        serde_json::from_slice(&std::fs::read(sandbox.path("state/vault/credentials.json")).unwrap()).unwrap();
    credentials["token"].as_str().unwrap().to_string()
}

/// The ids of the versions `sandbox`'s host sees in its target.
fn version_ids(sandbox: &Sandbox) -> Vec<String> {
    sandbox.json(&["versions"], 0).as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap().to_string()).collect()
}

/// curl against the vault's API with `token`, trusting only the vault's CA: the status.
fn curl(vault: &Vault, token: &str, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
    let body_file = vault.dir.path().join("curl-body");
    std::fs::write(&body_file, body.unwrap_or_default()).unwrap();
    let mut command = std::process::Command::new("curl");
    command
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--cacert"])
        .arg(vault.dir.path().join("vault/ca.pem"))
        .args(["-X", method, "-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("https://127.0.0.1:{}{path}", vault.port));
    if body.is_some() {
        command.arg("--data-binary").arg(format!("@{}", body_file.display()));
    }
    let output = command.output().unwrap();
    let out = text(&output.stdout);
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn two_hosts_add_but_never_destroy_and_see_only_their_own_versions() {
    let vault = Vault::start();
    let (alpha, alpha_root) = host(&vault, "alpha", 1);
    let (beta, beta_root) = host(&vault, "beta", 2);
    let a = alpha.backup_data(&alpha_root);
    let b = beta.backup_data(&beta_root);
    // Each lists its own versions only.
    assert_eq!(version_ids(&alpha), vec![a.clone()]);
    assert_eq!(version_ids(&beta), vec![b.clone()]);
    let listing = vault.ok(&["hosts", "--json"]);
    let hosts: Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(hosts.as_array().unwrap().len(), 2, "{hosts:#}");

    // Alpha's token, in an attacker's hands: no delete, no overwrite, nothing of beta's.
    let token = token_of(&alpha);
    let (status, body) = curl(&vault, &token, "DELETE", &format!("/v1/repo/versions/{a}"), None);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("vault-forbidden"), "{body}");
    let manifest = curl(&vault, &token, "GET", &format!("/v1/repo/versions/{a}"), None);
    let (status, body) = curl(&vault, &token, "PUT", &format!("/v1/repo/versions/{a}"), Some(b"ransom"));
    assert_eq!(status, 400, "other bytes under a manifest's name: {body}");
    assert!(body.contains("not the ones its name is the hash of"), "{body}");
    assert_eq!(curl(&vault, &token, "GET", &format!("/v1/repo/versions/{a}"), None), manifest, "the manifest changed");
    let (status, body) = curl(&vault, &token, "PUT", "/v1/repo/config/config", Some(b"{\"magic\": \"ransom\"}"));
    assert_eq!(status, 403, "an overwrite of the config: {body}");
    assert!(body.contains("never overwrite"), "{body}");
    let (status, body) = curl(&vault, &token, "GET", &format!("/v1/repo/versions/{b}"), None);
    assert_eq!(status, 403, "beta's version read by alpha: {body}");
    let (status, body) = curl(&vault, &token, "GET", "/v1/repo/versions", None);
    assert_eq!(status, 200);
    assert!(body.contains(&a) && !body.contains(&b), "{body}");
    let (_, pack_list) = curl(&vault, &token, "GET", "/v1/repo/data", None);
    let pack = serde_json::from_str::<Value>(&pack_list).unwrap()[0][0].as_str().unwrap().to_string();
    let (status, _) = curl(&vault, &token, "DELETE", &format!("/v1/repo/data/{pack}"), None);
    assert_eq!(status, 403, "a pack deleted");
    let (status, body) = curl(&vault, &token, "PUT", &format!("/v1/repo/data/{}", "ab".repeat(32)), Some(b"junk"));
    assert_eq!(status, 400, "a pack under a name that is not its hash: {body}");
    let huge = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(vault.dir.path().join("vault/ca.pem"))
        .args(["-H", &format!("Authorization: Bearer {token}"), "-H", "Range: bytes=0-999999999999"])
        .arg(format!("https://127.0.0.1:{}/v1/repo/data/{pack}", vault.port))
        .output()
        .unwrap();
    assert_eq!(text(&huge.stdout), "416", "a range of a terabyte");
    let (status, _) = curl(&vault, &token, "PUT", "/v1/repo/protected/x", Some(b""));
    assert_eq!(status, 403);
    let (status, _) = curl(&vault, &token, "GET", "/v1/repo/vault", None);
    assert_eq!(status, 404, "the vault's own records are not a host's to list");
    let (status, _) = curl(&vault, &token, "GET", "/v1/repo/versions/..%2fvault%2fh~x", None);
    assert_eq!(status, 404, "nor to read by climbing out of a folder");
    let (status, _) = curl(&vault, &token, "GET", "/v1/repo/versions/..%2f..%2fstate.json", None);
    assert!(status == 404 || status == 403, "{status}");
    let (status, _) = curl(&vault, "not-a-token", "GET", "/v1/repo/versions", None);
    assert_eq!(status, 403);

    // The host's own tools get the same answer: forgetting its own version is refused, and said.
    let refused = alpha.run_code(&["forget", "--version", &a], 2);
    assert!(text(&refused.stderr).contains("error[vault-forbidden]"), "{}", text(&refused.stderr));
    assert_job_failed(&alpha, "vault-forbidden");
    assert_eq!(version_ids(&alpha), vec![a.clone()], "the version is still there");

    // Beta restores alpha's system state once the vault grants it, byte for byte.
    let denied = beta.run_code(&["restore", "--version", &a, "--to", beta.path("from-alpha").to_str().unwrap()], 2);
    assert!(
        text(&denied.stderr).contains("does not exist") || text(&denied.stderr).contains("vault-forbidden"),
        "{}",
        text(&denied.stderr)
    );
    vault.change(&["grant", "--restore-from", "alpha", "--to", "beta"]);
    let to = beta.path("from-alpha");
    beta.ok(&["restore", "--version", &a, "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&alpha_root.join("data")), &snapshot(&to.join("data")));

    // A revoked host is refused (within the 2 s the vault's records may be old).
    vault.revoke("beta");
    let revoked = beta.run_code(&["versions"], 2);
    assert!(
        text(&revoked.stderr).contains("error[vault-forbidden]") && text(&revoked.stderr).contains("revoked"),
        "{}",
        text(&revoked.stderr)
    );
}

#[test]
fn credentials_are_single_use_expire_and_names_are_unique() {
    let vault = Vault::start();
    let (alpha, _) = host(&vault, "alpha", 1);
    // The same file again.
    let file = vault.dir.path().join("alpha.vault-credentials");
    let reused = alpha.run_code(&["agent", "register", file.to_str().unwrap()], 2);
    assert!(
        text(&reused.stderr).contains("error[vault-credentials-expired]") && text(&reused.stderr).contains("was used"),
        "{}",
        text(&reused.stderr)
    );
    // A file that is not one: said, nothing sent.
    std::fs::write(alpha.path("garbage.vault-credentials"), b"\x00{not json").unwrap();
    let garbage = alpha.run_code(&["agent", "register", alpha.path("garbage.vault-credentials").to_str().unwrap()], 2);
    assert!(text(&garbage.stderr).contains("is not a vault credentials file"), "{}", text(&garbage.stderr));
    let missing = alpha.run_code(&["agent", "register", alpha.path("nowhere").to_str().unwrap()], 2);
    assert!(text(&missing.stderr).contains("cannot read the vault credentials file"), "{}", text(&missing.stderr));
    // A file past its time.
    let short = vault.credentials("gamma", "1s");
    std::thread::sleep(Duration::from_millis(1500));
    let other = Sandbox::new();
    let expired = other.run_code(&["agent", "register", short.to_str().unwrap()], 2);
    assert!(
        text(&expired.stderr).contains("error[vault-credentials-expired]")
            && text(&expired.stderr).contains("expired at"),
        "{}",
        text(&expired.stderr)
    );
    // A name that is taken: refused when the file is made.
    let taken = vault.command(&["credentials", "--host", "alpha"]).current_dir(vault.dir.path()).output().unwrap();
    assert_eq!(taken.status.code(), Some(2));
    assert!(text(&taken.stderr).contains("error[host-name-taken]"), "{}", text(&taken.stderr));
    // Revoked, the name is free again, and a new file registers the rebuilt machine.
    vault.ok(&["hosts", "revoke", "alpha"]);
    let again = vault.credentials("alpha", "10d");
    let rebuilt = Sandbox::new();
    rebuilt.ok(&["agent", "register", again.to_str().unwrap()]);
    // A file of another vault (another CA) does not reach this one: its certificate is refused.
    let mut forged: Value = serde_json::from_slice(&std::fs::read(&again).unwrap()).unwrap();
    let foreign = Vault::start();
    forged["ca"] = Value::String(std::fs::read_to_string(foreign.dir.path().join("vault/ca.pem")).unwrap());
    let forged_file = rebuilt.path("forged.vault-credentials");
    std::fs::write(&forged_file, serde_json::to_vec(&forged).unwrap()).unwrap();
    let pinned = rebuilt.run_code(&["agent", "register", forged_file.to_str().unwrap()], 2);
    assert!(text(&pinned.stderr).contains("error[vault-unreachable]"), "{}", text(&pinned.stderr));
}

#[test]
fn a_vault_that_does_not_answer_is_vault_unreachable() {
    let mut vault = Vault::start();
    let (alpha, root) = host(&vault, "alpha", 3);
    alpha.backup_data(&root);
    // The doctor checks the vault the config replicates to: registered, answering, token taken.
    let config = std::fs::read_to_string(alpha.path("config.toml")).unwrap();
    std::fs::write(alpha.path("config.toml"), format!("{config}\n[vault]\nurl = \"{}\"\n", vault.url())).unwrap();
    let vault_check = |code: i32| -> Value {
        let report = alpha.json(&["doctor", "--no-validate"], code);
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == "agent.vault")
            .cloned()
            .unwrap_or_else(|| panic!("{report:#}"))
    };
    assert_eq!(vault_check(0)["status"], "ok");
    vault.stop();
    let check = vault_check(2);
    assert_eq!(
        (check["status"].as_str(), check["code"].as_str()),
        (Some("failed"), Some("vault-unreachable")),
        "{check:#}"
    );
    let output = alpha.run_code(&["backup", "--root", root.to_str().unwrap(), "--component", "data"], 2);
    assert!(text(&output.stderr).contains("error[vault-unreachable]"), "{}", text(&output.stderr));
    assert_job_failed(&alpha, "vault-unreachable");
    // Back, and the host goes on where it was.
    vault.serve();
    alpha.backup_data(&root);
    assert_eq!(alpha.json(&["versions"], 0).as_array().unwrap().len(), 2);
    // Revoked: the doctor says the vault refuses this host.
    vault.revoke("alpha");
    let check = vault_check(2);
    assert_eq!(check["code"], "vault-forbidden", "{check:#}");
}

#[test]
fn a_local_repository_is_copied_to_the_vault_and_a_second_copy_sends_nothing() {
    let vault = Vault::start();
    let (host_sandbox, root) = host(&vault, "delta", 4);
    // The host's local repository: its staging area.
    let mut local = Sandbox::new().with_data_component();
    local.dir = host_sandbox.dir;
    local.target = local.path("local-repo").display().to_string();
    local.backup_data(&root);
    let vault_url = vault.url();
    let copied = local.ok(&["copy", "--to", &vault_url]);
    assert!(text(&copied.stdout).contains("copied version"), "{}", text(&copied.stdout));
    let again = local.ok(&["copy", "--to", &vault_url]);
    assert!(text(&again.stdout).contains("is already in"), "{}", text(&again.stdout));
    let on_vault = local.json(&["versions", "--target", &vault_url], 0);
    assert_eq!(on_vault.as_array().unwrap().len(), 1, "{on_vault:#}");
}

#[test]
fn the_agent_replicates_each_new_version_from_its_local_repository_to_the_vault() {
    let vault = Vault::start();
    let (registered, root) = host(&vault, "epsilon", 5);
    // The host backs up to its local repository (the staging area) and replicates to the vault.
    let mut host_sandbox = Sandbox::new();
    host_sandbox.dir = registered.dir;
    host_sandbox.target = host_sandbox.path("local-repo").display().to_string();
    std::fs::write(
        host_sandbox.path("config.toml"),
        format!(
            "[backup]\ncomponents = [\"data\"]\n\n[[component]]\nname = \"data\"\npaths = [\"/data\"]\n\n[vault]\nurl = \"{}\"\n",
            vault.url()
        ),
    )
    .unwrap();
    let agent = crate::agent::Agent::start(&host_sandbox, &root, &[]);
    for round in 1..=2 {
        std::fs::write(root.join(format!("data/round-{round}")), format!("round {round}")).unwrap();
        host_sandbox.run_code(&["backup", "--now"], 0);
        // The replication follows the backup's end.
        let until = Instant::now() + Duration::from_secs(30);
        let replicated = loop {
            let jobs = host_sandbox.json(&["job", "--previous", "10"], 0);
            let done: Vec<Value> =
                jobs.as_array().unwrap().iter().filter(|j| j["kind"] == "replicate").cloned().collect();
            if done.len() == round {
                break done[0].clone();
            }
            assert!(Instant::now() < until, "no replication after backup {round}: {jobs:#}");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(replicated["state"], "succeeded", "{replicated:#}");
        assert_eq!(replicated["target"], vault.url());
        let on_vault = host_sandbox.json(&["versions", "--target", &vault.url()], 0);
        assert_eq!(on_vault.as_array().unwrap().len(), round, "{on_vault:#}");
        let log = std::fs::read_to_string(replicated["log-path"].as_str().unwrap()).unwrap();
        assert!(
            log.contains("replicated 1 versions")
                && log.contains(&format!("({} there already; packs sent as they are", round - 1)),
            "{log}"
        );
    }
    assert!(agent.stop().success());
    // What the vault holds restores byte for byte.
    let to = host_sandbox.path("from-vault");
    host_sandbox.ok(&["restore", "--target", &vault.url(), "--version", "latest", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
}

#[test]
fn a_soft_deleted_version_is_hidden_undeletable_and_purged_only_after_its_window() {
    soft_delete_undelete_and_purge(&Vault::start());
}

/// The same on Azurite: a vault's records and repository in Azure Blob storage, its settings
/// from `storage.env`.
#[test]
fn a_vault_on_azurite_soft_deletes_undeletes_and_purges() {
    let Some(url) = std::env::var("SYSSTATE_TEST_AZURE_URL").ok() else {
        crate::support::require("Azurite (SYSSTATE_TEST_AZURE_URL from scripts/services.sh)", false);
        return;
    };
    let storage = format!("{url}/vault-{}", std::process::id() ^ rand_suffix());
    soft_delete_undelete_and_purge(&Vault::start_on(Some((&storage, "AZURE_STORAGE_USE_EMULATOR=true\n"))));
}

/// A number that differs between runs, for a fresh place in a shared container.
fn rand_suffix() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
}

fn soft_delete_undelete_and_purge(vault: &Vault) {
    let (alpha, root) = host(vault, "alpha", 6);
    let kept = alpha.backup_data(&root);
    std::fs::write(root.join("data/more"), b"more").unwrap();
    let dropped = alpha.backup_data(&root);
    vault.change(&["forget", "--version", &dropped[..12]]);
    assert_eq!(version_ids(&alpha), vec![kept.clone()], "the host still sees a soft-deleted version");
    let (status, body) = curl(vault, &token_of(&alpha), "GET", &format!("/v1/repo/versions/{dropped}"), None);
    assert_eq!(status, 403, "a soft-deleted version read by its id: {body}");
    assert!(body.contains("soft-deleted"), "{body}");
    let listed: Value = serde_json::from_str(&vault.ok(&["versions", "--json"])).unwrap();
    let entry = listed.as_array().unwrap().iter().find(|v| v["id"] == dropped).unwrap().clone();
    assert!(entry["soft-deleted"].is_string() && entry["purge-after"].is_string(), "{entry:#}");
    let refused = alpha.run_code(&["restore", "--version", &dropped, "--to", alpha.path("r1").to_str().unwrap()], 2);
    assert!(
        text(&refused.stderr).contains("does not exist") || text(&refused.stderr).contains("vault-forbidden"),
        "{}",
        text(&refused.stderr)
    );
    // Undeleted, it is back and restores.
    vault.change(&["undelete", "--version", &dropped[..12]]);
    assert_eq!(version_ids(&alpha).len(), 2);
    alpha.ok(&["restore", "--version", &dropped, "--to", alpha.path("r2").to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&alpha.path("r2/data")));
    // Soft-deleted again: a purge inside the window keeps it; past the window (the vault's
    // clock 15 days ahead) it is gone for good.
    vault.ok(&["forget", "--version", &dropped]);
    let purged: Value = serde_json::from_str(&vault.ok(&["purge", "--json"])).unwrap();
    assert_eq!(purged["purged"].as_array().unwrap().len(), 0, "{purged:#}");
    vault.ok(&["undelete", "--version", &dropped]);
    vault.change(&["forget", "--version", &dropped]);
    let later = vault
        .command(&["purge", "--json"])
        .env("SYSSTATE_FAILPOINT_CLOCK_AHEAD_S", (15 * 86_400).to_string())
        .output()
        .unwrap();
    assert!(later.status.success(), "{}", text(&later.stderr));
    let purged: Value = serde_json::from_slice(&later.stdout).unwrap();
    assert_eq!(purged["purged"], serde_json::json!([dropped.clone()]), "{purged:#}");
    let gone = vault.command(&["undelete", "--version", &dropped]).output().unwrap();
    assert_eq!(gone.status.code(), Some(2), "a purged version came back");
    let listed: Value = serde_json::from_str(&vault.ok(&["versions", "--json"])).unwrap();
    assert!(listed.as_array().unwrap().iter().all(|v| v["id"] != dropped), "{listed:#}");
    let (status, body) = curl(vault, &token_of(&alpha), "GET", &format!("/v1/repo/versions/{dropped}"), None);
    // As any id the host has no version of: the vault does not tell what exists.
    assert_eq!(status, 403, "a purged version read by its id: {body}");
    assert_eq!(version_ids(&alpha), vec![kept.clone()]);
    // What is left checks clean (its data is all there).
    alpha.ok(&["check"]);
}

#[test]
fn registrations_that_arrive_together_or_malformed_are_refused_cleanly() {
    let vault = Vault::start();
    // Two credentials files for one name, both registered at the same moment: one host wins.
    let first = vault.credentials("zeta", "10d");
    let second_file = vault.dir.path().join("zeta-2.vault-credentials");
    std::fs::copy(&first, vault.dir.path().join("zeta-1.vault-credentials")).unwrap();
    vault.ok(&["credentials", "--host", "zeta", "--output", second_file.to_str().unwrap()]);
    let files = [vault.dir.path().join("zeta-1.vault-credentials"), second_file];
    let sandboxes = [Sandbox::new(), Sandbox::new()];
    let outputs: Vec<std::process::Output> = std::thread::scope(|scope| {
        let running: Vec<_> = files
            .iter()
            .zip(&sandboxes)
            .map(|(file, sandbox)| scope.spawn(move || sandbox.run(&["agent", "register", file.to_str().unwrap()])))
            .collect();
        running.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let won = outputs.iter().filter(|o| o.status.success()).count();
    assert_eq!(won, 1, "{:#?}", outputs.iter().map(|o| text(&o.stderr)).collect::<Vec<_>>());
    let lost = outputs.iter().find(|o| !o.status.success()).unwrap();
    assert!(text(&lost.stderr).contains("error[host-name-taken]"), "{}", text(&lost.stderr));
    let hosts: Value = serde_json::from_str(&vault.ok(&["hosts", "--json"])).unwrap();
    assert_eq!(hosts.as_array().unwrap().len(), 1, "{hosts:#}");
    // Malformed and unauthenticated requests get a clear refusal, and the vault goes on.
    let (status, body) = curl(&vault, "", "POST", "/v1/register", Some(b"{\"host\": 1"));
    assert_eq!(status, 400, "{body}");
    let (status, body) = curl(&vault, "", "POST", "/v1/register", Some(&[b'x'; 10_000]));
    assert_eq!(status, 400, "an oversized registration: {body}");
    let (status, body) = curl(&vault, "", "POST", "/v1/register", Some(br#"{"host": "zeta", "secret": "guessed"}"#));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("vault-credentials-expired"), "{body}");
    let (status, _) = curl(&vault, "", "GET", "/v1/repo/data", None);
    assert!(status == 401 || status == 403, "{status}");
    let (status, _) = curl(&vault, "", "GET", "/v1/repo/nothing", None);
    assert!(status == 401 || status == 403, "a route is shown before the token: {status}");
}

#[test]
fn the_vaults_retention_soft_deletes_and_an_immutable_vault_refuses_to_shorten_it_or_delete_early() {
    let vault = Vault::start();
    let (alpha, root) = host(&vault, "alpha", 7);
    let mut made = Vec::new();
    for round in 0..3 {
        std::fs::write(root.join("data/round"), round.to_string()).unwrap();
        made.push(alpha.backup_data(&root));
    }
    // The newest two kept: the oldest soft-deleted by the vault's own retention.
    vault.ok(&["retention", "set", "--last", "2"]);
    let planned: Value = serde_json::from_str(&vault.ok(&["retention", "apply", "--dry-run", "--json"])).unwrap();
    assert_eq!(planned["soft-deleted"].as_array().unwrap().len(), 1, "{planned:#}");
    assert_eq!(version_ids(&alpha).len(), 3, "a dry run soft-deleted");
    vault.change(&["retention", "apply"]);
    let mut seen = version_ids(&alpha);
    seen.sort();
    let mut newest = made[1..].to_vec();
    newest.sort();
    assert_eq!(seen, newest, "the vault's retention keeps the newest two");
    let listed: Value = serde_json::from_str(&vault.ok(&["versions", "--json"])).unwrap();
    let oldest = listed.as_array().unwrap().iter().find(|v| v["id"] == made[0]).unwrap();
    assert!(oldest["soft-deleted"].is_string(), "{oldest:#}");

    // Immutable: a shorter policy, and deleting a version the policy keeps, are refused; a
    // longer policy is taken.
    vault.ok(&["immutability", "enable"]);
    let message = vault.refused(&["retention", "set", "--last", "1"], "vault-immutable");
    assert!(message.contains("last 2") && message.contains("last 1"), "{message}");
    vault.refused(&["retention", "set", "--host", "alpha", "--daily", "1"], "vault-immutable");
    let message = vault.refused(&["forget", "--version", &made[2]], "vault-immutable");
    assert!(message.contains(&made[2]) && message.contains("last 2"), "{message}");
    vault.ok(&["retention", "set", "--last", "3", "--daily", "7"]);
    // A version its retention drops may go.
    for round in 3..6 {
        std::fs::write(root.join("data/round"), round.to_string()).unwrap();
        made.push(alpha.backup_data(&root));
    }
    let planned: Value = serde_json::from_str(&vault.ok(&["retention", "apply", "--dry-run", "--json"])).unwrap();
    let mut expired: Vec<&str> =
        planned["soft-deleted"].as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap()).collect();
    expired.sort();
    let mut beyond = vec![made[1].as_str(), made[2].as_str()];
    beyond.sort();
    assert_eq!(expired, beyond, "five versions, the newest three kept: {planned:#}");
    vault.ok(&["forget", "--version", &made[1]]);
    // Enabled can be disabled; locked cannot, ever.
    vault.ok(&["immutability", "disable"]);
    vault.ok(&["retention", "set", "--last", "1"]);
    vault.ok(&["retention", "set", "--last", "3"]);
    vault.ok(&["immutability", "lock"]);
    let message = vault.refused(&["immutability", "disable"], "vault-immutable");
    assert!(message.contains("locked"), "{message}");
    vault.refused(&["retention", "set", "--last", "2"], "vault-immutable");
    let state: Value = serde_json::from_str(&vault.ok(&["immutability", "--json"])).unwrap();
    assert_eq!(state["immutability"], "locked", "{state:#}");
    // What the host sees restores.
    let newest = made.last().unwrap();
    alpha.ok(&["restore", "--version", newest, "--to", alpha.path("r").to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&alpha.path("r/data")));
}

/// The pack files under a repository folder.
fn packs_in(repo: &std::path::Path) -> Vec<String> {
    let mut packs = Vec::new();
    for prefix in std::fs::read_dir(repo.join("data")).unwrap().flatten() {
        for pack in std::fs::read_dir(prefix.path()).unwrap().flatten() {
            let name = pack.file_name().to_string_lossy().into_owned();
            if !name.starts_with(".tmp-") {
                packs.push(name);
            }
        }
    }
    packs.sort();
    packs
}

/// `count` files of `size` random bytes (which do not compress), `root/data/big-N`.
fn write_incompressible(root: &std::path::Path, seed: u64, count: usize, size: usize) {
    std::fs::create_dir_all(root.join("data")).unwrap();
    let mut rng = crate::support::Rng(seed);
    for n in 0..count {
        std::fs::write(root.join(format!("data/big-{n}")), rng.bytes(size)).unwrap();
    }
}

/// A host registered as `name` whose target is a local repository (its staging area) in the
/// registered sandbox's folder, with `[vault] url` in its config.
fn staging_host(vault: &Vault, name: &str) -> Sandbox {
    let (registered, _) = host(vault, name, 1);
    let mut local = Sandbox::new();
    local.dir = registered.dir;
    local.target = local.path("local-repo").display().to_string();
    std::fs::write(
        local.path("config.toml"),
        format!("[[component]]\nname = \"data\"\npaths = [\"/data\"]\n\n[vault]\nurl = \"{}\"\n", vault.url()),
    )
    .unwrap();
    local
}

#[test]
fn a_replication_killed_midway_resumes_sending_only_what_is_missing() {
    let vault = Vault::start();
    let local = staging_host(&vault, "eta");
    // 40 MiB that does not compress: five packs and more.
    let root = local.path("root");
    write_incompressible(&root, 0x5eed_0008, 5, 8 << 20);
    let version = local.backup_data(&root);
    let local_packs = packs_in(std::path::Path::new(&local.target));
    assert!(local_packs.len() >= 5, "{local_packs:?}");
    // Each pack takes 700 ms to go: killed once two have arrived.
    let vault_repo = vault.dir.path().join("storage");
    let mut copy = local
        .command(&["copy", "--to", &vault.url()])
        .env("SYSSTATE_FAILPOINT_UPLOAD_DELAY_MS", "700")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    while !vault_repo.join("data").exists() || packs_in(&vault_repo).len() < 2 {
        assert!(Instant::now() < until, "no pack arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
    copy.kill().unwrap();
    copy.wait().unwrap();
    let arrived = packs_in(&vault_repo);
    assert!(arrived.len() < local_packs.len(), "the copy ended before it was killed: {arrived:?}");
    assert!(version_ids(&local).contains(&version));
    // Resumed: what arrived is not sent again; the rest is, as it is.
    let resumed = local.json(&["copy", "--to", &vault.url()], 0);
    assert_eq!(resumed["mode"], "packs", "{resumed:#}");
    let packs = &resumed["packs"];
    assert_eq!(packs["packs-sent"].as_u64().unwrap() as usize, local_packs.len() - arrived.len(), "{resumed:#}");
    assert_eq!(packs["blobs-repacked"], 0, "{resumed:#}");
    assert_eq!(packs_in(&vault_repo), local_packs, "the vault holds the local packs, each once");
    // The version keeps its id, and restores byte for byte from the vault.
    let on_vault = local.json(&["versions", "--target", &vault.url()], 0);
    assert_eq!(on_vault[0]["id"], version, "{on_vault:#}");
    let to = local.path("restored");
    local.ok(&["restore", "--target", &vault.url(), "--version", &version, "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    local.ok(&["check", "--target", &vault.url(), "--read-data"]);
}

#[test]
fn two_hosts_of_one_key_store_what_they_share_once() {
    let vault = Vault::start();
    let alpha = staging_host(&vault, "alpha");
    let beta = staging_host(&vault, "beta");
    let mut rng = crate::support::Rng(0x5eed_0009);
    let shared: Vec<Vec<u8>> = (0..4).map(|_| rng.bytes(3 << 20)).collect();
    let roots: Vec<PathBuf> = [&alpha, &beta]
        .iter()
        .enumerate()
        .map(|(n, sandbox)| {
            let root = sandbox.path("root");
            std::fs::create_dir_all(root.join("data/etc")).unwrap();
            for (i, bytes) in shared.iter().enumerate() {
                std::fs::write(root.join(format!("data/shared-{i}")), bytes).unwrap();
            }
            std::fs::write(root.join("data/etc/hostname"), format!("host-{n}\n")).unwrap();
            root
        })
        .collect();
    // Alpha first: its local repository has a key of its own, and the vault is made with it.
    alpha.backup_data(&roots[0]);
    let first = alpha.json(&["copy", "--to", &vault.url()], 0);
    assert_eq!(first["mode"], "packs", "{first:#}");
    let vault_repo = vault.dir.path().join("storage");
    let size = |dir: &std::path::Path| -> u64 {
        packs_in(dir).iter().map(|p| std::fs::metadata(dir.join("data").join(&p[..2]).join(p)).unwrap().len()).sum()
    };
    let after_alpha = size(&vault_repo);
    // Beta's local repository is made from the vault's key (its `[vault] url`): what it shares
    // with alpha is not stored again.
    beta.backup_data(&roots[1]);
    let second = beta.json(&["copy", "--to", &vault.url()], 0);
    assert_eq!(second["mode"], "packs", "{second:#}");
    assert!(second["packs"]["blobs-repacked"].as_u64().unwrap() > 0, "{second:#}");
    let after_beta = size(&vault_repo);
    assert!(
        after_beta * 100 <= after_alpha * 120,
        "two near-identical hosts store {after_beta} bytes, one {after_alpha}: more than 1.2×"
    );
    // The report says what each host added.
    let report: Value = serde_json::from_str(&vault.ok(&["report", "--json"])).unwrap();
    let added = |name: &str| -> u64 {
        let host = report["hosts"].as_array().unwrap().iter().find(|h| h["name"] == name).unwrap();
        host["added-bytes"].as_u64().unwrap()
    };
    assert_eq!((added("alpha"), added("beta")), (after_alpha, after_beta - after_alpha), "{report:#}");
    assert_eq!(report["storage"]["unattributed-bytes"], 0, "{report:#}");
    assert_eq!(report["storage"]["pack-bytes"], after_beta, "{report:#}");
    // Each host restores its own from the vault.
    for (sandbox, root) in [&alpha, &beta].iter().zip(&roots) {
        let versions = sandbox.json(&["versions", "--target", &vault.url()], 0);
        assert_eq!(versions.as_array().unwrap().len(), 1, "{versions:#}");
        let to = sandbox.path("restored");
        let id = versions[0]["id"].as_str().unwrap();
        sandbox.ok(&["restore", "--target", &vault.url(), "--version", id, "--to", to.to_str().unwrap()]);
        assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    }
}

#[test]
fn replication_keeps_to_its_bandwidth_and_a_schedule_with_a_typo_is_refused() {
    let vault = Vault::start();
    let local = staging_host(&vault, "theta");
    let root = local.path("root");
    write_incompressible(&root, 0x5eed_0010, 1, 12 << 20);
    local.backup_data(&root);
    // 12 MiB at 4 MiB/s: the second pack waits for the first's 2 s at least.
    let started = Instant::now();
    local.ok(&["copy", "--to", &vault.url(), "--bandwidth", "4MiB/s"]);
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2), "12 MiB went in {took:?} at 4 MiB/s");
    let refused = local.run_code(&["copy", "--to", &vault.url(), "--bandwidth", "fast"], 2);
    assert!(text(&refused.stderr).contains("`--bandwidth`"), "{}", text(&refused.stderr));
    // Work hours with a typo: every command refuses the config, naming the key.
    let config = std::fs::read_to_string(local.path("config.toml")).unwrap();
    std::fs::write(
        local.path("config.toml"),
        format!("{config}work-hours = \"8-18\"\nwork-hours-bandwidth = \"2MiB\"\n"),
    )
    .unwrap();
    let refused = local.run_code(&["versions"], 2);
    assert!(text(&refused.stderr).contains("vault.work-hours"), "{}", text(&refused.stderr));
}

#[test]
fn the_vaults_jobs_verify_its_storage_apply_its_retention_and_feed_its_report() {
    let mut vault = Vault::start();
    let (alpha, root) = host(&vault, "alpha", 11);
    for round in 0..2 {
        std::fs::write(root.join("data/round"), round.to_string()).unwrap();
        alpha.backup_data(&root);
    }
    let clean: Value = serde_json::from_str(&vault.ok(&["verify", "--json"])).unwrap();
    assert_eq!(clean["damaged"], serde_json::json!([]), "{clean:#}");
    assert!(clean["packs-checked"].as_u64().unwrap() >= 2, "{clean:#}");
    // A pack damaged on the vault's disk: the verify job fails naming it.
    let storage = vault.dir.path().join("storage");
    let pack = packs_in(&storage).remove(0);
    let path = storage.join("data").join(&pack[..2]).join(&pack);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let damaged = vault.command(&["verify"]).output().unwrap();
    assert_eq!(damaged.status.code(), Some(2), "{}", text(&damaged.stderr));
    assert!(
        text(&damaged.stdout).contains(&format!("DAMAGED `data/{}/{pack}`", &pack[..2])),
        "{}",
        text(&damaged.stdout)
    );
    let report: Value = serde_json::from_str(&vault.ok(&["report", "--json"])).unwrap();
    let verify = &report["jobs"]["vault-verify"];
    assert_eq!(verify["state"], "failed", "{report:#}");
    assert_eq!(verify["error"]["code"], "repository-corrupt", "{report:#}");
    let host = &report["hosts"][0];
    assert_eq!(
        (host["name"].as_str(), host["versions"].as_u64(), &host["overdue"]),
        (Some("alpha"), Some(2), &Value::Bool(false)),
        "{report:#}"
    );
    assert!(report["storage"]["pack-bytes"].as_u64().unwrap() > 0, "{report:#}");
    // The vault runs its jobs by itself: a retention set now is applied within its period.
    vault.ok(&["retention", "set", "--last", "1"]);
    vault.stop();
    vault.serve_with(&[("SYSSTATE_FAILPOINT_VAULT_JOBS_EVERY_S", "1")]);
    let until = Instant::now() + Duration::from_secs(20);
    while version_ids(&alpha).len() != 1 {
        assert!(Instant::now() < until, "the vault's retention job did not run");
        std::thread::sleep(Duration::from_millis(250));
    }
    let report: Value = serde_json::from_str(&vault.ok(&["report", "--json"])).unwrap();
    assert_eq!(report["jobs"]["vault-retention"]["trigger"], "schedule", "{report:#}");
    assert_eq!(report["hosts"][0]["soft-deleted"], 1, "{report:#}");
}

#[test]
fn two_vault_processes_serve_one_garage_cluster_and_a_node_killed_midway_loses_nothing() {
    let has_garage = Command::new("garage").arg("--version").output().is_ok_and(|o| o.status.success());
    if !crate::support::require("`garage` (scripts/test.sh installs it)", has_garage) {
        return;
    }
    let mut cluster = crate::garage::Cluster::start();
    let storage = format!("s3://{}/vault", cluster.bucket);
    // Two processes of one vault, each through another Garage node; the third node serves no one.
    let first = Vault::start_on(Some((&storage, &cluster.nodes[0].storage_env(&cluster))));
    let second = first.beside(&cluster.nodes[1].storage_env(&cluster));
    let alpha = staging_host(&first, "alpha");
    let beta = staging_host(&second, "beta");
    let hosts = [(&alpha, &first), (&beta, &second)];
    // Each host's versions, with its tree as it was.
    let mut kept: Vec<Vec<(String, BTreeMap<PathBuf, Entry>)>> = vec![Vec::new(), Vec::new()];
    // Alpha's first version makes the vault's repository (with alpha's key); beta's local
    // repository is then made with the vault's key, so both send packs as they are.
    for (n, (host, vault)) in hosts.iter().enumerate() {
        let root = host.path("root");
        let version = host.backup_data(&root);
        kept[n].push((version, snapshot(&root.join("data"))));
        let copied = host.json(&["copy", "--to", &vault.url()], 0);
        assert_eq!(copied["mode"], "packs", "{copied:#}");
    }
    // Then 24 MiB each that does not compress, replicated by both at once, slowly: the third
    // node is killed while the packs go.
    for (n, (host, _)) in hosts.iter().enumerate() {
        let root = host.path("root");
        write_incompressible(&root, 0x5eed_0011 + n as u64, 3, 8 << 20);
        let version = host.backup_data(&root);
        kept[n].push((version, snapshot(&root.join("data"))));
    }
    let mut copies: Vec<std::process::Child> = hosts
        .iter()
        .map(|(host, vault)| {
            host.command(&["copy", "--to", &vault.url(), "--json"])
                .env("SYSSTATE_FAILPOINT_UPLOAD_DELAY_MS", "600")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1_500));
    for copy in &mut copies {
        assert!(copy.try_wait().unwrap().is_none(), "a replication ended before the node was killed");
    }
    cluster.nodes[2].kill();
    for copy in copies {
        let output = copy.wait_with_output().unwrap();
        assert!(output.status.success(), "a replication failed with a node down: {}", text(&output.stderr));
        let copied: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert!(copied["packs"]["packs-sent"].as_u64().unwrap() >= 3, "{copied:#}");
    }
    // Both processes see every host's versions: the records are in the storage.
    for vault in [&first, &second] {
        let listed: Value = serde_json::from_str(&vault.ok(&["versions", "--json"])).unwrap();
        let owners: Vec<&str> = listed.as_array().unwrap().iter().map(|v| v["host"].as_str().unwrap()).collect();
        assert_eq!(
            (owners.iter().filter(|h| **h == "alpha").count(), owners.iter().filter(|h| **h == "beta").count()),
            (2, 2),
            "{listed:#}"
        );
    }
    // Every version restores, byte for byte, with the node still down; alpha's through the
    // other process too (its token is a record in the storage, not in a process).
    let restore_all = |host: &Sandbox, vault: &Vault, versions: &[(String, BTreeMap<PathBuf, Entry>)]| {
        for (id, tree) in versions {
            let to = host.path(&format!("restored-{}-{id}", vault.port));
            host.ok(&["restore", "--target", &vault.url(), "--version", id, "--to", to.to_str().unwrap()]);
            assert_same(tree, &snapshot(&to.join("data")));
        }
    };
    restore_all(&alpha, &first, &kept[0]);
    restore_all(&beta, &second, &kept[1]);
    let credentials = alpha.path("state/vault/credentials.json");
    let moved = std::fs::read_to_string(&credentials).unwrap().replace(&first.url(), &second.url());
    std::fs::write(&credentials, moved).unwrap();
    restore_all(&alpha, &second, &kept[0]);
    // The node back: the cluster heals, and every pack reads and authenticates.
    cluster.nodes[2].start();
    alpha.ok(&["check", "--target", &second.url(), "--read-data"]);
}

/// The bytes the vault process has written (to its sockets, mostly: it keeps nothing on disk
/// when its storage is object storage).
fn written_by(vault: &Vault) -> u64 {
    let pid = vault.child.as_ref().unwrap().id();
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines().find_map(|l| l.strip_prefix("wchar: ")).unwrap().trim().parse().unwrap()
}

/// With `direct-reads`, a host's read of a pack is answered, once its token is checked, with a
/// redirect to a URL of the storage signed for that pack: the host reads the bytes from Garage
/// and the vault carries none of them. A URL the storage refuses (expired: a clock apart)
/// sends the host back through the vault, and the restore is the same.
#[test]
fn with_direct_reads_hosts_read_packs_from_the_storage_and_fall_back_to_the_vault() {
    let Some(url) = std::env::var("SYSSTATE_TEST_S3_URL").ok() else {
        crate::support::require("Garage (SYSSTATE_TEST_S3_URL from scripts/services.sh)", false);
        return;
    };
    let settings: String =
        ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT", "AWS_REGION", "AWS_ALLOW_HTTP"]
            .iter()
            .filter_map(|name| std::env::var(name).ok().map(|value| format!("{name}={value}\n")))
            .collect();
    let mut vault = Vault::start_on(Some((&format!("{url}/vault-direct-{}", rand_suffix()), &settings)));
    vault.stop();
    let config = vault.dir.path().join("vault/vault.toml");
    std::fs::write(&config, std::fs::read_to_string(&config).unwrap() + "direct-reads = true\n").unwrap();
    vault.serve();
    let local = staging_host(&vault, "theta");
    let root = local.path("root");
    // 24 MiB that does not compress: three packs and more.
    write_incompressible(&root, 0x5eed_0031, 3, 8 << 20);
    let version = local.backup_data(&root);
    local.ok(&["copy", "--to", &vault.url()]);

    // A pack's read: the token first, then a redirect to a URL that needs none.
    let pack = packs_in(std::path::Path::new(&local.target)).remove(0);
    let token = token_of(&local);
    let ask = |token: &str| {
        let output = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "--cacert"])
            .arg(vault.dir.path().join("vault/ca.pem"))
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .arg(format!("https://127.0.0.1:{}/v1/repo/data/{pack}", vault.port))
            .output()
            .unwrap();
        text(&output.stdout)
    };
    assert!(ask("not-a-token").starts_with("403 "), "{}", ask("not-a-token"));
    let answer = ask(&token);
    let (status, location) = answer.split_once(' ').unwrap();
    assert_eq!(status, "307", "{answer}");
    let direct = Command::new("curl").args(["-s", "-f", "-o", "-", location]).output().unwrap();
    assert!(direct.status.success(), "the signed URL did not read: {}", text(&direct.stderr));
    let local_pack =
        std::fs::read(std::path::Path::new(&local.target).join("data").join(&pack[..2]).join(&pack)).unwrap();
    assert!(direct.stdout == local_pack, "the signed URL read other bytes than the pack");

    // A restore: byte for byte, and the pack bytes did not pass through the vault.
    let before = written_by(&vault);
    let to = local.path("restored-direct");
    local.ok(&["restore", "--target", &vault.url(), "--version", &version, "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    let carried = written_by(&vault) - before;
    assert!(carried < 4 << 20, "the vault carried {carried} bytes of a 24 MiB restore with direct reads");

    // URLs that expire as they are made: the storage refuses them, the host reads through the
    // vault, and the restore is the same.
    vault.stop();
    vault.serve_with(&[("SYSSTATE_FAILPOINT_DIRECT_READ_VALID_S", "0")]);
    let before = written_by(&vault);
    let to = local.path("restored-through");
    local.ok(&["restore", "--target", &vault.url(), "--version", &version, "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    let carried = written_by(&vault) - before;
    assert!(carried >= 24 << 20, "the vault carried only {carried} bytes: the host did not fall back to it");
}

/// A stand-in for a vault that turned hostile: a TLS server with the vault's certificate in
/// front of it, answering every read of a pack that does not ask to go through the vault with a
/// redirect to `location`, and passing everything else on.
const HOSTILE_PROXY: &str = r#"
import http.server, ssl, sys, urllib.request, urllib.error
listen, upstream, cert, key, location = sys.argv[1:6]
honest = ssl._create_unverified_context()
class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def forward(self):
        if self.command == "GET" and "/v1/repo/data/" in self.path and not self.headers.get("x-sysstate-through-vault"):
            self.send_response(307)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        length = int(self.headers.get("Content-Length") or 0)
        request = urllib.request.Request(f"https://127.0.0.1:{upstream}{self.path}",
                                         data=self.rfile.read(length) if length else None, method=self.command)
        for name, value in self.headers.items():
            if name.lower() not in ("host", "content-length", "connection"):
                request.add_header(name, value)
        try:
            answer = urllib.request.urlopen(request, context=honest)
        except urllib.error.HTTPError as error:
            answer = error
        body = answer.read()
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(listen)), Proxy)
tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
tls.load_cert_chain(cert, key)
server.socket = tls.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// A vault that redirects a host's pack reads where it should not gets nothing written from
/// there: a redirect to a file on the host is refused and the host reads through the vault; a
/// storage that answers other bytes than the pack's makes the restore fail, naming the damage,
/// without writing them.
#[test]
fn a_hostile_vaults_redirects_write_nothing_they_point_to() {
    let mut vault = Vault::start();
    let local = staging_host(&vault, "iota");
    let root = local.path("root");
    write_incompressible(&root, 0x5eed_0041, 2, 1 << 20);
    let version = local.backup_data(&root);
    local.ok(&["copy", "--to", &vault.url()]);
    // The vault moves to another port; the hostile stand-in takes its place.
    vault.stop();
    let (public, url) = (vault.port, vault.url());
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = vault.dir.path().join("vault/vault.toml");
    let text_of = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text_of.replace(&format!("listen = \"127.0.0.1:{public}\""), &format!("listen = \"127.0.0.1:{upstream}\"")),
    )
    .unwrap();
    vault.port = upstream;
    vault.serve();
    let script = local.path("hostile.py");
    std::fs::write(&script, HOSTILE_PROXY).unwrap();
    let hostile = |location: &str| -> KillOnDrop {
        let child = Command::new("python3")
            .arg(&script)
            .args([public.to_string(), upstream.to_string()])
            .arg(vault.dir.path().join("vault/server.pem"))
            .arg(vault.dir.path().join("vault/server-key.pem"))
            .arg(location)
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", public)).is_err() {
            assert!(Instant::now() < until, "the stand-in did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        KillOnDrop(child)
    };
    let restore = |to: &std::path::Path| {
        local
            .command(&["restore", "--target", &url, "--version", &version, "--to", to.to_str().unwrap()])
            .output()
            .unwrap()
    };

    // To a file of the host's: refused, read through the vault, byte for byte.
    let proxy = hostile("file:///etc/shadow");
    let to = local.path("restored-file");
    let output = restore(&to);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    assert!(text(&output.stderr).contains("not an HTTP URL"), "the refusal is not told: {}", text(&output.stderr));
    drop(proxy);

    // To a storage that answers other bytes: nothing of them is written as the files.
    let bogus = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bogus_port = bogus.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in bogus.incoming().flatten() {
            let mut stream = stream;
            let mut buffer = [0u8; 4096];
            let _ = std::io::Read::read(&mut stream, &mut buffer);
            let body = vec![0x41u8; 4 << 20];
            let head =
                format!("HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = std::io::Write::write_all(&mut stream, head.as_bytes());
            let _ = std::io::Write::write_all(&mut stream, &body);
        }
    });
    let _proxy = hostile(&format!("http://127.0.0.1:{bogus_port}/pack"));
    let to = local.path("restored-bogus");
    let output = restore(&to);
    assert!(!output.status.success(), "a restore from bytes that are not the pack's succeeded");
    let said = text(&output.stderr);
    assert!(said.contains("does not decrypt") || said.contains("damaged"), "{said}");
    for file in std::fs::read_dir(root.join("data")).unwrap().flatten() {
        let restored = to.join("data").join(file.file_name());
        if let Ok(bytes) = std::fs::read(&restored) {
            assert!(bytes == std::fs::read(file.path()).unwrap(), "{} was written, not as it was", restored.display());
        }
    }
}

/// A child process killed when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
