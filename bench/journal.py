#!/usr/bin/env python3
"""The change journal's benchmark (the change-journal issue): backups by the agent, which keeps a
journal, against a command's backups, which walk, and against restic, on ext4 and btrfs side by
side in one run.

    bench/journal.py --sysstate target/release/sysstate [--fs ext4 btrfs] [--rounds 3] [--scale 1.0]
    bench/journal.py --sysstate target/release/sysstate --scaling 50000 500000 [--rounds 3]

For each filesystem: a loop device with the `system` corpus of bench/run (about 1 GB in 52,000
files), then in each round, for restic, `sysstate backup` (a command: it walks) and `sysstate
backup --now` (the agent's backup, read through its journal): a backup with nothing changed,
and one after the realistic change of bench/run (2% rewritten, 1% deleted, 1% added; undone
after, and the undone tree backed up untimed by each tool, so that each round's change is 2%). The first backups come before the rounds (with `--first-rounds N`, N of them, each from
nothing — repositories, state and shadow storage removed, the agent started again — and each
tool going first in turn). Reports medians of wall time (the whole
command: for the agent, the client that asks it and follows the job), their ratio to restic's,
and sysstate's freeze window and how each version was read (`shadow.walk`).

With `--scaling`, on ext4 only: for each count, a tree of that many small files (bench/run's
scaling corpus), a first backup and no-change backups by each tool: the curve of what a
no-change backup costs as the tree grows (with the journal, it should not).

A benchmark, not a test: nothing is asserted; the figures go in docs/benchmarks.md.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PASSWORD, Change, log, make_small_files, make_system, measure, run  # noqa: E402


def loop_filesystem(kind, base, size="8G"):
    """A fresh filesystem of `kind` on a loop device, mounted at base/mnt; returns the device."""
    subprocess.run(["umount", str(base / "mnt")], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)
    (base / "mnt").mkdir(parents=True)
    run(["truncate", "-s", size, str(base / "img")])
    device = run(["losetup", "-f", "--show", str(base / "img")]).strip()
    # An inode for every 4 KiB: the small-file trees and their base copies need a million.
    run({"ext4": ["mkfs.ext4", "-q", "-F", "-i", "4096"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}[kind] + [device])
    run(["mount", device, str(base / "mnt")])
    return device


class Sysstate:
    """`sysstate` with its own config, state and runtime folders under `work`."""

    def __init__(self, binary, work, fs_root, root):
        self.binary, self.work, self.root = binary, work, root
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.toml").write_text(
            "[shadow]\nprovider = \"auto\"\n"
            f"[[shadow.storage]]\nfor = \"{fs_root}\"\non = \"{fs_root}/shadow-{work.name}\"\nmax-size = \"50%\"\n"
            "[backup]\ncomponents = [\"data\"]\n[[component]]\nname = \"data\"\npaths = [\"/data\"]\n"
        )
        self.env = dict(os.environ)
        self.env.update({
            "SYSSTATE_CONFIG": str(work / "config.toml"),
            "SYSSTATE_STATE_DIR": str(work / "state"),
            "SYSSTATE_RUNTIME_DIR": str(work / "run"),
            "SYSSTATE_PASSPHRASE": PASSWORD,
        })
        self.repo = work / "repo"

    def command(self, *args):
        return [str(self.binary), "--root", str(self.root), "--target", str(self.repo), *args]

    def latest(self):
        out = run(self.command("versions", "--json"), env=self.env)
        return json.loads(out)[-1]


def evict(paths):
    """Drops from the page cache the pages of every file under `paths`: what the tools wrote
    (repositories, caches, state, shadow storage), not the corpus they read."""
    for top in paths:
        for folder, _, files in os.walk(top):
            for name in files:
                try:
                    fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def phase_figures(version):
    shadow = version.get("shadow") or {}
    return {
        "freeze_ms": shadow.get("freeze-window-ms"),
        "commit_ms": shadow.get("commit-ms"),
        "read": (shadow.get("walk") or {}).get("read"),
        "copy_read": [c.get("read") for c in shadow.get("copies", [])],
        "files": version["stats"]["files"],
    }


def bench_fs(kind, args, work, name=None, make=None, phases=("first", "nochange", "changed")):
    """The phases on a fresh filesystem of `kind` holding the corpus `make` makes (the system
    corpus by default)."""
    name = name or kind
    base = work / name
    device = loop_filesystem(kind, base, "16G")
    try:
        root = base / "mnt" / "root"
        corpus = root / "data"
        log(f"{name}: making the corpus")
        (make or (lambda path: make_system(path, args.scale)))(corpus)
        files = sum(1 for p in corpus.rglob("*") if p.is_file())
        time.sleep(3)  # what a backup finds settles (copies of entries changed in the last 2 s are not trusted)
        env = dict(os.environ, RESTIC_PASSWORD=PASSWORD, RESTIC_CACHE_DIR=str(work / "restic-cache"))
        restic_repo = work / f"restic-{name}"
        shutil.rmtree(restic_repo, ignore_errors=True)
        run(["restic", "init", "--repo", str(restic_repo)], env=env)
        command = Sysstate(args.sysstate, work / f"command-{name}", base / "mnt", root)
        agent_tool = Sysstate(args.sysstate, work / f"agent-{name}", base / "mnt", root)
        logs = work / "logs"
        logs.mkdir(exist_ok=True)

        def written():
            """Before each timed backup: on this virtual machine a backup that runs while the
            page cache holds the gigabytes another tool just wrote took up to half again as long
            (11.3 s first, 16.4 and 17.8 s after two others; 11.3, 12.2 and 12.9 s with what they
            wrote evicted), so each starts with only the corpus cached."""
            os.sync()
            evict([restic_repo, work / "restic-cache", command.work, agent_tool.work,
                   *(base / "mnt").glob("shadow-*")])

        def restic():
            written()
            return measure(["restic", "backup", "--repo", str(restic_repo), "--quiet", str(corpus)], env,
                           log_path=logs / "restic.log")

        def by_command():
            written()
            return measure(command.command("backup", "--quiet"), command.env, log_path=logs / "command.log")

        def by_agent():
            written()
            return measure([str(args.sysstate), "backup", "--now"],
                           agent_tool.env, log_path=logs / "agent.log")

        def start_agent():
            started = subprocess.Popen(agent_tool.command("agent"), env=agent_tool.env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=open(logs / f"agent-{base.name}.err", "a"))
            deadline = time.monotonic() + 30
            while not (agent_tool.work / "run" / "agent.sock").exists():
                if time.monotonic() > deadline:
                    raise SystemExit("the agent's socket did not appear")
                time.sleep(0.1)
            return started

        def start_anew(agent):
            """Every tool's repository, state and shadow storage gone, the agent started again:
            the next backups are first backups again."""
            agent.terminate()
            agent.wait()
            shutil.rmtree(restic_repo, ignore_errors=True)
            run(["restic", "init", "--repo", str(restic_repo)], env=env)
            for tool in (command, agent_tool):
                for path in (tool.repo, tool.work / "state", base / "mnt" / f"shadow-{tool.work.name}"):
                    shutil.rmtree(path, ignore_errors=True)
            time.sleep(3)
            return start_agent()

        agent = start_agent()
        try:
            results = {"restic": {}, "command": {}, "agent": {}}
            figures = {"command": {}, "agent": {}}
            tools = [("restic", restic, None), ("command", by_command, command), ("agent", by_agent, agent_tool)]
            for phase in phases:
                rounds = args.first_rounds if phase == "first" else args.rounds
                for round_number in range(rounds):
                    change = Change(corpus, 100 + round_number, work / "kept") if phase == "changed" else None
                    if change:
                        change.apply()
                    if phase == "first" and round_number > 0:
                        agent = start_anew(agent)
                    # Whoever goes first alternates: a tool that runs after another's gigabyte of
                    # writes can pay for them (the first backups' order changed them by half).
                    turn = round_number % len(tools) if phase == "first" else 0
                    for name, backup, tool in tools[turn:] + tools[:turn]:
                        measured = backup()
                        results[name].setdefault(phase, []).append(measured.wall)
                        if tool:
                            figures[name].setdefault(phase, []).append(phase_figures(tool.latest()))
                        log(f"{base.name} {phase} round {round_number}: {name} {measured.wall:.3f} s")
                    if change:
                        change.undo()
                        time.sleep(2.2)  # the undone files settle too
                        # Each tool backs up the undone tree, untimed: the next round's change
                        # is then the 2% of its phase, not that and the undoing of this one.
                        for name, backup, tool in tools:
                            backup()
        finally:
            agent.terminate()
            agent.wait()
        summary = {}
        for name, phases in results.items():
            summary[name] = {}
            for phase, walls in phases.items():
                median = statistics.median(walls)
                restic_median = statistics.median(results["restic"][phase])
                summary[name][phase] = {"median_s": round(median, 3), "vs_restic": round(restic_median / median, 2)}
        return {"files": files, "summary": summary, "walls": results, "figures": figures}
    finally:
        subprocess.run(["umount", str(base / "mnt")], capture_output=True)
        subprocess.run(["losetup", "-d", device], capture_output=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sysstate", type=Path, default=Path("target/release/sysstate").resolve())
    parser.add_argument("--fs", nargs="+", default=["ext4", "btrfs"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--first-rounds", type=int, default=1,
                        help="first backups, each from nothing, the tools taking turns to go first (3: each goes first once)")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--scaling", type=int, nargs="+", default=[],
                        help="instead of the system corpus: trees of this many small files, on ext4")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/sysstate-journal-bench"))
    parser.add_argument("--out", type=Path, default=None,
                        help="where the results go (results-journal.json, or results-journal-scaling.json with --scaling)")
    args = parser.parse_args()
    args.sysstate = args.sysstate.resolve()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    report = {"date": time.strftime("%Y-%m-%d"), "sysstate": run([str(args.sysstate), "--version"]).strip(),
              "restic": run(["restic", "version"]).strip(), "filesystems": {}}
    if args.scaling:
        for count in args.scaling:
            report["filesystems"][f"ext4-{count}"] = bench_fs(
                "ext4", args, args.work, f"ext4-{count}", lambda path, n=count: make_small_files(path, n),
                ("first", "nochange"))
    else:
        for kind in args.fs:
            report["filesystems"][kind] = bench_fs(kind, args, args.work)
    out = args.out or Path(__file__).resolve().parent / ("results-journal-scaling.json" if args.scaling else "results-journal.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    for kind, result in report["filesystems"].items():
        print(f"\n{kind}: {result['files']} files (median seconds; restic's time / this one's)")
        print(f"{'phase':<10}" + "".join(f"{name:>22}" for name in result["summary"]))
        for phase in next(iter(result["summary"].values())):
            cells = [f"{s[phase]['median_s']:>8.3f} s ({s[phase]['vs_restic']:>5.2f}×)" for s in result["summary"].values()]
            print(f"{phase:<10}" + "".join(f"{c:>22}" for c in cells))
        for name in ["command", "agent"]:
            for phase, rows in result["figures"][name].items():
                freeze = statistics.median(r["freeze_ms"] for r in rows)
                commit = statistics.median(r["commit_ms"] or 0 for r in rows)
                reads = sorted({r["read"] for r in rows})
                # With no writer in the component set nothing is frozen (a window of 0 ms); the
                # commit is the provider's point-in-time copy all the same.
                print(f"  {name} {phase}: freeze window {freeze} ms, commit {commit} ms, read by {', '.join(map(str, reads))}")


if __name__ == "__main__":
    main()
