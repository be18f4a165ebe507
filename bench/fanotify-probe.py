#!/usr/bin/env python3
"""Which changes to a file's content the kernel announces to a fanotify permission listener
before it makes them (the change-journal issue's item 3: read files live after the freeze and
copy only a file something is about to change before the backup has read it).

Makes a small ext4 on a loop device, marks the whole filesystem (FAN_MARK_FILESYSTEM) with
FAN_PRE_ACCESS (pre-content events, Linux 6.14 and later) or FAN_OPEN_PERM (every Linux), and
from a child process changes a file each way a program can; for each way it prints the events
the listener saw (and answered "allow") before the change was made. Needs root.

    bench/fanotify-probe.py [pre-access|open-perm]
"""
import ctypes
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time

FAN_CLASS_PRE_CONTENT, FAN_CLOEXEC = 0x8, 0x1
FAN_MARK_ADD, FAN_MARK_FILESYSTEM = 0x1, 0x100
MASKS = {"pre-access": 0x00100000, "open-perm": 0x00010000}
FAN_ALLOW = 0x1
INFO_RANGE = 6

libc = ctypes.CDLL(None, use_errno=True)
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]


def listen(group, mount, events):
    """Answers every permission event with "allow", recording (mask, name, range)."""
    while True:
        buffer = os.read(group, 65536)
        offset = 0
        while offset < len(buffer):
            length, _, _, header, mask, fd, _ = struct.unpack_from("IBBHQii", buffer, offset)
            info = buffer[offset + header : offset + length]
            span = struct.unpack_from("QQ", info, 8) if len(info) >= 24 and info[0] == INFO_RANGE else None
            try:
                name = os.readlink(f"/proc/self/fd/{fd}").replace(mount, "")
            except OSError:
                name = "?"
            events.append((hex(mask), name, span))
            os.write(group, struct.pack("iI", fd, FAN_ALLOW))
            os.close(fd)
            offset += length


def ways(mount):
    path = f"{mount}/f"

    def write_at():
        with open(path, "r+b") as f:
            f.seek(100)
            f.write(b"yy")

    def ftruncate():
        with open(path, "r+b") as f:
            os.ftruncate(f.fileno(), 4000)

    def mmap_write():
        with open(path, "r+b") as f:
            mapped = mmap.mmap(f.fileno(), 4000)
            mapped[10:12] = b"zz"
            mapped.flush()
            mapped.close()

    def append():
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"a")
        os.close(fd)

    def punch():
        with open(path, "r+b") as f:
            libc.fallocate(f.fileno(), 3, ctypes.c_long(0), ctypes.c_long(4096))

    def copy_into():
        with open(f"{mount}/src", "wb") as source:
            source.write(b"s" * 8192)
        with open(f"{mount}/src", "rb") as source, open(path, "r+b") as target:
            os.copy_file_range(source.fileno(), target.fileno(), 8192, 0, 0)

    def rename_over():
        with open(f"{mount}/g", "wb") as f:
            f.write(b"g")
        os.rename(f"{mount}/g", path)

    return [
        ("read", lambda: open(path, "rb").read()),
        ("write at an offset", write_at),
        ("truncate by path", lambda: os.truncate(path, 5000)),
        ("ftruncate", ftruncate),
        ("write through a shared mapping", mmap_write),
        ("open with O_TRUNC", lambda: os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))),
        ("append", append),
        ("punch a hole", punch),
        ("copy_file_range into it", copy_into),
        ("rename over it", rename_over),
        ("unlink", lambda: os.unlink(path)),
    ]


def main():
    kind = sys.argv[1] if len(sys.argv) > 1 else "pre-access"
    work = tempfile.mkdtemp(prefix="fanotify-probe-")
    image, mount = f"{work}/img", f"{work}/mnt"
    os.mkdir(mount)
    with open(image, "wb") as f:
        f.truncate(128 << 20)
    device = subprocess.run(["losetup", "-f", "--show", image], capture_output=True, text=True, check=True).stdout.strip()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True)
        subprocess.run(["mount", device, mount], check=True)
        with open(f"{mount}/f", "wb") as f:
            f.write(b"x" * 10000)
        group = libc.fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC, os.O_RDONLY | os.O_LARGEFILE)
        if group < 0 or libc.fanotify_mark(group, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, MASKS[kind], -100, mount.encode()) < 0:
            print(f"{kind}: not available here: {os.strerror(ctypes.get_errno())} (kernel {os.uname().release})")
            return
        events = []
        threading.Thread(target=listen, args=(group, mount, events), daemon=True).start()
        print(f"kernel {os.uname().release}, {kind} on a filesystem mark of ext4:")
        for label, change in ways(mount):
            before = len(events)
            # The change in another process: the listener's own faults would wait for itself.
            child = os.fork()
            if child == 0:
                try:
                    change()
                    os._exit(0)
                except OSError:
                    os._exit(1)
            _, status = os.waitpid(child, 0)
            time.sleep(0.05)
            outcome = "ok" if os.waitstatus_to_exitcode(status) == 0 else "failed"
            print(f"  {label:32} {outcome:6} announced: {events[before:] or 'nothing'}")
    finally:
        subprocess.run(["umount", mount], capture_output=True)
        subprocess.run(["losetup", "-d", device], capture_output=True)
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
