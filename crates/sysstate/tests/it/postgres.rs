//! The PostgreSQL writer against a real cluster under load: the restored data directory starts,
//! recovers and is consistent.

use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs a PostgreSQL program as the postgres user.
fn as_postgres(bin: &Path, program: &str, args: &[&str]) -> std::process::Output {
    let output =
        Command::new("runuser").args(["-u", "postgres", "--"]).arg(bin.join(program)).args(args).output().unwrap();
    assert!(output.status.success(), "{program} {args:?}: {}{}", text(&output.stdout), text(&output.stderr));
    output
}

/// A running cluster; stopped on drop.
struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    log: PathBuf,
}

impl Cluster {
    /// Starts the cluster in `data`, logging to a file in `logs` (a folder postgres may write).
    fn start(bin: &Path, data: &Path, logs: &Path) -> Cluster {
        let port = free_port();
        let log = logs.join(format!("{port}.log"));
        let options = format!("-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''");
        as_postgres(
            bin,
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-o", &options, "-l", log.to_str().unwrap(), "-w", "-t", "60", "start"],
        );
        Cluster { bin: bin.to_path_buf(), data: data.to_path_buf(), port, log }
    }

    fn psql(&self, sql: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(output.status.success(), "{sql}: {}", text(&output.stderr));
        text(&output.stdout).trim().to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}

#[test]
fn a_backup_under_pgbench_load_restores_into_a_cluster_that_recovers_consistent() {
    let bin = pg_bin();
    if !require("root and PostgreSQL (Debian `postgresql`)", is_root() && bin.is_some()) {
        return;
    }
    let bin = bin.unwrap();
    let sandbox = Sandbox::new();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(sandbox.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = sandbox.path("root");
    let data = root.join("pgdata");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(&data).unwrap();
    Command::new("chown").args(["postgres:postgres"]).arg(&data).status().unwrap();
    as_postgres(&bin, "initdb", &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"]);
    let logs = sandbox.path("pglogs");
    std::fs::create_dir(&logs).unwrap();
    Command::new("chown").args(["postgres:postgres"]).arg(&logs).status().unwrap();
    let cluster = Cluster::start(&bin, &data, &logs);
    let port = cluster.port.to_string();
    let pgbench = |args: &[&str]| {
        Command::new(bin.join("pgbench"))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(args)
            .arg("postgres")
            .output()
            .unwrap()
    };
    assert!(pgbench(&["-i", "-s", "4", "-q"]).status.success());

    std::fs::write(
        sandbox.path("config.toml"),
        format!(
            "[[component]]\nname = \"pg\"\npaths = [\"/pgdata\"]\n\n[[writer]]\nname = \"pg\"\nkind = \"postgresql\"\ncomponents = [\"pg\"]\ndata-directory = \"/pgdata\"\ncommand = [\"{}\", \"-h\", \"127.0.0.1\", \"-p\", \"{port}\", \"-U\", \"postgres\", \"-d\", \"postgres\"]\n",
            bin.join("psql").display()
        ),
    )
    .unwrap();
    // The load runs through the whole backup.
    let mut load = Command::new(bin.join("pgbench"))
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-c", "4", "-T", "15", "-n", "postgres"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let started = Instant::now();
    sandbox.ok(&["backup", "--root", root.to_str().unwrap(), "--component", "pg"]);
    eprintln!("backup under load: {:?}", started.elapsed());
    assert!(load.try_wait().unwrap().is_none(), "the load ended before the backup did: make it longer");
    assert!(load.wait().unwrap().success());
    let versions = sandbox.json(&["versions"], 0);
    assert_eq!(versions[0]["shadow"]["writers"][0]["kind"], "postgresql", "{}", versions[0]["shadow"]);
    drop(cluster);

    // Restore into a fresh directory and start a second cluster from it.
    let to = sandbox.path("restored");
    std::fs::create_dir_all(&to).unwrap();
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    let restored = to.join("pgdata");
    assert!(restored.join("backup_label").exists(), "no backup_label in the copy");
    assert!(!restored.join("postmaster.pid").exists(), "postmaster.pid was copied");
    let recovered = Cluster::start(&bin, &restored, &logs);
    let log = std::fs::read_to_string(&recovered.log).unwrap_or_default();
    assert!(log.contains("redo") || log.contains("consistent recovery state"), "no recovery in the log:\n{log}");
    // pgbench's invariant: every transaction moved the same delta into accounts, tellers,
    // branches and history.
    let balanced = recovered.psql(
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history) \
         AND (SELECT sum(bbalance) FROM pgbench_branches) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history) \
         AND (SELECT sum(tbalance) FROM pgbench_tellers) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
    );
    assert_eq!(balanced, "t");
    let transactions: u64 = recovered.psql("SELECT count(*) FROM pgbench_history").parse().unwrap();
    assert!(transactions > 0, "the backup holds none of the load's transactions");
    let amcheck = Command::new(bin.join("pg_amcheck"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &recovered.port.to_string(),
            "-U",
            "postgres",
            "--install-missing",
            "--heapallindexed",
            "-d",
            "postgres",
        ])
        .output()
        .unwrap();
    assert!(amcheck.status.success(), "pg_amcheck: {}{}", text(&amcheck.stdout), text(&amcheck.stderr));
}
