#!/usr/bin/env bash
# A quick side-by-side of sysstate and restic on one tree: first backup, no-change re-backup,
# restore, check --read-data. Prints wall seconds and peak RSS per phase, and repository sizes.
# The full harness (Borg, rustic, rounds, medians, JSON) is issue 6's `bench/`.
#
#   bench/quick.sh CORPUS_DIR [WORK_DIR]
# The corpus is backed up as the `data` component of a fake root: CORPUS_DIR/.. must hold it
# as `data`, or the script makes WORK_DIR/root/data a bind-free symlink-free copy point.
set -euo pipefail
corpus=$(realpath "$1")
work=${2:-/tmp/sysstate-bench}
sysstate=${SYSSTATE_BIN:-$(dirname "$0")/../target/release/sysstate}
rm -rf "$work"; mkdir -p "$work/state"
printf '[[component]]\nname = "data"\npaths = ["/%s"]\n' "$(basename "$corpus")" >"$work/config.toml"
export SYSSTATE_CONFIG=$work/config.toml SYSSTATE_STATE_DIR=$work/state SYSSTATE_PASSPHRASE=bench RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$work/restic-cache
root=$(dirname "$corpus")

measure() { # name, command...
  local name=$1; shift
  # Warm page cache for every tool: in a VM the host caches the disk image too, so cold-cache
  # timings depend on which tool happened to read first.
  sync
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >"$work/$name.out" 2>"$work/$name.err" || { echo "$name failed:"; tail "$work/$name.err"; exit 1; }
  read -r secs rss <"$work/time"
  printf '%-28s %8.2f s %8d MiB\n' "$name" "$secs" "$((rss / 1024))"
}

tar -cf - -C "$root" "$(basename "$corpus")" >/dev/null # warm the page cache for both tools
echo "corpus: $corpus ($(du -sh "$corpus" | cut -f1), $(find "$corpus" -type f | wc -l) files), $(nproc) cores"
restic -r "$work/rs" init >/dev/null
measure "sysstate first backup" "$sysstate" backup --root "$root" --target "$work/ss" --component data --quiet
measure "restic first backup" restic -r "$work/rs" backup --quiet "$corpus" --host bench
measure "sysstate no-change backup" "$sysstate" backup --root "$root" --target "$work/ss" --component data --quiet
measure "restic no-change backup" restic -r "$work/rs" backup --quiet "$corpus" --host bench
measure "sysstate restore" "$sysstate" restore --target "$work/ss" --to "$work/ss-restore" --quiet
measure "restic restore" restic -r "$work/rs" restore latest --target "$work/rs-restore"
measure "sysstate check --read-data" "$sysstate" check --target "$work/ss" --read-data --quiet
measure "restic check --read-data" restic -r "$work/rs" check --read-data
echo "repository size: sysstate $(du -sb "$work/ss" | cut -f1) B, restic $(du -sb "$work/rs" | cut -f1) B"
