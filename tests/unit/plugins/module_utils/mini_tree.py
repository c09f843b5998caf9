# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""A minimal root tree for sandbox tests: the host's static busybox and a few directories.

Needs ``/bin/busybox`` from busybox-static (a dynamically linked busybox would
need the host's libc inside the tree). No network, about 2 MB, a few ms.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import typing as t

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
APPLETS = ("sh", "cat", "ls", "echo", "env", "id", "hostname", "touch", "mkdir", "rm", "sleep", "nc", "wget",
           "grep", "tr", "test", "true", "false", "pwd", "stat", "mknod", "chown", "head", "od", "sed", "wc",
           "readlink", "kill", "ps", "cut", "printf", "ln", "chmod", "mount", "umount", "dd", "find", "xargs")
MACHINE_ID = "0123456789abcdef0123456789abcdef\n"


def static_busybox() -> str | None:
    """The host's busybox when it is statically linked, else None."""
    for path in BUSYBOX_CANDIDATES:
        if not os.path.isfile(path):
            continue
        if not _has_interpreter(path):
            return path
    return None


def _has_interpreter(path: str) -> bool:
    """Whether the 64-bit little-endian ELF file ``path`` names a dynamic loader (a PT_INTERP header)."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            return True  # not what we can check: treat as unusable
        phoff = int.from_bytes(header[32:40], "little")
        phentsize = int.from_bytes(header[54:56], "little")
        phnum = int.from_bytes(header[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(int.from_bytes(table[i * phentsize:i * phentsize + 4], "little") == 3 for i in range(phnum))


def make_tree(path: str, *, api_dirs: bool = True, etc: bool = True, hostname: str | None = "minitree",
              owner: tuple[int, int] | None = None) -> str:
    """Build a tree at ``path``: /bin/busybox plus applet links, and (``api_dirs``) the usual top directories.

    ``api_dirs=False`` leaves out proc, dev, sys, run, tmp, usr/sbin and root,
    ``etc=False`` leaves out /etc: a bare tree in which the sandbox has to create
    (and later remove) its mount points.
    """
    busybox = static_busybox()
    if busybox is None:
        raise RuntimeError("a statically linked busybox is needed (apt-get install busybox-static)")
    os.makedirs(os.path.join(path, "bin"), exist_ok=True)
    shutil.copy2(busybox, os.path.join(path, "bin", "busybox"))
    for applet in APPLETS:
        os.symlink("busybox", os.path.join(path, "bin", applet))
    if api_dirs:
        for name, mode in (("proc", 0o555), ("dev", 0o755), ("sys", 0o555), ("run", 0o755), ("tmp", 0o1777),
                           ("root", 0o700), ("usr", 0o755), ("usr/sbin", 0o755)):
            os.mkdir(os.path.join(path, name))
            os.chmod(os.path.join(path, name), mode)
    if etc:
        os.mkdir(os.path.join(path, "etc"))
        if hostname is not None:
            _write(os.path.join(path, "etc", "hostname"), hostname + "\n")
        _write(os.path.join(path, "etc", "machine-id"), MACHINE_ID, 0o444)
        _write(os.path.join(path, "etc", "passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        _write(os.path.join(path, "etc", "group"), "root:x:0:\n")
    if owner is not None:
        for dirpath, dirnames, filenames in os.walk(path):
            for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                os.lchown(name, *owner)
    return path


def _write(path: str, text: str, mode: int = 0o644) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(text)
    os.chmod(path, mode)


def listing(path: str, mtimes: bool = True) -> dict[str, t.Any]:
    """Everything about a tree a sandbox run might change: per path type, mode, owner, size, content, link target."""
    entries: dict[str, t.Any] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in [""] + sorted(dirnames + filenames):
            full = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(full, path)
            if rel in entries:
                continue
            st = os.lstat(full)
            entry: list[t.Any] = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
            if stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(full))
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    entry.append(hashlib.sha256(f.read()).hexdigest())
            if mtimes:
                entry.append(st.st_mtime_ns)
            entries[rel] = entry
    return entries


def mounts_under(path: str) -> list[str]:
    """Mount points of the host at or below ``path`` (there must be none after a run)."""
    real = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == real or point.startswith(real.rstrip("/") + "/"):
                found.append(point)
    return found
