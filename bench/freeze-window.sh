#!/bin/bash
# The freeze window (first freeze to last thaw) of a system-sized component set with the
# reflink (XFS), btrfs or copy (ext4) provider: copies /etc, /boot, /var/lib/dpkg and /var/lib/apt onto a loop
# filesystem and backs it up four times (the first makes the base copy). Needs root. With a file
# count, a tree of that many small files (100 per folder) is added: the safety issue's ext4 case
# is 50,000. `btrfs-volume`: the same tree on a btrfs data volume mounted at /srv of a root on
# this machine's filesystem (ext4 here), with its own shadow storage. PROVIDER=reflink (default
# auto) for what auto took for such a volume before it snapshotted it.
#   bench/freeze-window.sh xfs|btrfs|ext4|btrfs-volume [FILES]
set -e
kind=${1:?usage: bench/freeze-window.sh xfs|btrfs|ext4|btrfs-volume [FILES]}
files=${2:-0}
sysstate=${SYSSTATE_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/sysstate}
base=/tmp/fw-$kind; umount $base/mnt 2>/dev/null || true; rm -rf $base; mkdir -p $base/mnt
truncate -s 2G $base/img; dev=$(losetup -f --show $base/img)
case $kind in
    xfs) mkfs.xfs -q -f -m reflink=1 $dev ;;
    btrfs|btrfs-volume) mkfs.btrfs -q -f $dev ;;
    ext4) mkfs.ext4 -q -F $dev ;;
    *) echo "usage: bench/freeze-window.sh xfs|btrfs|ext4|btrfs-volume" >&2; exit 2 ;;
esac
mount $dev $base/mnt
if [ "$kind" = btrfs-volume ]; then
    # The root on this machine's filesystem, the volume at its /srv; the tree in the volume.
    root=$base/root; volume=$root/srv; tree=$volume
    mkdir -p $volume; mount --bind $base/mnt $volume
else
    root=$base/mnt/root; volume=$base/mnt; tree=$root
fi
mkdir -p $tree/var/lib $tree/var/spool
cp -a /etc /boot $tree/; cp -a /var/lib/dpkg /var/lib/apt $tree/var/lib/ 2>/dev/null || true
if [ "$files" -gt 0 ]; then
    python3 - "$tree/var/lib/bulk" "$files" <<'PY'
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
printf '[shadow]\nprovider = "%s"\n[[shadow.storage]]\nfor = "%s"\non = "%s"\nmax-size = "50%%"\n[[writer]]\nname = "noop"\nkind = "command"\nfreeze = ["true"]\nthaw = ["true"]\n' "${PROVIDER:-auto}" $volume $volume/shadow > $base/c.toml
export SYSSTATE_CONFIG=$base/c.toml SYSSTATE_STATE_DIR=$base/st SYSSTATE_RUNTIME_DIR=$base/run SYSSTATE_PASSPHRASE=x
if [ "$kind" = btrfs-volume ]; then
    printf '[backup]\ncomponents = ["srv"]\n[[component]]\nname = "srv"\npaths = ["/srv/etc", "/srv/boot", "/srv/var"]\n' >> $base/c.toml
else
    [ "$files" -gt 0 ] && printf '[[component]]\nname = "bulk"\npaths = ["/var/lib/bulk"]\n' >> $base/c.toml
fi
for i in 1 2 3 4; do "$sysstate" backup --root $root --target $base/repo -q; done
"$sysstate" versions --target $base/repo --json | python3 -c "
import sys,json
for v in json.load(sys.stdin):
    s=v['shadow']; c=s['copies'][-1]
    how=c.get('read','?') + (' (%d folders named)' % c['dirs-looked-at'] if 'dirs-looked-at' in c else '') + (': ' + c['walked-because'] if 'walked-because' in c else '')
    print('$kind: %d files, %s: copy before the freeze %d ms, freeze window %d ms, commit %d ms, %d entries copied, read by %s' % (v['stats']['files'], list(s['providers'].values()), s.get('precopy-ms', 0), s['freeze-window-ms'], s['commit-ms'], s['files'], how))"
[ "$kind" = btrfs-volume ] && umount $volume
umount $base/mnt; losetup -d $dev
