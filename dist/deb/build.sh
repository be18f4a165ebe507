#!/usr/bin/env bash
# Builds the Debian package: the binary, the systemd units, the man page, the shell completions,
# an example configuration and the docs.
#
#   dist/deb/build.sh                 # a release build → target/debian/sysstate_VERSION-1_ARCH.deb
#   dist/deb/build.sh --profile dev   # from the dev build (the tests' quick check)
#
# Needs cargo-deb (`cargo install cargo-deb --locked`).
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=release
if [ "${1:-}" = --profile ]; then profile=$2; fi
case $profile in dev) dir=debug ;; *) dir=$profile ;; esac
cargo build --quiet --profile "$profile" -p sysstate
bin=target/$dir/sysstate
out=target/dist
mkdir -p "$out/completions"
"$bin" man | gzip -9n > "$out/sysstate.8.gz"
"$bin" completions bash > "$out/completions/sysstate"
"$bin" completions zsh > "$out/completions/_sysstate"
"$bin" completions fish > "$out/completions/sysstate.fish"
# The dev build keeps its symbols (stripping 250 MB of them takes longer than the check needs).
strip=(--strip); [ "$profile" = dev ] && strip=(--no-strip)
cargo deb --quiet -p sysstate --no-build --profile "$profile" "${strip[@]}"
ls -1 target/debian/sysstate_*.deb | tail -n 1
