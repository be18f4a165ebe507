#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine as root: installs what the tests need (Debian
# packages, Azurite from npm, Garage built once with cargo in the background and kept in cargo's
# bin folder), starts the services on 127.0.0.1, then runs formatting and lint checks and every
# test.
#
# SYSSTATE_TEST_REQUIRE=all (set here) makes a test fail, not skip, when root, a loop device or a
# service is missing: CI must run everything. Unset it to run the suite elsewhere; the tests
# that cannot run say why.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
step() { printf '\n==> %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh installs packages and uses loop devices: run it as root" >&2
  exit 2
fi

# The tools cargo builds (Garage takes most of a fresh machine's setup: about 17 minutes on two
# cores) build in the background while the steps below wait on the network and the disk (apt,
# npm, debootstrap, the boot images); the services step waits for them.
tools_log=$(mktemp)
tools_pid=
if ! command -v garage >/dev/null || ! command -v cargo-fuzz >/dev/null || ! command -v cargo-deb >/dev/null; then
  step "Garage, cargo-fuzz and cargo-deb: cargo install in the background (cached in cargo's bin folder; log in $tools_log)"
  (
    command -v garage >/dev/null || cargo install garage --locked --no-default-features --features bundled-libs,lmdb,sqlite
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
    command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
  ) >"$tools_log" 2>&1 &
  tools_pid=$!
  # A step that fails below ends the script: the build in the background ends with it. The trap
  # must not fail itself: under `set -e` a failing command in an EXIT trap becomes the script's
  # exit status (a pkill that found nothing made a fresh machine's run exit 1 after every test
  # passed).
  trap '{ pkill -P "$tools_pid"; kill "$tools_pid"; } 2>/dev/null || true' EXIT
fi

step "Debian packages"
packages=(acl attr libcap2-bin btrfs-progs xfsprogs e2fsprogs cryptsetup-bin debootstrap postgresql util-linux fdisk dosfstools mtools kmod python3 systemd prometheus msmtp curl dpkg-dev nodejs npm)
missing=()
for package in "${packages[@]}"; do
  # The machine's own Node.js and npm stand in for Debian's (asking apt for them beside it only
  # ends in "held broken packages").
  case $package in nodejs|npm) command -v node >/dev/null && command -v npm >/dev/null && continue;; esac
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# QEMU for the recovery boot test, without its recommends: they bring a desktop's worth of
# libraries (GTK, SDL, GStreamer: hundreds of MB of a CI disk) and a qemu-utils that conflicts
# with a backported one already on the machine.
if ! dpkg -s qemu-system-x86 ovmf >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 ovmf >/dev/null
fi

step "Azurite (npm) and the Azure SDK for Python (creates the test container)"
command -v azurite-blob >/dev/null || npm install -g --no-fund --no-audit azurite@3 >/dev/null
python3 -c 'import azure.storage.blob' 2>/dev/null || python3 -m pip install -q azure-storage-blob
step "aiosmtpd (PyPI): the SMTP server the agent's mail goes to"
python3 -c 'import aiosmtpd' 2>/dev/null || python3 -m pip install -q aiosmtpd


step "loop devices"
[ -e /dev/loop-control ] || modprobe loop || true
ls /dev/loop-control

step "a debootstrap minbase Debian for the round-trip test (built once, cached)"
minbase=${SYSSTATE_MINBASE_CACHE:-/var/cache/sysstate-test/minbase-bookworm}
if [ ! -e "$minbase.complete" ]; then
  rm -rf "$minbase"
  mkdir -p "$minbase"
  debootstrap --variant=minbase bookworm "$minbase" http://deb.debian.org/debian >/dev/null
  touch "$minbase.complete"
fi
export SYSSTATE_TEST_MINBASE="$minbase"

step "bootable Debian disk images for the recovery boot tests, UEFI and BIOS (built once, cached; about 2 minutes each)"
boot_image=${SYSSTATE_BOOT_IMAGE_CACHE:-/var/cache/sysstate-test/boot-bookworm.img}
boot_image_bios=${boot_image%.img}-bios.img
mkdir -p "$(dirname "$boot_image")"
for firmware in uefi bios; do
  image=$boot_image
  [ "$firmware" = uefi ] || image=$boot_image_bios
  if [ ! -e "$image" ]; then
    started=$SECONDS
    # Both are made from one debootstrap tarball, the one recoveries install from.
    SYSSTATE_BOOT_BASE="$boot_image.base.tgz" scripts/boot-image.sh "$image" "$firmware"
    echo "built $image in $((SECONDS - started)) s"
  fi
done
export SYSSTATE_TEST_BOOT_IMAGE="$boot_image" SYSSTATE_TEST_BOOT_IMAGE_BIOS="$boot_image_bios"

if [ -n "$tools_pid" ]; then
  step "waiting for the background cargo install of Garage, cargo-fuzz and cargo-deb"
  if ! wait "$tools_pid"; then
    echo "cargo install of Garage, cargo-fuzz or cargo-deb failed; the end of its log:" >&2
    tail -n 60 "$tools_log" >&2
    exit 1
  fi
  echo "built in the background: $(grep -Ec '^ +Installed' "$tools_log") tools"
  trap - EXIT
fi

step "services"
eval "$(scripts/services.sh)"
export SYSSTATE_TEST_REQUIRE=all

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "fuzz targets: build, and run each briefly"
# cargo fuzz wants a nightly toolchain and this machine has only stable: RUSTC_BOOTSTRAP lets the
# stable compiler take its flags. No sanitizer: the decoders are safe Rust, so libFuzzer's
# coverage and our own assertions (round trips, name validation) are what finds bugs here.
(
  cd fuzz
  export RUSTC_BOOTSTRAP=1
  cargo fuzz build -O --sanitizer none
  for target in $(cargo fuzz list); do
    fuzz_log=$(mktemp)
    if ! cargo fuzz run -O --sanitizer none "$target" -- -max_total_time="${SYSSTATE_FUZZ_SECONDS:-15}" >"$fuzz_log" 2>&1; then
      echo "fuzz target $target failed:"; tail -n 40 "$fuzz_log"; exit 1
    fi
    echo "$target: $(grep -E '^Done' "$fuzz_log")"
  done
)
# Nothing after this needs the fuzz build (1.2 GB): a CI disk is better spent on the tests.
rm -rf fuzz/target

step "benchmark harness: a smoke run (checks the harness works; times nothing)"
cargo build --quiet -p sysstate
# A build without the tests' dev-dependencies has no fault injection compiled in.
if grep -q SYSSTATE_FAILPOINT target/debug/sysstate; then
  echo "target/debug/sysstate contains SYSSTATE_FAILPOINT_*: failpoints must only be in test builds" >&2
  exit 1
fi
bench/run --smoke --sysstate target/debug/sysstate --work "${TMPDIR:-/tmp}/sysstate-bench-smoke" >/dev/null
bench/run --vault --smoke --sysstate target/debug/sysstate --work "${TMPDIR:-/tmp}/sysstate-bench-smoke" >/dev/null

step "the Debian package: built by cargo deb, installed into a fresh Debian (a chroot), removed"
dist/deb/test.sh

step "cargo test"
# The disk, before and after: a full disk fails tests far from its cause (the doctor warns of
# low space, writes fail), so the log says how much there was.
df -h / "${TMPDIR:-/tmp}" /var/tmp | awk '!seen[$0]++'
log=$(mktemp)
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s += $1} END {print s + 0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s += $1} END {print s + 0}')
echo
df -h / "${TMPDIR:-/tmp}" /var/tmp | awk '!seen[$0]++'
if [ "$status" != 0 ]; then
  # Where each failed test panicked, at the very end: a CI report that keeps only the end
  # still shows why.
  echo
  echo "why each failed test failed (where it panicked; the whole output is above):"
  awk '/^---- .* stdout ----$/ { name = $2; shown = -1; print "  " name; next }
       /^(failures:|successes:)$/ { name = "" }
       name != "" && shown < 0 && /panicked at/ { shown = 0 }
       name != "" && shown >= 0 && shown < 12 && NF > 0 { print "    " substr($0, 1, 400); shown++ }' "$log"
fi
echo
echo "sysstate: $passed passed, $failed failed"
exit "$status"
