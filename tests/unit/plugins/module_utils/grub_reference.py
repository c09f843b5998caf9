# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Test helpers: build small images with host tools and run the real ``grub-install`` on them.

Used by test__bootcode.py to compare ``_bootcode`` with GRUB's own output. The
live part needs root and loop devices; everything is detached in ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tempfile
from typing import Dict, List, Optional, Tuple

MIB = 1024 * 1024
GRUB_DIR = "/usr/lib/grub/i386-pc"
BIOS_BOOT_GUID = "21686148-6449-6E6F-744E-656564454649"
LINUX_FS_GUID = "0FC63DAF-8483-4772-8E3D-3D69D8477DE4"
FS_UUID = "0f0e0d0c-0b0a-4908-8706-050403020100"

# GRUB <= 2.06 (osdep/linux/hostdisk.c) runs `udevadm info --query path --name DEV`
# to find a partition's sysfs directory and reads its `start` from there; with
# no udev (containers) it then fails with "cannot find a GRUB drive for
# /dev/loopNp1. Check your device.map." This stand-in prints the sysfs path.
FAKE_UDEVADM = """#!/bin/sh
for last; do :; done
name=$(basename "$(readlink -f "$last")")
p=$(readlink -f "/sys/class/block/$name") || exit 1
[ -e "$p" ] || exit 1
echo "${p#/sys}"
"""


def run(argv: List[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(argv, check=check, **kw)


def make_image(path: str, layout: str, size: int = 64 * MIB) -> Tuple[int, int]:
    """Partition and format ``path``; return (boot partition number, its start sector).

    msdos: one Linux partition at 1 MiB. gpt: bios_grub at LBA 2048 (1 MiB) and
    a Linux partition after it. hybrid: the gpt layout plus ``sgdisk -h 2``.
    """
    with open(path, "wb") as f:
        f.truncate(size)
    if layout == "msdos":
        run(["sfdisk", "-q", path], input="label: dos\nlabel-id: 0x12345678\nstart=2048, type=83\n")
        number, start = 1, 2048
    elif layout in ("gpt", "hybrid"):
        run(["sfdisk", "-q", path], input=(
            "label: gpt\nlabel-id: 11111111-2222-3333-4444-555555555555\n"
            f"start=2048, size=2048, type={BIOS_BOOT_GUID}, name=bios\n"
            f"start=4096, type={LINUX_FS_GUID}, name=root\n"))
        if layout == "hybrid":
            run(["sgdisk", "-h", "2", path])
        number, start = 2, 4096
    else:
        raise ValueError(layout)
    parts = partitions(path)[1]
    sectors = next(p["sectors"] for p in parts if p["number"] == number)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-U", FS_UUID, "-E", f"offset={start * 512}", path, f"{sectors * 512 // 1024}k"])
    return number, start


def partitions(path: str) -> Tuple[str, List[Dict[str, object]]]:
    """(label, partitions) from ``sfdisk --json`` in the shape _bootcode expects."""
    table = json.loads(run(["sfdisk", "--json", path]).stdout)["partitiontable"]
    result = []
    for part in table["partitions"]:
        number = int(re.search(r"(\d+)$", part["node"]).group(1))
        ptype = str(part["type"])
        result.append({"number": number, "type": ptype.upper() if table["label"] == "gpt" else ptype,
                       "start_sector": int(part["start"]), "sectors": int(part["size"])})
    return table["label"], result


def parse_mkimage_line(line: str) -> Tuple[Dict[str, str], List[str]]:
    """Split a ``grub-mkimage --opt 'v' ... 'mod'`` line into ({opt: value}, [modules])."""
    words = shlex.split(line)
    if words and words[0].endswith("grub-mkimage"):
        words = words[1:]
    opts: Dict[str, str] = {}
    mods: List[str] = []
    i = 0
    while i < len(words):
        if words[i].startswith("--"):
            opts[words[i][2:]] = words[i + 1]
            i += 2
        else:
            mods.append(words[i])
            i += 1
    return opts, mods


class _Loop:
    def __init__(self, path: str) -> None:
        self.dev = run(["losetup", "-f", "--show", path]).stdout.strip()
        try:
            run(["partx", "-a", self.dev], check=False)
            base = os.path.basename(self.dev)
            for entry in os.listdir(f"/sys/block/{base}"):
                node = "/dev/" + entry
                if entry.startswith(base + "p") and not os.path.exists(node):
                    with open(f"/sys/block/{base}/{entry}/dev") as f:
                        major, minor = f.read().strip().split(":")
                    run(["mknod", node, "b", major, minor])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        run(["partx", "-d", self.dev], check=False)
        run(["losetup", "-d", self.dev], check=False)


def grub_install(path: str, boot_partition: int, extra_modules: Optional[List[str]] = None) -> Tuple[str, List[int]]:
    """Run ``grub-install -v --target=i386-pc --no-rs-codes`` onto image ``path`` in place.

    Returns grub-install's logged grub-mkimage line and the LBAs it reported
    saving. Needs root. The loop device is always detached.
    """
    with tempfile.TemporaryDirectory(prefix="grubref-") as tmp:
        fakebin = os.path.join(tmp, "bin")
        os.mkdir(fakebin)
        with open(os.path.join(fakebin, "udevadm"), "w") as f:
            f.write(FAKE_UDEVADM)
        os.chmod(os.path.join(fakebin, "udevadm"), 0o755)
        mnt = os.path.join(tmp, "mnt")
        os.mkdir(mnt)
        loop = _Loop(path)
        mounted = False
        try:
            run(["mount", f"{loop.dev}p{boot_partition}", mnt])
            mounted = True
            os.makedirs(os.path.join(mnt, "boot", "grub"))
            # Without it grub-install cannot map the loop device to a BIOS drive.
            with open(os.path.join(mnt, "boot", "grub", "device.map"), "w") as f:
                f.write(f"(hd0) {loop.dev}\n")
            argv = ["grub-install", "-v", "--target=i386-pc", "--no-rs-codes", f"--boot-directory={mnt}/boot"]
            if extra_modules:
                argv.append("--modules=" + " ".join(extra_modules))
            argv.append(loop.dev)
            res = run(argv, env=dict(os.environ, PATH=fakebin + os.pathsep + os.environ.get("PATH", "")), check=False)
            if res.returncode != 0:
                raise RuntimeError(f"grub-install failed ({res.returncode}): {res.stderr[-3000:]}")
            line = next(ln for ln in res.stderr.splitlines() if "grub-mkimage --directory" in ln)
            saved = [int(m) for m in re.findall(r"saving <(\d+),0,512>", res.stderr)]
            return line.split("info: ", 1)[-1], saved
        finally:
            if mounted:
                run(["umount", mnt], check=False)
            loop.close()
