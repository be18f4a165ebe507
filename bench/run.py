#!/usr/bin/env python3
"""The benchmark harness: sysstate against restic, Borg and rustic on the same data.

    bench/run                       # everything (as root): corpora, peers, rounds, scaling
    bench/run --corpus system       # one corpus
    bench/run --smoke               # a tiny run that checks the harness itself (CI)
    bench/run --vault               # the vault on Garage against restic copy / restore (bench/vault.py)

For each corpus, in each round, every tool does each phase before any tool does the next, in
an order that rotates from round to round:

    first      backup into an empty repository
    nochange   backup again, nothing changed
    changed    backup again after 2% of the files were rewritten, 1% deleted and 1% added
    restore    restore the newest version into an empty folder (then compared with the corpus:
               every entry and byte in the first round, file count and size in the others)
    verify     read and check every byte of the repository (check --read-data and equivalents)

The change is undone at the end of the round, so every round starts from the same tree. Wall
time and peak RSS (of the process and its children, from GNU time) are taken per command; the report
gives the median over the rounds, each tool's ratio to restic, and the repository sizes. The
scaling part backs up generated trees of small files at 1×, 3× and 10× and reports how time and
memory grow with the file count.

The corpora live on a btrfs filesystem on a loop device, so that sysstate's backups take their
point-in-time copy the way a deployment on btrfs does (a read-only snapshot) and that cost is in
its figures; the peers read the same files live. Repositories are on the machine's own disk;
each restore goes into a new ext4 filesystem on a loop device. The page cache is warm for every
tool: in a VM the host caches the disk image too, so cold-cache figures would depend on which
tool happened to read first.
"""

import argparse
import datetime
import filecmp
import json
import os
import platform
import random
import shutil
import stat
import statistics
import subprocess
import sys
import time
from pathlib import Path

PHASES = ["first", "nochange", "changed", "restore", "verify", "reindex"]
TOOLS = ["sysstate", "restic", "rustic", "borg"]
PASSWORD = "bench-passphrase"
REPO_ROOT = Path(__file__).resolve().parent.parent


def log(message):
    print(message, file=sys.stderr, flush=True)


def run(cmd, **kwargs):
    """Runs a set-up command; its failure ends the benchmark with its output."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(map(str, cmd))}` failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


# ---------------------------------------------------------------------------------------------
# Measuring


class Measurement:
    def __init__(self, wall, rss_kib, user, system, steal=0.0):
        self.wall = wall
        self.rss_kib = rss_kib
        self.user = user
        self.system = system
        # The share of the machine's CPU time the hypervisor gave to others meanwhile: on a
        # shared virtual machine, what makes one round slower than the next.
        self.steal = steal


def cpu_times():
    """(all, steal) CPU ticks of the machine so far, from /proc/stat."""
    with open("/proc/stat") as stat_file:
        ticks = [int(n) for n in stat_file.readline().split()[1:]]
    return sum(ticks[:8]), ticks[7]


def measure(cmd, env, cwd=None, log_path=None):
    """Runs `cmd`, returning its wall time and the peak RSS of it and its children.

    Through GNU time, not wait4 from here: a child forked from this Python process starts
    with a peak RSS that already counts this process's (the kernel carries the high-water mark
    over exec), which made every tool look as big as the harness."""
    os.sync()  # the previous phase's dirty pages are not this one's cost
    usage_path = Path(log_path).with_suffix(".time")
    before = cpu_times()
    with open(log_path, "w") as out:
        start = time.monotonic()
        result = subprocess.run(
            ["/usr/bin/time", "-f", "%M %U %S", "-o", str(usage_path), *cmd],
            env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        wall = time.monotonic() - start
    if result.returncode != 0:
        tail = Path(log_path).read_text(errors="replace")[-3000:]
        raise SystemExit(f"`{' '.join(map(str, cmd))}` failed ({result.returncode}):\n{tail}")
    after = cpu_times()
    rss_kib, user, system = usage_path.read_text().split()[-3:]
    steal = (after[1] - before[1]) / max(1, after[0] - before[0])
    return Measurement(wall, int(rss_kib), float(user), float(system), steal)


def du_bytes(path):
    """Bytes allocated under `path` (what the repository costs on disk)."""
    return int(run(["du", "-sb", "--apparent-size", str(path)]).split()[0])


class Store:
    """Where the repositories live: this machine's disk (`local`), Garage (`s3`) or Azurite
    (`azure`), both on 127.0.0.1 from `scripts/services.sh` (its environment must be loaded:
    `eval "$(scripts/services.sh)"`). Each round's repositories get a new prefix, so nothing
    is reused; what a run leaves in the object store stays there."""

    def __init__(self, kind, work):
        self.kind, self.work = kind, work
        if kind == "s3":
            url = os.environ.get("SYSSTATE_TEST_S3_URL")
            endpoint = os.environ.get("AWS_ENDPOINT")
            if not url or not endpoint:
                raise SystemExit("--store s3 needs the environment of scripts/services.sh (SYSSTATE_TEST_S3_URL, AWS_ENDPOINT)")
            self.bucket, self.endpoint = url.split("://", 1)[1].split("/")[0], endpoint.rstrip("/")
        elif kind == "azure":
            url = os.environ.get("SYSSTATE_TEST_AZURE_URL")
            if not url:
                raise SystemExit("--store azure needs the environment of scripts/services.sh (SYSSTATE_TEST_AZURE_URL)")
            self.container = url.split("://", 1)[1].split("/")[0]
        self.run_tag = f"bench-{int(time.time())}"

    def supports(self, tool):
        """restic 0.14 and rustic reach Garage; none of the peers reaches Azurite's endpoint."""
        return self.kind == "local" or tool == "sysstate" or (self.kind == "s3" and tool in ("restic", "rustic"))

    def repo(self, tool, tag):
        """The repository of `tool` for round `tag`, as the tool takes it."""
        if self.kind == "local":
            return self.work / "repos" / tool
        prefix = f"{self.run_tag}/{tag}/{tool}"
        if self.kind == "azure":
            return f"az://{self.container}/{prefix}"
        if tool == "sysstate":
            return f"s3://{self.bucket}/{prefix}"
        if tool == "restic":
            return f"s3:{self.endpoint}/{self.bucket}/{prefix}"
        return ObjectRepo("opendal:s3", {"bucket": self.bucket, "root": f"/{prefix}", "endpoint": self.endpoint,
                                         "region": os.environ.get("AWS_REGION", "garage"),
                                         "access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
                                         "secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"]})

    def remove(self, repo):
        if self.kind == "local":
            shutil.rmtree(repo, ignore_errors=True)

    def size(self, repo):
        """Bytes of the repository, on local disk only (None on an object store)."""
        return du_bytes(repo) if self.kind == "local" else None


class ObjectRepo(str):
    """A repository given as a name and options (rustic's OpenDAL backends)."""

    def __new__(cls, name, options):
        made = super().__new__(cls, name)
        made.options = options
        return made


# ---------------------------------------------------------------------------------------------
# The tools


class Tool:
    """One backup program, driven through its command line with its default settings."""

    name = ""

    def __init__(self, work, binary=None):
        self.work = work
        self.binary = binary

    def env(self):
        env = dict(os.environ)
        env.update(self.extra_env())
        return env

    def extra_env(self):
        return {}

    def version(self):
        return ""

    def reindex(self, repo):
        """The command that rebuilds the repository's index from its packs, or None."""
        return None


class Sysstate(Tool):
    name = "sysstate"

    def __init__(self, work, binary, fs_root):
        super().__init__(work, binary)
        self.fs_root = fs_root

    def extra_env(self):
        return {
            "SYSSTATE_CONFIG": str(self.work / "config.toml"),
            "SYSSTATE_STATE_DIR": str(self.work / "state"),
            "SYSSTATE_RUNTIME_DIR": str(self.work / "run"),
            "SYSSTATE_PASSPHRASE": PASSWORD,
        }

    def prepare(self, corpus):
        self.work.mkdir(parents=True, exist_ok=True)
        # The corpus is the `data` component of the tree `corpus.parent`; the point-in-time
        # copy is taken by the provider `auto` picks for the corpus filesystem (btrfs: a snapshot).
        (self.work / "config.toml").write_text(
            "[shadow]\nprovider = \"auto\"\n"
            f"[[shadow.storage]]\nfor = \"{self.fs_root}\"\non = \"{self.fs_root}/shadow-{self.name}\"\nmax-size = \"50%\"\n"
            "[[component]]\nname = \"data\"\npaths = [\"/data\"]\n"
        )

    def init(self, repo):
        return None  # the first backup creates the repository

    def backup(self, repo, corpus):
        return [self.binary, "backup", "--root", str(corpus.parent), "--target", str(repo), "--component", "data", "--quiet"], None

    def restore(self, repo, dest):
        return [self.binary, "restore", "--target", str(repo), "--to", str(dest), "--quiet"], None

    def verify(self, repo):
        return [self.binary, "check", "--target", str(repo), "--read-data", "--quiet"], None

    def reindex(self, repo):
        return [self.binary, "repair", "index", "--target", str(repo), "--quiet"], None

    def version(self):
        return run([self.binary, "--version"]).strip()


class Restic(Tool):
    name = "restic"

    def extra_env(self):
        return {"RESTIC_PASSWORD": PASSWORD, "RESTIC_CACHE_DIR": str(self.work / "cache")}

    def prepare(self, corpus):
        self.work.mkdir(parents=True, exist_ok=True)

    def init(self, repo):
        return [self.binary, "-r", str(repo), "init"]

    def backup(self, repo, corpus):
        return [self.binary, "-r", str(repo), "backup", "--quiet", "--host", "bench", str(corpus)], None

    def restore(self, repo, dest):
        return [self.binary, "-r", str(repo), "restore", "latest", "--target", str(dest)], None

    def verify(self, repo):
        return [self.binary, "-r", str(repo), "check", "--read-data"], None

    def reindex(self, repo):
        # `rebuild-index` until 0.16 (Debian's 0.14), `repair index` since.
        words = self.version().split()
        release = tuple(int(p) for p in words[1].split(".")[:2]) if len(words) > 1 and words[1][0].isdigit() else (0, 16)
        command = ["rebuild-index"] if release < (0, 16) else ["repair", "index"]
        return [self.binary, "-r", str(repo), *command], None

    def version(self):
        return run([self.binary, "version"]).strip()


class Rustic(Restic):
    name = "rustic"

    def extra_env(self):
        return {
            "RUSTIC_PASSWORD": PASSWORD,
            "RUSTIC_CACHE_DIR": str(self.work / "cache"),
            "RUSTIC_NO_PROGRESS": "true",
            "HOME": str(self.work / "home"),  # no profile from the user's config
        }

    def repo_args(self, repo):
        """`-r REPO`; a repository with options (OpenDAL's S3) is given by the default profile,
        `$HOME/.config/rustic/rustic.toml`, as rustic takes no options on its command line."""
        options = getattr(repo, "options", None)
        if not options:
            return ["-r", str(repo)]
        profile = self.work / "home" / ".config" / "rustic" / "rustic.toml"
        profile.parent.mkdir(parents=True, exist_ok=True)
        lines = ["[repository]", f'repository = "{repo}"', "[repository.options]"]
        lines += [f'{key} = "{value}"' for key, value in options.items()]
        profile.write_text("\n".join(lines) + "\n")
        return []

    def init(self, repo):
        return [self.binary, *self.repo_args(repo), "init"]

    def backup(self, repo, corpus):
        return [self.binary, *self.repo_args(repo), "backup", "--host", "bench", str(corpus)], None

    def restore(self, repo, dest):
        return [self.binary, *self.repo_args(repo), "restore", "latest", str(dest)], None

    def verify(self, repo):
        return [self.binary, *self.repo_args(repo), "check", "--read-data"], None

    def reindex(self, repo):
        return [self.binary, *self.repo_args(repo), "repair", "index"], None

    def version(self):
        return run([self.binary, "--version"]).strip()


class Borg(Tool):
    name = "borg"

    def extra_env(self):
        return {
            "BORG_PASSPHRASE": PASSWORD,
            "BORG_BASE_DIR": str(self.work / "base"),
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        }

    def prepare(self, corpus):
        self.work.mkdir(parents=True, exist_ok=True)
        self.archives = 0

    def init(self, repo):
        self.archives = 0
        return [self.binary, "init", "--encryption=repokey-blake2", str(repo)]

    def backup(self, repo, corpus):
        self.archives += 1
        # Relative to the corpus's parent, as `borg extract` writes into the current folder.
        return [self.binary, "create", f"{repo}::v{self.archives}", corpus.name], corpus.parent

    def restore(self, repo, dest):
        dest.mkdir(parents=True, exist_ok=True)
        return [self.binary, "extract", f"{repo}::v{self.archives}"], dest

    def verify(self, repo):
        return [self.binary, "check", "--verify-data", str(repo)], None

    def version(self):
        return run([self.binary, "--version"]).strip()


# ---------------------------------------------------------------------------------------------
# Corpora


def copy_tree(sources, dest, limit_bytes):
    """Copies whole top-level entries of `sources` into `dest` until `limit_bytes` is reached."""
    dest.mkdir(parents=True)
    total = 0
    for source in sources:
        target = dest / source.strip("/").replace("/", "-")
        run(["cp", "-a", "--reflink=never", source, str(target)])
        total = du_bytes(dest)
        if total >= limit_bytes:
            break


def make_system(dest, scale):
    # /usr/share, /usr/include and /usr/bin: about 1 GB in 52,000 files on a Debian machine.
    copy_tree(["/usr/share", "/usr/include", "/usr/bin"], dest, int(1.2e9 * scale))


def make_minbase(dest, scale):
    cache = Path(os.environ.get("SYSSTATE_MINBASE_CACHE", "/var/cache/sysstate-test/minbase-bookworm"))
    if not Path(f"{cache}.complete").exists():
        log(f"debootstrap a bookworm minbase into {cache} (once)")
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        run(["debootstrap", "--variant=minbase", "bookworm", str(cache), "http://deb.debian.org/debian"])
        Path(f"{cache}.complete").touch()
    dest.parent.mkdir(parents=True, exist_ok=True)
    run(["cp", "-a", "--reflink=never", str(cache), str(dest)])


def pseudo_text(rng, size):
    """Log- or table-like text: compresses about 3:1 with zstd, like real database and log pages."""
    words = [b"INSERT", b"SELECT", b"user", b"order", b"status", b"2026-11-29", b"ok", b"error", b"id", b"value"]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choice(words) for _ in range(6)) + b" %d %08x\n" % (rng.randrange(10**6), rng.getrandbits(32))
    return bytes(out[:size])


def make_large(dest, scale):
    """Three big files: a database-like file (text pages with random pages among them), a VM
    image-like file (long zero runs, random and text blocks) and an incompressible archive."""
    dest.mkdir(parents=True)
    rng = random.Random(6)
    size = int(300 * 2**20 * scale)
    block = 2**20
    with open(dest / "database.db", "wb") as f:
        for i in range(size // block):
            f.write(rng.randbytes(block) if i % 3 == 0 else pseudo_text(rng, block))
    with open(dest / "disk.img", "wb") as f:
        for i in range(size // block):
            kind = i % 4
            if kind == 0:
                f.seek(block, 1)  # a hole
            elif kind == 1:
                f.write(rng.randbytes(block))
            else:
                f.write(pseudo_text(rng, block))
        f.truncate()
    with open(dest / "archive.tar.zst", "wb") as f:
        for _ in range(size // block):
            f.write(rng.randbytes(block))


def make_small_files(dest, count, seed=500):
    """`count` small files (0–8 KiB, mostly text) in folders of 100, under folders of 100."""
    rng = random.Random(seed)
    for i in range(count):
        directory = dest / f"d{i // 10000:03d}" / f"e{(i // 100) % 100:02d}"
        if i % 100 == 0:
            directory.mkdir(parents=True, exist_ok=True)
        size = int(rng.expovariate(1 / 1500)) % 8192
        data = pseudo_text(rng, size) if i % 4 else rng.randbytes(size)
        (directory / f"f{i:07d}.txt").write_bytes(data)


CORPORA = {
    "system": make_system,
    "minbase": make_minbase,
    "large": make_large,
}


# ---------------------------------------------------------------------------------------------
# The realistic change: 2% of the files rewritten, 1% deleted, 1% added; undone afterwards.


class Change:
    def __init__(self, corpus, seed, keep):
        self.corpus = corpus
        self.keep = keep
        self.rng = random.Random(seed)
        self.added = []
        self.kept = []  # (original path, kept copy)

    def apply(self):
        files = sorted(p for p in self.corpus.rglob("*") if p.is_file() and not p.is_symlink())
        self.rng.shuffle(files)
        n = len(files)
        rewrite = files[: max(1, n * 2 // 100)]
        delete = files[len(rewrite) : len(rewrite) + max(1, n // 100)]
        add = max(1, n // 100)
        shutil.rmtree(self.keep, ignore_errors=True)
        self.keep.mkdir(parents=True)
        for i, path in enumerate(rewrite + delete):
            kept = self.keep / str(i)
            shutil.copy2(path, kept)
            self.kept.append((path, kept))
        for path in rewrite:
            # An edit: a few KiB replaced somewhere in the file and a line appended, as a config
            # edit, a package upgrade or a database page write would do.
            with open(path, "r+b") as f:
                size = f.seek(0, 2)
                edit = min(size, 4096)
                f.seek(self.rng.randrange(size - edit + 1))
                f.write(self.rng.randbytes(edit))
                f.seek(0, 2)
                f.write(pseudo_text(self.rng, 64))
        for path in delete:
            path.unlink()
        survivors = rewrite + files[len(rewrite) + len(delete) :]
        for i in range(add):
            model = self.rng.choice(survivors)
            new = model.with_name(f"added-{i}-{model.name}")
            size = min(model.stat().st_size, 1 << 20)
            new.write_bytes(pseudo_text(self.rng, size // 2) + self.rng.randbytes(size - size // 2))
            self.added.append(new)
        return {"rewritten": len(rewrite), "deleted": len(delete), "added": add, "files": n}

    def undo(self):
        for path in self.added:
            path.unlink()
        for path, kept in self.kept:
            shutil.copy2(kept, path)
        shutil.rmtree(self.keep)


# ---------------------------------------------------------------------------------------------
# Rounds


def rotate(items, by):
    by %= len(items)
    return items[by:] + items[:by]


def run_corpus(name, corpus, tools, rounds, work, store):
    """All phases for all tools on one corpus; returns {tool: {phase: [Measurement]}, ...}."""
    results = {t.name: {p: [] for p in PHASES} for t in tools}
    sizes = {t.name: {"first": [], "final": []} for t in tools}
    files = sum(1 for p in corpus.rglob("*") if p.is_file())
    size = du_bytes(corpus)
    log(f"== {name}: {size / 1e6:.0f} MB, {files} files, {rounds} rounds")
    run(["tar", "-cf", "/dev/null", "-C", str(corpus.parent), corpus.name])  # warm the page cache
    for r in range(rounds):
        order = rotate(tools, r)
        repos = {t.name: store.repo(t.name, f"{name}-{r + 1}") for t in tools}
        logs = work / "logs" / name / f"round{r + 1}"
        logs.mkdir(parents=True, exist_ok=True)
        for tool in order:
            store.remove(repos[tool.name])
            shutil.rmtree(tool.work, ignore_errors=True)
            tool.prepare(corpus)
            init = tool.init(repos[tool.name])
            if init:
                run(init, env=tool.env())

        def phase(phase_name, command_for):
            for tool in order:
                command = command_for(tool)
                if command is None:
                    continue  # the tool has no such command (borg: no index to rebuild)
                cmd, cwd = command
                m = measure(cmd, tool.env(), cwd=cwd, log_path=logs / f"{tool.name}-{phase_name}.log")
                results[tool.name][phase_name].append(m)
                log(f"   round {r + 1} {phase_name:9} {tool.name:9} {m.wall:7.2f} s {m.rss_kib / 1024:7.0f} MiB")

        phase("first", lambda t: t.backup(repos[t.name], corpus))
        for tool in tools:
            sizes[tool.name]["first"].append(store.size(repos[tool.name]))
        phase("nochange", lambda t: t.backup(repos[t.name], corpus))
        change = Change(corpus, seed=r + 1, keep=work / "change-kept")
        counts = change.apply()
        log(f"   change: {counts}")
        phase("changed", lambda t: t.backup(repos[t.name], corpus))
        for tool in tools:
            sizes[tool.name]["final"].append(store.size(repos[tool.name]))
        targets = {t.name: restore_fs(work, t.name, size) for t in tools}
        dests = {name: fs.mount / "restore" for name, fs in targets.items()}
        phase("restore", lambda t: t.restore(repos[t.name], dests[t.name]))
        for tool in tools:
            # The newest version is the changed tree, which the corpus still holds.
            check_restore(tool.name, corpus, dests[tool.name], full=r == 0)
        for target in targets.values():
            target.close()
        phase("verify", lambda t: t.verify(repos[t.name]))
        phase("reindex", lambda t: t.reindex(repos[t.name]))
        change.undo()
        for repo in repos.values():
            store.remove(repo)
    sizes = {tool: kept for tool, kept in sizes.items() if None not in kept["first"]}
    return summarize(results, sizes, {"bytes": size, "files": files})


def restore_fs(work, name, corpus_bytes):
    """A new ext4 filesystem to restore into. Restoring into a folder of a filesystem where
    many files were just deleted measures ext4's inode allocator (`recently_deleted`), not the
    tool: seen here, the same restore took 0.45 s on a new filesystem and 2.3–2.8 s on /var/tmp."""
    return LoopFs(work / f"restore-{name}.img", work / "restores" / name, "ext4", max(4 << 30, corpus_bytes * 3))


def restored_tree(corpus, dest):
    """Where a tool put the restored corpus: `dest/data` (sysstate, Borg) or the corpus's
    absolute path under `dest` (restic, rustic)."""
    for candidate in (dest / corpus.name, dest / corpus.relative_to("/")):
        if candidate.is_dir():
            return candidate
    raise SystemExit(f"the restore into {dest} holds neither {corpus.name} nor {corpus.relative_to('/')}")


def tree_summary(path):
    files, size = 0, 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            files += 1
            size += p.stat().st_size
    return files, size


def compare_trees(a, b):
    """The entries that differ between two trees: type, bytes, link target or device number."""
    differences = []
    names_a = {p.relative_to(a) for p in a.rglob("*")}
    names_b = {p.relative_to(b) for p in b.rglob("*")}
    differences += [f"only in the corpus: {n}" for n in sorted(names_a - names_b)]
    differences += [f"only in the restore: {n}" for n in sorted(names_b - names_a)]
    for name in sorted(names_a & names_b):
        sa, sb = (a / name).lstat(), (b / name).lstat()
        if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
            differences.append(f"{name}: another type")
        elif stat.S_ISREG(sa.st_mode) and not filecmp.cmp(a / name, b / name, shallow=False):
            differences.append(f"{name}: other content")
        elif stat.S_ISLNK(sa.st_mode) and os.readlink(a / name) != os.readlink(b / name):
            differences.append(f"{name}: another link target")
        elif (stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode)) and sa.st_rdev != sb.st_rdev:
            differences.append(f"{name}: another device number")
    return differences


def check_restore(tool, corpus, dest, full):
    """A benchmark of a restore that restored the wrong thing is worthless: compare the restored
    tree with the corpus (every byte with `diff -r` when `full`, else file count and size)."""
    restored = restored_tree(corpus, dest)
    if full:
        differences = compare_trees(corpus, restored)
        if differences:
            raise SystemExit(f"{tool} restored a tree that differs from the corpus:\n" + "\n".join(differences[:20]))
    elif tree_summary(corpus) != tree_summary(restored):
        raise SystemExit(f"{tool} restored {tree_summary(restored)} (files, bytes), the corpus holds {tree_summary(corpus)}")


def summarize(results, sizes, corpus_info):
    out = {"corpus": corpus_info, "tools": {}}
    for tool, phases in results.items():
        entry = {}
        for phase, ms in phases.items():
            if not ms:
                continue
            entry[phase] = {
                "wall_s": round(statistics.median(m.wall for m in ms), 3),
                "rss_mib": round(statistics.median(m.rss_kib for m in ms) / 1024, 1),
                "cpu_s": round(statistics.median(m.user + m.system for m in ms), 3),
                "rounds_wall_s": [round(m.wall, 3) for m in ms],
                "rounds_rss_mib": [round(m.rss_kib / 1024, 1) for m in ms],
            }
        if tool in sizes:
            entry["repo_bytes_first"] = int(statistics.median(sizes[tool]["first"]))
            entry["repo_bytes_final"] = int(statistics.median(sizes[tool]["final"]))
        out["tools"][tool] = entry
    base = out["tools"].get("restic")
    if base:
        for tool, entry in out["tools"].items():
            for phase in PHASES:
                if phase in entry and phase in base:
                    # > 1: faster than restic by that factor; memory: fraction of restic's.
                    entry[phase]["speedup_vs_restic"] = round(base[phase]["wall_s"] / entry[phase]["wall_s"], 2)
                    entry[phase]["rss_vs_restic"] = round(entry[phase]["rss_mib"] / base[phase]["rss_mib"], 2)
            if "repo_bytes_first" in entry:
                entry["repo_vs_restic"] = round(entry["repo_bytes_first"] / base["repo_bytes_first"], 3)
    return out


def run_scaling(tools, counts, work, fs):
    """First and no-change backup, and restore, of generated small-file trees of growing size."""
    out = {}
    for count in counts:
        corpus = fs / f"scale-{count}" / "data"
        if not corpus.exists():
            log(f"generating {count} small files")
            make_small_files(corpus, count)
        res = run_corpus_phases(f"scale-{count}", corpus, tools, work, ["first", "nochange", "restore"])
        out[str(count)] = res
        shutil.rmtree(corpus.parent)  # room and page cache for the next size
    curves = {}
    for tool in [t.name for t in tools]:
        curves[tool] = {
            phase: [
                {
                    "files": int(c),
                    "wall_s": out[c]["tools"][tool][phase]["wall_s"],
                    "rss_mib": out[c]["tools"][tool][phase]["rss_mib"],
                    "us_per_file": round(out[c]["tools"][tool][phase]["wall_s"] / int(c) * 1e6, 2),
                    "kib_per_1k_files": round(out[c]["tools"][tool][phase]["rss_mib"] * 1024 / (int(c) / 1000), 2),
                }
                for c in out
            ]
            for phase in ["first", "nochange", "restore"]
        }
    return {"points": out, "curves": curves}


def run_corpus_phases(name, corpus, tools, work, phases):
    """One round of some phases (the scaling runs)."""
    results = {t.name: {p: [] for p in phases} for t in tools}
    files = sum(1 for p in corpus.rglob("*") if p.is_file())
    log(f"== {name}: {files} files")
    run(["tar", "-cf", "/dev/null", "-C", str(corpus.parent), corpus.name])
    logs = work / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        repo = work / "repos" / tool.name
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(tool.work, ignore_errors=True)
        tool.prepare(corpus)
        init = tool.init(repo)
        if init:
            run(init, env=tool.env())
        target = restore_fs(work, tool.name, du_bytes(corpus))
        dest = target.mount / "restore"
        for phase in phases:
            cmd, cwd = tool.restore(repo, dest) if phase == "restore" else tool.backup(repo, corpus)
            m = measure(cmd, tool.env(), cwd=cwd, log_path=logs / f"{tool.name}-{phase}.log")
            results[tool.name][phase].append(m)
            log(f"   {phase:9} {tool.name:9} {m.wall:7.2f} s {m.rss_kib / 1024:7.0f} MiB")
            if phase == "restore":
                check_restore(tool.name, corpus, dest, full=False)
        target.close()
        shutil.rmtree(repo, ignore_errors=True)
    return summarize(results, {}, {"files": files, "bytes": du_bytes(corpus)})


# ---------------------------------------------------------------------------------------------
# The machine, the peers, the filesystem


def install_peers(names):
    missing = [pkg for tool, pkg in [("restic", "restic"), ("borg", "borgbackup")] if tool in names and not shutil.which(tool)]
    if not Path("/usr/bin/time").exists():
        missing.append("time")  # GNU time measures peak RSS
    if missing:
        log(f"apt-get install {' '.join(missing)}")
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "install", "-y", "-qq", *missing], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if "rustic" in names and not shutil.which("rustic"):
        log("cargo install rustic-rs --locked (once; kept in cargo's bin folder)")
        subprocess.run(["cargo", "install", "rustic-rs", "--locked"], check=True)


def build_sysstate():
    log("cargo build --release -p sysstate")
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "sysstate"], cwd=REPO_ROOT, check=True)
    return REPO_ROOT / "target" / "release" / "sysstate"


def machine_info(fs_kind):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**20, 1),
        "kernel": platform.release(),
        "os": next((l.split("=", 1)[1].strip().strip('"') for l in open("/etc/os-release") if l.startswith("PRETTY_NAME")), "?"),
        "corpus_filesystem": fs_kind,
        "repository_filesystem": run(["stat", "-f", "-c", "%T", "/var/tmp"]).strip(),
    }


class LoopFs:
    """A new filesystem on a loop device, mounted at `mount`."""

    def __init__(self, image, mount, kind, size):
        self.image = image
        self.mount = mount
        self.kind = kind
        self.mount.mkdir(parents=True, exist_ok=True)
        subprocess.run(["umount", str(self.mount)], capture_output=True)
        self.image.unlink(missing_ok=True)
        run(["truncate", "-s", str(size), str(self.image)])
        self.device = run(["losetup", "-f", "--show", str(self.image)]).strip()
        # ext4 with an inode per 4 KiB: room for the 500,000-file scaling tree.
        mkfs = {"btrfs": ["mkfs.btrfs", "-q", "-f"], "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], "ext4": ["mkfs.ext4", "-q", "-F", "-i", "4096"]}[kind]
        run([*mkfs, self.device])
        run(["mount", self.device, str(self.mount)])

    def close(self):
        subprocess.run(["umount", str(self.mount)], capture_output=True)
        subprocess.run(["losetup", "-d", self.device], capture_output=True)
        self.image.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Reporting


TARGETS = {"first": 3.0, "nochange": 5.0, "changed": 5.0, "restore": 2.0}
# Against a repository in object storage (the object storage issue's targets).
OBJECT_TARGETS = {"first": 1.5, "nochange": 5.0, "changed": 3.0, "restore": 2.0}


def table(results):
    lines = []
    for corpus, res in results["corpora"].items():
        info = res["corpus"]
        lines.append(f"\n**{corpus}** — {info['bytes'] / 1e6:.0f} MB in {info['files']} files, median of {results['rounds']} rounds\n")
        tools = list(res["tools"])
        lines.append("| phase | " + " | ".join(tools) + " |")
        lines.append("|---|" + "---|" * len(tools))
        for phase in PHASES:
            cells = []
            for tool in tools:
                p = res["tools"][tool].get(phase)
                if not p:
                    cells.append("")
                    continue
                ratio = f" ({p['speedup_vs_restic']:.2f}×)" if "speedup_vs_restic" in p and tool != "restic" else ""
                cells.append(f"{p['wall_s']:.2f} s{ratio}, {p['rss_mib']:.0f} MiB")
            lines.append(f"| {phase} | " + " | ".join(cells) + " |")
        cells = []
        for tool in tools:
            e = res["tools"][tool]
            if "repo_bytes_first" not in e:
                continue
            ratio = f" ({e['repo_vs_restic']:.3f}×)" if "repo_vs_restic" in e and tool != "restic" else ""
            cells.append(f"{e['repo_bytes_first'] / 1e6:.1f} MB{ratio} / {e['repo_bytes_final'] / 1e6:.1f} MB")
        if cells:
            lines.append("| repository (first / after 3 backups) | " + " | ".join(cells) + " |")
    if results.get("scaling"):
        curves = results["scaling"]["curves"]
        lines.append("\n**scaling** — generated small files, one round each\n")
        lines.append("| tool | phase | " + " | ".join(f"{p['files']} files" for p in next(iter(curves.values()))["first"]) + " |")
        lines.append("|---|---|" + "---|" * len(next(iter(curves.values()))["first"]))
        for tool, phases in curves.items():
            for phase, points in phases.items():
                cells = [f"{p['wall_s']:.2f} s ({p['us_per_file']:.0f} µs/file), {p['rss_mib']:.0f} MiB" for p in points]
                lines.append(f"| {tool} | {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def targets(results):
    """Each target of issue 6, met or not, at its worst over the corpora (and, for memory, the
    scaling run): the corpus that sets each figure is named."""
    corpora = {name: res["tools"] for name, res in results["corpora"].items()
               if "restic" in res["tools"] and "sysstate" in res["tools"]}
    if not corpora:
        return []
    out = []

    def worst(values):
        """(value, corpus) of the lowest value."""
        return min(values, key=lambda v: v[0])

    for phase, target in (TARGETS if results.get("store", "local") == "local" else OBJECT_TARGETS).items():
        got, where = worst((tools["sysstate"][phase]["speedup_vs_restic"], name) for name, tools in corpora.items())
        out.append((f"{phase}: ≥ {target:g}× restic", f"{got:.2f}× ({where})", got >= target))
    with_rustic = {name: tools for name, tools in corpora.items() if "rustic" in tools}
    if with_rustic:
        got, where = worst((tools["rustic"]["restore"]["wall_s"] / tools["sysstate"]["restore"]["wall_s"], name)
                           for name, tools in with_rustic.items())
        out.append(("restore: faster than rustic", f"{got:.2f}× ({where})", got > 1.0))
    rss = [(tools["sysstate"][p]["rss_vs_restic"], f"{name} {p}") for name, tools in corpora.items() for p in PHASES
           if p in tools["sysstate"] and "rss_vs_restic" in tools["sysstate"][p]]
    for count, point in (results.get("scaling") or {}).get("points", {}).items():
        tools = point["tools"]
        if "restic" in tools:
            rss += [(tools["sysstate"][p]["rss_vs_restic"], f"{count} files {p}") for p in tools["sysstate"]]
    got, where = max(rss, key=lambda v: v[0])
    out.append(("peak memory ≤ restic's in every phase", f"worst {got:.2f}× restic's ({where})", got <= 1.0))
    sized = [(tools["sysstate"]["repo_vs_restic"], name) for name, tools in corpora.items() if "repo_vs_restic" in tools["sysstate"]]
    if sized:
        got, where = max(sized, key=lambda v: abs(v[0] - 1))
        out.append(("repository within 5% of restic's", f"{got:.3f}× ({where})", abs(got - 1) <= 0.05))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/sysstate-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--corpus", action="append", choices=list(CORPORA), help="(repeat) default: all")
    parser.add_argument("--tool", action="append", choices=TOOLS, help="(repeat) default: all")
    parser.add_argument("--scale", type=float, default=1.0, help="corpus size factor")
    parser.add_argument("--scaling", default="50000,150000,500000", help="file counts of the scaling run ('' for none)")
    parser.add_argument("--scaling-tool", action="append", choices=TOOLS, help="(repeat) default: sysstate, restic")
    parser.add_argument("--fs", default="btrfs", choices=["btrfs", "xfs", "ext4"], help="the corpora's filesystem")
    parser.add_argument("--store", default="local", choices=["local", "s3", "azure"],
                        help="where repositories live: local disk, Garage or Azurite (scripts/services.sh)")
    parser.add_argument("--sysstate", type=Path, help="a sysstate binary (default: build target/release/sysstate)")
    parser.add_argument("--out", type=Path, help="the JSON report (default: WORK/results.json)")
    parser.add_argument("--update-docs", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the harness (CI)")
    parser.add_argument("--vault", action="store_true",
                        help="the vault's benchmark instead (bench/vault.py): replication and restore through a vault on Garage")
    parser.add_argument("--report", type=Path, metavar="JSON", help="only print (and with --update-docs write) the report of an earlier run")
    args = parser.parse_args()
    if args.report:
        results = json.loads(args.report.read_text())
        report = full_report(results)
        print(report)
        if args.update_docs:
            update_docs(results, report)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench/run mounts a loop filesystem and installs the peers: run it as root")
    if args.vault:
        import vault

        if args.smoke:
            args.rounds, args.scale = 1, 0.01
        _, report = vault.run_vault(args, args.sysstate or build_sysstate())
        if args.update_docs:
            update_docs_section("vault", report)
        return
    if args.smoke:
        args.rounds, args.scale, args.scaling = 1, 0.01, "2000"
        args.corpus = args.corpus or ["large"]
        args.tool = args.tool or ["sysstate", "restic"]
        args.scaling_tool = ["sysstate", "restic"]
    store = Store(args.store, args.work)
    names = args.tool or TOOLS
    names = ["sysstate"] + [n for n in names if n != "sysstate"]
    skipped = [n for n in names if not store.supports(n)]
    if skipped:
        log(f"not on {args.store}: {', '.join(skipped)} (cannot reach it)")
        names = [n for n in names if store.supports(n)]
    install_peers(set(names) | set(args.scaling_tool or []))
    binary = args.sysstate or build_sysstate()

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or work / "results.json"
    fs = LoopFs(work / f"corpora.{args.fs}.img", work / "corpora", args.fs, "12G" if not args.smoke else "1G")
    try:

        def tools_for(selected):
            made = []
            for n in selected:
                tool_work = work / "tools" / n
                if n == "sysstate":
                    made.append(Sysstate(tool_work, str(binary), fs.mount))
                else:
                    made.append({"restic": Restic, "rustic": Rustic, "borg": Borg}[n](tool_work, shutil.which(n)))
            return made

        tools = tools_for(names)
        results = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["bench/run", *sys.argv[1:]]),
            "machine": machine_info(args.fs),
            "store": args.store,
            "versions": {t.name: t.version() for t in tools},
            "rounds": args.rounds,
            "corpora": {},
        }
        for name in args.corpus or list(CORPORA):
            corpus = fs.mount / name / "data"
            log(f"building the {name} corpus")
            CORPORA[name](corpus, args.scale)
            results["corpora"][name] = run_corpus(name, corpus, tools, args.rounds, work, store)
            shutil.rmtree(corpus.parent)
            out.write_text(json.dumps(results, indent=2) + "\n")  # what is measured is kept
        counts = [int(c) for c in args.scaling.split(",") if c]
        if counts:
            scaling_tools = tools_for(["sysstate"] + [n for n in (args.scaling_tool or ["restic"]) if n != "sysstate"])
            results["scaling"] = run_scaling(scaling_tools, counts, work, fs.mount)
    finally:
        fs.close()

    out.write_text(json.dumps(results, indent=2) + "\n")
    report = full_report(results)
    print(report)
    log(f"JSON: {out}")
    if args.update_docs:
        update_docs(results, report)


def full_report(results):
    """The tables and the targets, as Markdown."""
    report = table(results)
    checks = targets(results)
    if checks:
        report += "\n| target | measured | met |\n|---|---|---|\n" + "".join(
            f"| {what} | {got} | {'yes' if ok else '**no**'} |\n" for what, got, ok in checks
        )
    return report


def update_docs_section(name, report):
    """Writes `report` between `<!-- NAME: begin -->` and `<!-- NAME: end -->` in docs/benchmarks.md."""
    docs = REPO_ROOT / "docs" / "benchmarks.md"
    before, rest = docs.read_text().split(f"<!-- {name}: begin -->", 1)
    _, after = rest.split(f"<!-- {name}: end -->", 1)
    docs.write_text(f"{before}<!-- {name}: begin -->\n{report}<!-- {name}: end -->{after}")
    log(f"updated {docs}")


def update_docs(results, report):
    docs = REPO_ROOT / "docs" / "benchmarks.md"
    text = docs.read_text()
    begin, end = "<!-- results: begin -->", "<!-- results: end -->"
    m = results["machine"]
    header = (
        f"Run on {results['date'][:10]} with `{results['command']}` on {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB, {m['os']}, Linux {m['kernel']}; corpora on {m['corpus_filesystem']}, "
        f"repositories on {m['repository_filesystem'] if results.get('store', 'local') == 'local' else results['store'] + ' (127.0.0.1)'}. Versions: "
        + "; ".join(f"{k} `{v}`" for k, v in results["versions"].items())
        + ".\nEach cell: median wall time (speed-up over restic), median peak RSS.\n"
    )
    before, rest = text.split(begin, 1)
    _, after = rest.split(end, 1)
    docs.write_text(before + begin + "\n" + header + report + end + after)
    log(f"updated {docs}")


if __name__ == "__main__":
    main()
