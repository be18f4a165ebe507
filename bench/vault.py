#!/usr/bin/env python3
"""The vault's speed and memory (the vault issue's performance part), side by side with restic.

    bench/run --vault [--rounds 3] [--scale 1.0] [--sysstate BINARY]

As root, with the environment of `scripts/services.sh` (Garage on 127.0.0.1). On the `system`
corpus (on btrfs, as in the main harness), in each round, with a new vault whose storage is
Garage (its credentials in its `storage.env`) and a new restic repository on the same Garage:

    replicate     host A's first version from its local repository (the staging area) to the
                  vault, `sysstate copy`, against `restic copy` of the same data from a local
                  restic repository into Garage (made with `init --copy-chunker-params`)
    nothing-new   the same again, with nothing new
    restore       host A's version from the vault into a new ext4 filesystem, against
                  `restic restore` from Garage (the restored trees are compared with the corpus);
                  each starts with the page cache dropped (see `timed`)
                  the vault has `direct-reads = true`: packs come from Garage at URLs it signs
    second-host   host B, registered with the same vault, backs up a near-identical tree (the
                  corpus with 2% of its files rewritten, 1% deleted, 1% added) to its own local
                  repository (made with the vault's key) and replicates it: its time, and the
                  vault's pack bytes after B against after A
    memory        a second new vault on Garage, to which A and B replicate at the same time: the
                  vault process's peak resident memory (VmHWM)

The local backups that fill the staging repositories are not timed; each timed command starts
when Garage is idle. A benchmark, not a test:
nothing is asserted; the report says which targets are met.
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import time
from pathlib import Path

import run as harness

TARGETS = {
    "replicate": ("≥ 3× `restic copy`", lambda r: r["replicate"]["speedup_vs_restic"] >= 3.0),
    "nothing-new": ("under 1 s", lambda r: r["nothing-new"]["sysstate_s"] < 1.0),
    "restore": ("≥ 2× `restic restore` from Garage", lambda r: r["restore"]["speedup_vs_restic"] >= 2.0),
    "second-host": ("two near-identical hosts ≤ 1.2× the bytes of one", lambda r: r["second-host"]["bytes_ratio"] <= 1.2),
    "memory": ("vault peak RSS < 256 MiB, two hosts replicating", lambda r: r["memory"]["vault_peak_mib"] < 256),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Vault:
    """`sysstate vault serve` on 127.0.0.1, its storage a new prefix of Garage's bucket."""

    def __init__(self, binary, work, storage):
        self.binary, self.dir = binary, work
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / "none.toml").write_text("")
        self.port = free_port()
        self.url = f"vault://127.0.0.1:{self.port}"
        harness.run([binary, "vault", "init", "--storage", storage, "--url", self.url, "--listen", f"127.0.0.1:{self.port}"],
                    env=self.env())
        settings = "".join(f"{name}={os.environ[name]}\n" for name in
                           ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT", "AWS_REGION", "AWS_ALLOW_HTTP")
                           if name in os.environ)
        # Hosts here reach Garage: packs are read straight from it at URLs the vault signs.
        with open(work / "vault" / "vault.toml", "a") as config:
            config.write("direct-reads = true\n")
        env_file = work / "vault" / "storage.env"
        env_file.write_text(settings)
        env_file.chmod(0o600)
        self.log = open(work / "serve.log", "w")
        self.process = subprocess.Popen([binary, "vault", "serve"], env=self.env(), stdout=self.log, stderr=subprocess.STDOUT)
        until = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > until or self.process.poll() is not None:
                    raise SystemExit(f"the vault did not start: {(work / 'serve.log').read_text()[-2000:]}")
                time.sleep(0.1)

    def env(self):
        return {**os.environ, "SYSSTATE_VAULT_DIR": str(self.dir / "vault"), "SYSSTATE_CONFIG": str(self.dir / "none.toml"),
                "SYSSTATE_STATE_DIR": str(self.dir / "state"), "SYSSTATE_RUNTIME_DIR": str(self.dir / "run")}

    def command(self, *args):
        return harness.run([self.binary, "vault", *args], env=self.env())

    def pack_bytes(self):
        return json.loads(self.command("report", "--json"))["storage"]["pack-bytes"]

    def peak_rss_mib(self):
        for line in open(f"/proc/{self.process.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise SystemExit("no VmHWM for the vault")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


class Host:
    """A host: a state folder of its own, registered with a vault, its local repository the
    staging area (`[vault] url` in its config)."""

    def __init__(self, binary, name, work, fs_root):
        self.binary, self.name, self.work = binary, name, work
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        self.fs_root = fs_root
        self.repo = work / "repo"

    def env(self):
        return {**os.environ, "SYSSTATE_CONFIG": str(self.work / "config.toml"), "SYSSTATE_STATE_DIR": str(self.work / "state"),
                "SYSSTATE_RUNTIME_DIR": str(self.work / "run"), "SYSSTATE_PASSPHRASE": harness.PASSWORD}

    def register(self, vault):
        (self.work / "config.toml").write_text(
            "[shadow]\nprovider = \"auto\"\n"
            f"[[shadow.storage]]\nfor = \"{self.fs_root}\"\non = \"{self.fs_root}/shadow-{self.name}\"\nmax-size = \"50%\"\n"
            "[[component]]\nname = \"data\"\npaths = [\"/data\"]\n"
            f"[vault]\nurl = \"{vault.url}\"\n"
        )
        credentials = self.work / f"{self.name}.vault-credentials"
        vault.command("credentials", "--host", self.name, "--output", str(credentials))
        harness.run([self.binary, "agent", "register", str(credentials)], env=self.env())

    def backup(self, corpus):
        harness.run([self.binary, "backup", "--root", str(corpus.parent), "--target", str(self.repo), "--component", "data",
                     "--quiet"], env=self.env())

    def copy(self, vault):
        return [self.binary, "copy", "--target", str(self.repo), "--to", vault.url, "--quiet"]

    def restore(self, vault, dest):
        return [self.binary, "restore", "--target", vault.url, "--to", str(dest), "--quiet"]


def settle(limit_s=60):
    """Waits until Garage is idle (under 5% of a core over half a second): after a large
    upload it works on its own for a while (block references, metadata), and a command timed
    then would be charged for the previous one's writes."""
    pids = subprocess.run(["pgrep", "-x", "garage"], capture_output=True, text=True).stdout.split()

    def cpu_ticks():
        total = 0
        for pid in pids:
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except OSError:
                pass
        return total

    until = time.monotonic() + limit_s
    while time.monotonic() < until:
        before = cpu_ticks()
        time.sleep(0.5)
        if cpu_ticks() - before <= os.sysconf("SC_CLK_TCK") * 0.025:
            return
    harness.log(f"   Garage still busy after {limit_s} s: timing anyway")


def restic_env(work):
    return {**os.environ, "RESTIC_PASSWORD": harness.PASSWORD, "RESTIC_CACHE_DIR": str(work / "restic-cache")}


def one_round(binary, work, corpus, corpus_b, round_number, tag, logs):
    """One round of every phase: the figures."""
    store = harness.Store("s3", work)
    bucket, endpoint = store.bucket, store.endpoint
    prefix = f"{tag}/round{round_number}"
    figures = {}

    def timed(name, cmd, env):
        settle()
        if name.startswith("restore"):
            # With the page cache left as it is, the third 1.4 GB restore in a row took twice the
            # system time of the first two (4.0 s → 9.6 s, measured by hand; with the cache
            # dropped before each: 3.4–4.0 s each), so the tool that restored second in a round
            # paid for the first. Each restore starts with an empty page cache.
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        m = harness.measure(cmd, env, log_path=logs / f"{name}.log")
        harness.log(f"   round {round_number} {name:22} {m.wall:7.2f} s {m.rss_kib / 1024:7.0f} MiB, {m.steal:4.0%} stolen")
        return m

    vault = Vault(binary, work / "vault-a", f"s3://{bucket}/{prefix}/vault")
    alpha = Host(binary, "alpha", work / "alpha", corpus.parent.parent)
    beta = Host(binary, "beta", work / "beta", corpus.parent.parent)
    try:
        for host in (alpha, beta):
            host.register(vault)
        alpha.backup(corpus)
        # restic: the same data in a local repository, copied to a repository on Garage.
        renv = restic_env(work)
        password_file = work / "restic-password"
        password_file.write_text(harness.PASSWORD)
        restic_local = work / "restic-local"
        shutil.rmtree(restic_local, ignore_errors=True)
        shutil.rmtree(work / "restic-cache", ignore_errors=True)
        restic_remote = f"s3:{endpoint}/{bucket}/{prefix}/restic"
        harness.run(["restic", "-r", str(restic_local), "init"], env=renv)
        harness.run(["restic", "-r", str(restic_local), "backup", "--quiet", "--host", "bench", str(corpus)], env=renv)
        harness.run(["restic", "-r", restic_remote, "init", "--copy-chunker-params", "--from-repo", str(restic_local),
                     "--from-password-file", str(password_file)], env=renv)
        restic_copy = ["restic", "-r", restic_remote, "copy", "--from-repo", str(restic_local), "--from-password-file",
                       str(password_file)]

        # Who goes first alternates from round to round.
        def both(phase, ours, theirs):
            pair = [("sysstate", *ours), ("restic", *theirs)]
            measured = {name: timed(f"{phase} {name}", cmd, env) for name, cmd, env in
                        (pair if round_number % 2 else pair[::-1])}
            return measured["sysstate"], measured["restic"]

        ours, theirs = both("replicate", (alpha.copy(vault), alpha.env()), (restic_copy, renv))
        figures["replicate"] = {"sysstate_s": ours.wall, "restic_s": theirs.wall, "sysstate_rss_mib": ours.rss_kib / 1024,
                                "restic_rss_mib": theirs.rss_kib / 1024}
        ours, theirs = both("nothing-new", (alpha.copy(vault), alpha.env()), (restic_copy, renv))
        figures["nothing-new"] = {"sysstate_s": ours.wall, "restic_s": theirs.wall}

        size = harness.du_bytes(corpus)
        targets = {name: harness.restore_fs(work, name, size) for name in ("sysstate", "restic")}
        try:
            ours, theirs = both("restore", (alpha.restore(vault, targets["sysstate"].mount / "restore"), alpha.env()),
                                (["restic", "-r", restic_remote, "restore", "latest", "--target",
                                  str(targets["restic"].mount / "restore")], renv))
            for name, target in targets.items():
                harness.check_restore(name, corpus, target.mount / "restore", full=round_number == 1)
        finally:
            for target in targets.values():
                target.close()
        figures["restore"] = {"sysstate_s": ours.wall, "restic_s": theirs.wall, "sysstate_rss_mib": ours.rss_kib / 1024,
                              "restic_rss_mib": theirs.rss_kib / 1024, "sysstate_cpu_s": ours.user + ours.system,
                              "restic_cpu_s": theirs.user + theirs.system, "sysstate_stolen": round(ours.steal, 3),
                              "restic_stolen": round(theirs.steal, 3)}

        after_alpha = vault.pack_bytes()
        beta.backup(corpus_b)
        ours = timed("second-host sysstate", beta.copy(vault), beta.env())
        after_beta = vault.pack_bytes()
        figures["second-host"] = {"sysstate_s": ours.wall, "one_host_bytes": after_alpha, "two_hosts_bytes": after_beta}
        figures["vault_rss_after_round_mib"] = vault.peak_rss_mib()
    finally:
        vault.stop()

    # Two hosts replicating at once into a new vault: its peak memory.
    second = Vault(binary, work / "vault-b", f"s3://{bucket}/{prefix}/vault-b")
    try:
        for host in (alpha, beta):
            harness.run([binary, "agent", "register", str(register_again(second, host))], env=host.env())
        started = time.monotonic()
        copies = [subprocess.Popen(host.copy(second), env=host.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                  for host in (alpha, beta)]
        for copy in copies:
            _, err = copy.communicate()
            if copy.returncode != 0:
                raise SystemExit(f"a replication to the second vault failed: {err.decode(errors='replace')[-2000:]}")
        figures["memory"] = {"vault_peak_mib": second.peak_rss_mib(), "both_s": time.monotonic() - started,
                             "vault_bytes": second.pack_bytes()}
        harness.log(f"   round {round_number} memory: vault peak {figures['memory']['vault_peak_mib']:.0f} MiB, "
                    f"two hosts in {figures['memory']['both_s']:.1f} s")
    finally:
        second.stop()
    return figures


def register_again(vault, host):
    """`host` registered with another vault: its config names that vault."""
    config = host.work / "config.toml"
    text = config.read_text()
    config.write_text(text[: text.index("[vault]")] + f"[vault]\nurl = \"{vault.url}\"\n")
    credentials = host.work / f"{host.name}-b.vault-credentials"
    vault.command("credentials", "--host", host.name, "--output", str(credentials))
    return credentials


def summarize(rounds):
    def median(path):
        values = list(rounds)
        for key in path:
            values = [v[key] for v in values]
        return round(statistics.median(values), 3)

    out = {}
    for phase in ("replicate", "nothing-new", "restore"):
        out[phase] = {"sysstate_s": median([phase, "sysstate_s"]), "restic_s": median([phase, "restic_s"]),
                      "rounds_sysstate_s": [round(r[phase]["sysstate_s"], 3) for r in rounds],
                      "rounds_restic_s": [round(r[phase]["restic_s"], 3) for r in rounds]}
        out[phase]["speedup_vs_restic"] = round(out[phase]["restic_s"] / out[phase]["sysstate_s"], 2)
    for phase in ("replicate", "restore"):
        out[phase]["sysstate_rss_mib"] = median([phase, "sysstate_rss_mib"])
        out[phase]["restic_rss_mib"] = median([phase, "restic_rss_mib"])
    out["second-host"] = {"sysstate_s": median(["second-host", "sysstate_s"]),
                          "one_host_bytes": int(median(["second-host", "one_host_bytes"])),
                          "two_hosts_bytes": int(median(["second-host", "two_hosts_bytes"]))}
    out["second-host"]["bytes_ratio"] = round(out["second-host"]["two_hosts_bytes"] / out["second-host"]["one_host_bytes"], 3)
    out["memory"] = {"vault_peak_mib": max(r["memory"]["vault_peak_mib"] for r in rounds),
                     "both_s": median(["memory", "both_s"])}
    return out


def report(results):
    s = results["summary"]
    info = results["corpus"]
    lines = [
        f"**system** corpus — {info['bytes'] / 1e6:.0f} MB in {info['files']} files; vault and restic repository on "
        f"Garage (127.0.0.1); median of {results['rounds']} rounds\n",
        "| phase | sysstate (vault) | restic | ratio |",
        "|---|---|---|---|",
        f"| replicate the first version | {s['replicate']['sysstate_s']:.2f} s, {s['replicate']['sysstate_rss_mib']:.0f} MiB | "
        f"{s['replicate']['restic_s']:.2f} s (`restic copy`), {s['replicate']['restic_rss_mib']:.0f} MiB | "
        f"{s['replicate']['speedup_vs_restic']:.2f}× |",
        f"| replicate, nothing new | {s['nothing-new']['sysstate_s']:.2f} s | {s['nothing-new']['restic_s']:.2f} s | "
        f"{s['nothing-new']['speedup_vs_restic']:.2f}× |",
        f"| restore | {s['restore']['sysstate_s']:.2f} s, {s['restore']['sysstate_rss_mib']:.0f} MiB | "
        f"{s['restore']['restic_s']:.2f} s, {s['restore']['restic_rss_mib']:.0f} MiB | {s['restore']['speedup_vs_restic']:.2f}× |",
        f"| a second, near-identical host replicates | {s['second-host']['sysstate_s']:.2f} s; the vault holds "
        f"{s['second-host']['two_hosts_bytes'] / 1e6:.1f} MB against {s['second-host']['one_host_bytes'] / 1e6:.1f} MB for one "
        f"({s['second-host']['bytes_ratio']:.3f}×) | | |",
        f"| two hosts replicate at once to a new vault | {s['memory']['both_s']:.1f} s; the vault's peak RSS "
        f"{s['memory']['vault_peak_mib']:.0f} MiB | | |",
        "",
        "| target | met |",
        "|---|---|",
    ]
    for phase, (what, met) in TARGETS.items():
        lines.append(f"| {phase}: {what} | {'yes' if met(s) else '**no**'} |")
    return "\n".join(lines) + "\n"


def run_vault(args, binary):
    if "SYSSTATE_TEST_S3_URL" not in os.environ:
        raise SystemExit("bench/run --vault needs Garage: `eval \"$(scripts/services.sh)\"` first")
    harness.install_peers({"restic"})
    work = args.work / "vault"
    work.mkdir(parents=True, exist_ok=True)
    fs = harness.LoopFs(work / "corpora.btrfs.img", work / "corpora", "btrfs", "12G" if not args.smoke else "1G")
    tag = f"bench-vault-{int(time.time())}"
    try:
        corpus = fs.mount / "system" / "data"
        if args.smoke:
            harness.make_small_files(corpus, 2000)  # checks the harness, times nothing
        else:
            harness.log("building the system corpus")
            harness.make_system(corpus, args.scale)
        # Host B's tree: the same, then 2% rewritten, 1% deleted, 1% added.
        corpus_b = fs.mount / "system-b" / "data"
        corpus_b.parent.mkdir(parents=True)
        harness.run(["cp", "-a", "--reflink=always", str(corpus), str(corpus_b)])
        counts = harness.Change(corpus_b, seed=7, keep=work / "change-kept").apply()
        shutil.rmtree(work / "change-kept")
        harness.log(f"host B's tree: {counts}")
        harness.run(["tar", "-cf", "/dev/null", "-C", str(fs.mount), "system", "system-b"])  # a warm page cache
        rounds = []
        for number in range(1, args.rounds + 1):
            logs = work / "logs" / f"round{number}"
            logs.mkdir(parents=True, exist_ok=True)
            rounds.append(one_round(str(binary), work / "run", corpus, corpus_b, number, tag, logs))
        results = {
            "command": f"bench/run --vault --rounds {args.rounds} --scale {args.scale}",
            "machine": harness.machine_info("btrfs"),
            "versions": {"sysstate": harness.run([str(binary), "--version"]).strip(),
                         "restic": harness.run(["restic", "version"]).strip()},
            "rounds": args.rounds,
            "corpus": {"bytes": harness.du_bytes(corpus), "files": sum(1 for p in corpus.rglob("*") if p.is_file())},
            "per_round": rounds,
        }
        results["summary"] = summarize(rounds)
    finally:
        fs.close()
    out = args.out or work / "results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    text = report(results)
    print(text)
    harness.log(f"JSON: {out}")
    return results, text
