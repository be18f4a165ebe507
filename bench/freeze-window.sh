#!/bin/bash
# The freeze window (first freeze to last thaw) of a system-sized component set with the
# reflink (XFS), btrfs or copy (ext4) provider: copies /etc, /boot, /var/lib/dpkg and /var/lib/apt onto a loop
# filesystem and backs it up four times (the first makes the base copy). Needs root. With a file
# count, a tree of that many small files (100 per folder) is added: the safety issue's ext4 case
# is 50,000.
#   bench/freeze-window.sh xfs|btrfs|ext4 [FILES]
set -e
kind=${1:?usage: bench/freeze-window.sh xfs|btrfs|ext4 [FILES]}
files=${2:-0}
sysstate=${SYSSTATE_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/sysstate}
base=/tmp/fw-$kind; umount $base/mnt 2>/dev/null || true; rm -rf $base; mkdir -p $base/mnt
truncate -s 2G $base/img; dev=$(losetup -f --show $base/img)
case $kind in
    xfs) mkfs.xfs -q -f -m reflink=1 $dev ;;
    btrfs) mkfs.btrfs -q -f $dev ;;
    ext4) mkfs.ext4 -q -F $dev ;;
    *) echo "usage: bench/freeze-window.sh xfs|btrfs|ext4" >&2; exit 2 ;;
esac
mount $dev $base/mnt; mkdir -p $base/mnt/root/var/lib $base/mnt/root/var/spool
cp -a /etc /boot $base/mnt/root/; cp -a /var/lib/dpkg /var/lib/apt $base/mnt/root/var/lib/ 2>/dev/null || true
if [ "$files" -gt 0 ]; then
    python3 - "$base/mnt/root/var/lib/bulk" "$files" <<'PY'
import os, sys
top, count = sys.argv[1], int(sys.argv[2])
for i in range(count):
    folder = os.path.join(top, f"d{i // 100}")
    if i % 100 == 0:
        os.makedirs(folder)
    with open(os.path.join(folder, f"f{i}"), "w") as f:
        f.write(f"file {i}\n" * (1 + i % 50))
PY
fi
# A system's files were not all written a moment ago: copies of entries changed less than two
# seconds before are not trusted, and would all be copied again in the freeze.
sleep 3
printf '[shadow]\nprovider = "auto"\n[[shadow.storage]]\nfor = "%s"\non = "%s"\nmax-size = "50%%"\n[[writer]]\nname = "noop"\nkind = "command"\nfreeze = ["true"]\nthaw = ["true"]\n' $base/mnt $base/mnt/shadow > $base/c.toml
export SYSSTATE_CONFIG=$base/c.toml SYSSTATE_STATE_DIR=$base/st SYSSTATE_RUNTIME_DIR=$base/run SYSSTATE_PASSPHRASE=x
[ "$files" -gt 0 ] && printf '[[component]]\nname = "bulk"\npaths = ["/var/lib/bulk"]\n' >> $base/c.toml
for i in 1 2 3 4; do "$sysstate" backup --root $base/mnt/root --target $base/repo -q; done
"$sysstate" versions --target $base/repo --json | python3 -c "
import sys,json
for v in json.load(sys.stdin):
    s=v['shadow']; c=s['copies'][0]
    how=c.get('read','?') + (' (%d folders named)' % c['dirs-looked-at'] if 'dirs-looked-at' in c else '') + (': ' + c['walked-because'] if 'walked-because' in c else '')
    print('$kind: %d files, %s: freeze window %d ms, commit %d ms, %d entries copied, read by %s' % (v['stats']['files'], list(s['providers'].values()), s['freeze-window-ms'], s['commit-ms'], s['files'], how))"
umount $base/mnt; losetup -d $dev
