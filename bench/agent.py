#!/usr/bin/env python3
"""The idle agent's cost and its API's speed (DESIGN §6, the agent issue's performance part).

    bench/agent.py --sysstate target/release/sysstate [--jobs 100000] [--idle 60] [--requests 1000]

Starts `sysstate agent` in a scratch state folder whose job store holds `--jobs` ended jobs,
lets it idle, and reports:
- its resident memory (VmRSS, VmHWM) after the idle period;
- the CPU it used while idle (every thread's schedstat over `--idle` seconds), scaled to an hour;
- the latency of `GET /v1/jobs` (the newest 50, and filtered by kind and state) and
  `GET /v1/status` over the unix socket, `--requests` each: median and 99th percentile.

A benchmark, not a test: nothing is asserted; the figures go in docs/benchmarks.md.
"""

import argparse
import json
import os
import socket
import sqlite3
import subprocess
import tempfile
import time


def request(path_socket, path):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path_socket)
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n".encode())
    chunks = []
    while True:
        chunk = client.recv(1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    client.close()
    answer = b"".join(chunks)
    status = int(answer.split(b" ", 2)[1])
    if status != 200:
        raise SystemExit(f"{path}: {answer[:300]!r}")
    return answer


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def fill(database, count):
    """`count` ended jobs, a tenth of them failed, over the last 90 days."""
    db = sqlite3.connect(database)
    now = time.time_ns()
    kinds = ["backup", "backup", "backup", "forget", "prune", "check"]
    rows = []
    for n in range(count):
        started = now - (count - n) * 60_000_000_000
        failed = n % 10 == 0
        rows.append((
            f"bench-{n:08d}",
            kinds[n % len(kinds)],
            "failed" if failed else "succeeded",
            1,
            started,
            started + 30_000_000_000,
            "/var/backups/sysstate",
            '["config","boot"]',
            "writer-timeout" if failed else None,
            "writer `db` was frozen 12 s, its window is 10 s" if failed else None,
            "the writer did not thaw in its window" if failed else None,
            "give the writer a longer freeze-timeout" if failed else None,
            1001 if failed else None,
            "schedule",
        ))
    db.executemany(
        "INSERT INTO jobs (id, kind, state, pid, started_ns, ended_ns, target, components, error_code, error_message, "
        "error_cause, error_resolution, error_event_id, trigger) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    db.commit()
    db.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sysstate", required=True)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    binary = os.path.abspath(args.sysstate)
    work = tempfile.mkdtemp(prefix="sysstate-agent-bench-")
    env = dict(os.environ)
    env.update({
        "SYSSTATE_STATE_DIR": f"{work}/state",
        "SYSSTATE_RUNTIME_DIR": f"{work}/run",
        "SYSSTATE_CONFIG": f"{work}/config.toml",
        "SYSSTATE_PASSPHRASE": "bench",
    })
    with open(f"{work}/config.toml", "w") as config:
        # A schedule far away: the agent idles as a deployed one does between runs.
        config.write('[backup]\ntarget = "%s/repo"\n[schedule]\nbackup = ["02:00"]\nprune = "0 4 * * sun"\n' % work)
    # The store's schema, made by the binary itself; then the jobs.
    subprocess.run([binary, "job", "--previous", "1"], env=env, check=True, stdout=subprocess.DEVNULL)
    fill(f"{work}/state/sysstate.db", args.jobs)
    agent = subprocess.Popen([binary, "agent"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        measure(agent, work, args)
    finally:
        agent.kill()
        agent.wait()
        subprocess.run(["rm", "-rf", work])


def measure(agent, work, args):
    sock = f"{work}/run/agent.sock"
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    # Warm: the first requests open the store's pages.
    for _ in range(5):
        request(sock, "/v1/jobs")
    def cpu_seconds():
        # Every thread's time on a CPU, in ns (schedstat), summed: finer than clock ticks.
        total = 0
        for task in os.listdir(f"/proc/{agent.pid}/task"):
            total += int(open(f"/proc/{agent.pid}/task/{task}/schedstat").read().split()[0])
        return total / 1e9

    # The API's blocking threads end 10 s after their last work: let them, so that the threads
    # summed before and after are the same.
    time.sleep(15)
    before = cpu_seconds()
    time.sleep(args.idle)
    idle_cpu = cpu_seconds() - before
    status = {}
    for line in open(f"/proc/{agent.pid}/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            status[key] = int(value.split()[0]) / 1024
    latencies = {}
    for name, path in [
        ("jobs (newest 50)", "/v1/jobs"),
        ("jobs?kind=backup&state=failed", "/v1/jobs?kind=backup&state=failed&limit=50"),
        ("jobs?since=1d", "/v1/jobs?since=1d&limit=1000"),
        ("status", "/v1/status"),
    ]:
        times = []
        for _ in range(args.requests):
            started = time.perf_counter()
            request(sock, path)
            times.append((time.perf_counter() - started) * 1000)
        latencies[name] = {"p50_ms": round(percentile(times, 0.5), 2), "p99_ms": round(percentile(times, 0.99), 2)}
    print(json.dumps({
        "jobs_in_store": args.jobs,
        "idle_seconds": args.idle,
        "rss_mib": round(status.get("VmRSS", 0), 1),
        "peak_rss_mib": round(status.get("VmHWM", 0), 1),
        "idle_cpu_seconds": round(idle_cpu, 6),
        "idle_cpu_seconds_per_hour": round(idle_cpu * 3600 / args.idle, 4),
        "api": latencies,
    }, indent=2))


if __name__ == "__main__":
    main()
