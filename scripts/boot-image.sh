#!/bin/bash
# Builds the small bootable Debian the recovery boot test backs up, recovers and boots:
#   scripts/boot-image.sh IMAGE [uefi|bios]
# uefi (the default): a 2 GiB GPT disk image with an ESP, a swap partition and an ext4 root.
# bios: a 2 GiB DOS-labelled disk image with a swap partition and an ext4 root, GRUB in its MBR.
# Each with a kernel, systemd and GRUB, a user `tester`, a configuration file whose hash the test
# compares, and a unit that prints a marker line on the serial console at boot and powers off.
# No vfat mount is needed (containers often lack the module): the ESP is written with mtools.
# Also writes IMAGE.base.tgz (or SYSSTATE_BOOT_BASE, where two images share it), a debootstrap
# tarball of the same release: the local cache a recovery installs its base system from.
# Runs as root; takes 3-6 minutes with a network mirror. Writes IMAGE only when all of it worked.
set -euo pipefail

image=${1:?usage: boot-image.sh IMAGE [uefi|bios]}
firmware=${2:-uefi}
case $firmware in uefi|bios) ;; *) echo "firmware: uefi or bios, not $firmware" >&2; exit 2;; esac
release=${SYSSTATE_BOOT_RELEASE:-bookworm}
mirror=${SYSSTATE_MIRROR:-http://deb.debian.org/debian}
work=$(mktemp -d /var/tmp/sysstate-boot-image.XXXXXX)
root=$work/root
loop=

cleanup() {
  set +e
  for m in dev/pts dev proc sys; do umount "$root/$m" 2>/dev/null; done
  umount "$root" 2>/dev/null
  [ -n "$loop" ] && { partx -d "$loop" 2>/dev/null; losetup -d "$loop"; }
  rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT TERM

# Fixed identifiers, so a run of the test can be compared with another.
esp_id=5A5E1D01
swap_uuid=0b1c3a55-5e55-4a7e-9d0c-5a5e1d000002
root_uuid=0b1c3a55-5e55-4a7e-9d0c-5a5e1d000003

truncate -s 2G "$work/disk.img"
if [ "$firmware" = uefi ]; then
  sfdisk --quiet "$work/disk.img" <<EOF
label: gpt
label-id: 0B1C3A55-5E55-4A7E-9D0C-5A5E1D000000
size=64MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system", uuid=0B1C3A55-5E55-4A7E-9D0C-5A5E1D0000E1
size=64MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name="swap", uuid=0B1C3A55-5E55-4A7E-9D0C-5A5E1D0000E2
type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root", uuid=0B1C3A55-5E55-4A7E-9D0C-5A5E1D0000E3
EOF
  swap_part=p2 root_part=p3
else
  sfdisk --quiet "$work/disk.img" <<EOF
label: dos
label-id: 0x5a5e1d00
size=64MiB, type=82
type=83, bootable
EOF
  swap_part=p1 root_part=p2
fi
loop=$(losetup --find --show "$work/disk.img")
partx -a "$loop" 2>/dev/null || true
if [ "$firmware" = uefi ]; then mkfs.vfat -F 32 -i "$esp_id" -n ESP "${loop}p1" >/dev/null; fi
mkswap -U "$swap_uuid" -L swap "${loop}${swap_part}" >/dev/null
mkfs.ext4 -q -U "$root_uuid" -L root "${loop}${root_part}"
mkdir "$root"
mount "${loop}${root_part}" "$root"

# The base system for recoveries, then the image's own system.
base=${SYSSTATE_BOOT_BASE:-$image.base.tgz}
if [ ! -e "$base" ]; then
  debootstrap --variant=minbase --make-tarball="$work/base.tgz" "$release" "$work/tarball" "$mirror" >/dev/null
  mv "$work/base.tgz" "$base"
fi
debootstrap --variant=minbase --unpack-tarball="$base" "$release" "$root" "$mirror" >/dev/null

mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
echo "deb $mirror $release main" >"$root/etc/apt/sources.list"
in_root() { chroot "$root" env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
in_root apt-get update -qq
grub=grub-efi-amd64-bin
if [ "$firmware" = bios ]; then grub=grub-pc-bin; fi
in_root apt-get install -y -qq --no-install-recommends \
  systemd-sysv udev kmod linux-image-amd64 initramfs-tools "$grub" grub2-common \
  dosfstools e2fsprogs passwd >/dev/null

{
  echo "UUID=$root_uuid / ext4 errors=remount-ro 0 1"
  if [ "$firmware" = uefi ]; then echo "UUID=${esp_id:0:4}-${esp_id:4:4} /boot/efi vfat umask=0077,nofail 0 1"; fi
  echo "UUID=$swap_uuid none swap sw 0 0"
} >"$root/etc/fstab"
echo sysstate-original >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tsysstate-original\n' >"$root/etc/hosts"
in_root useradd --create-home --shell /bin/bash --comment "Recovery test" tester
echo 'tester:recovered' | in_root chpasswd
printf 'setting = kept by sysstate\nanother = %s\n' "$(date -u +%FT%TZ)" >"$root/etc/sysstate-test.conf"
mkdir -p "$root/boot/efi"
# The marker: what the test compares between the original and the recovered machine.
cat >"$root/etc/systemd/system/sysstate-marker.service" <<'EOF'
[Unit]
Description=Print what the recovery boot test compares, then power off
After=local-fs.target
RequiresMountsFor=/boot/efi
[Service]
Type=oneshot
StandardOutput=tty
TTYPath=/dev/ttyS0
ExecStart=/bin/sh -c 'echo "SYSSTATE-MARKER host=$(cat /etc/hostname) account=$(getent passwd tester | cut -d: -f1,3,5 | tr " " _) config=$(sha256sum /etc/sysstate-test.conf | cut -c1-64) packages=$(dpkg-query -W -f "\\${db:Status-Abbrev}\\n" | grep -c "^ii") swap=$(swapon --show=UUID --noheadings | tr -d " ") efi=$(findmnt -n -o FSTYPE,UUID /boot/efi | tr -s " " :) end"'
ExecStartPost=/bin/systemctl --no-block poweroff
[Install]
WantedBy=multi-user.target
EOF
in_root systemctl enable sysstate-marker.service >/dev/null 2>&1
# No getty on the console the marker writes to; nothing waits for a network.
in_root systemctl mask serial-getty@ttyS0.service >/dev/null 2>&1

# GRUB: for UEFI as `grub-install --removable` lays it out, without mounting the ESP; for BIOS
# in the MBR. (/etc/default/grub comes with grub-efi-amd64 or grub-pc, whose postinsts want more
# than a chroot has: written here.)
cat >"$root/etc/default/grub" <<'EOF'
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`
GRUB_CMDLINE_LINUX_DEFAULT="console=ttyS0,115200"
GRUB_CMDLINE_LINUX=""
GRUB_TERMINAL=console
EOF
in_root update-initramfs -u -k all >/dev/null
# grub-mkconfig writes root=UUID= only when /dev/disk/by-uuid names the root: without udev, link it.
made_link=
if [ ! -e "/dev/disk/by-uuid/$root_uuid" ]; then
  mkdir -p /dev/disk/by-uuid
  ln -s "${loop}${root_part}" "/dev/disk/by-uuid/$root_uuid"
  made_link=/dev/disk/by-uuid/$root_uuid
fi
mkdir -p "$root/boot/grub"
in_root update-grub >/dev/null 2>&1 || in_root update-grub
[ -n "$made_link" ] && rm -f "$made_link"
grep -q "root=UUID=$root_uuid" "$root/boot/grub/grub.cfg" || { echo "grub.cfg does not name the root by UUID" >&2; exit 1; }
if [ "$firmware" = uefi ]; then
  mkdir -p "$root/boot/grub/x86_64-efi"
  cp "$root"/usr/lib/grub/x86_64-efi/*.mod "$root"/usr/lib/grub/x86_64-efi/*.lst "$root/boot/grub/x86_64-efi/"
  cat >"$work/early.cfg" <<EOF
search --no-floppy --fs-uuid --set=root $root_uuid
set prefix=(\$root)/boot/grub
configfile \$prefix/grub.cfg
EOF
  cp "$work/early.cfg" "$root/tmp/early.cfg"
  in_root grub-mkimage -O x86_64-efi -o /tmp/BOOTX64.EFI -c /tmp/early.cfg -p /boot/grub \
    part_gpt part_msdos fat ext2 search search_fs_uuid normal configfile linux echo test gzio all_video efi_gop
  mmd -i "${loop}p1" ::/EFI ::/EFI/BOOT
  mcopy -i "${loop}p1" "$root/tmp/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
  rm -f "$root/tmp/BOOTX64.EFI" "$root/tmp/early.cfg"
else
  in_root grub-install --target=i386-pc "$loop"
fi
in_root apt-get clean

for m in dev/pts dev proc sys; do umount "$root/$m"; done
# Give the blocks apt downloaded into and deleted back to the image file (a loop device turns a
# discard into a hole): about 600 MB less on the disk of the machine that caches the image.
fstrim "$root" || true
umount "$root"
partx -d "$loop" 2>/dev/null || true
losetup -d "$loop"
loop=
mv "$work/disk.img" "$image"
