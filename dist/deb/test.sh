#!/usr/bin/env bash
# The Debian package on a fresh Debian: builds it (from the dev build: this checks the package,
# not the optimiser), installs it with dpkg into a copy of the cached debootstrap minbase (a
# chroot: a Debian with nothing else installed), runs it there, removes it with `dpkg -r` and
# checks that nothing of it is left.
#
#   SYSSTATE_TEST_MINBASE=/var/cache/sysstate-test/minbase-bookworm dist/deb/test.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
minbase=${SYSSTATE_TEST_MINBASE:?set SYSSTATE_TEST_MINBASE to a debootstrapped Debian (scripts/test.sh makes one)}
deb=$(dist/deb/build.sh --profile dev | tail -n 1)
echo "package: $deb ($(du -h "$deb" | cut -f1))"
dpkg-deb --info "$deb" | sed -n 's/^ \(Package\|Version\|Depends\|Installed-Size\):/  &/p'

root=$(mktemp -d /tmp/sysstate-deb-test.XXXXXX)
cleanup() { umount "$root/proc" 2>/dev/null || true; rm -rf "$root"; }
trap cleanup EXIT
cp -a "$minbase/." "$root/"
mount -t proc proc "$root/proc"
cp "$deb" "$root/tmp/sysstate.deb"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

in_root dpkg -i /tmp/sysstate.deb
for file in /usr/bin/sysstate /lib/systemd/system/sysstate-agent.service /lib/systemd/system/sysstate-backup.service \
  /lib/systemd/system/sysstate-backup.timer /usr/share/man/man8/sysstate.8.gz \
  /usr/share/bash-completion/completions/sysstate /usr/share/zsh/vendor-completions/_sysstate \
  /usr/share/fish/vendor_completions.d/sysstate.fish /usr/share/doc/sysstate/examples/config.toml \
  /usr/share/doc/sysstate/api.md /usr/share/doc/sysstate/copyright; do
  [ -e "$root$file" ] || fail "the package did not install $file"
done
in_root sysstate --version | grep -q '^sysstate ' || fail "sysstate --version"
in_root sysstate --config /usr/share/doc/sysstate/examples/config.toml config show >/dev/null \
  || fail "the example configuration does not load"
zcat "$root/usr/share/man/man8/sysstate.8.gz" | grep -q 'agent' || fail "the man page does not name the agent"

files=$(in_root dpkg -L sysstate | grep -v '^/\.$')
in_root dpkg -r sysstate
in_root dpkg -s sysstate 2>/dev/null | grep -q '^Status: install ok installed' && fail "still installed after dpkg -r"
for file in $files; do
  # Folders the package shared with others stay, as dpkg leaves them.
  if [ -e "$root$file" ] && [ ! -d "$root$file" ]; then fail "dpkg -r left $file"; fi
done
echo "the package installs, runs and removes cleanly on a fresh Debian"
