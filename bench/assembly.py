# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Assembly of a bootable qcow2 from an existing tree: the collection against two shell pipelines.

The same work four ways: a sparse raw disk of --size, an MBR table with one bootable Linux
partition at 1 MiB, ext4 filled from --tree, GRUB's BIOS boot code, qcow2 (uncompressed).

  loop          the osbuild-assembler way: truncate + sfdisk, ``losetup --offset --sizelimit`` on
                the partition's range, mkfs.ext4, mount, ``cp -a``, grub-install (through a
                second, whole-disk loop device and a device.map), umount, qemu-img convert
  direct        truncate + sfdisk + ``mke2fs -d -E offset=`` + the collection's boot-code
                step (grub_bios_install's function: grub-mkimage + sector writes, no
                grub-install) + qemu-img convert
  playbook      the collection through ansible-playbook: roles disk (disk_image,
                partition_table, filesystem) and bootloader (install), then image_convert
  module_utils  the same functions the modules call, in one Python process (no Ansible)

Runs are interleaved (loop direct playbook module_utils, loop direct ...), --rounds rounds
(default 5); every variant starts from an empty output directory and ends with its outputs
on disk (fsync), and the medians and their ratios to ``direct`` are printed, with per-step
medians. The page cache is not dropped (the machine is shared); the tree is warm for all.

    python3 bench/assembly.py --tree /var/tmp/out/.work/debian-12/tree
    python3 bench/assembly.py --tree TREE --rounds 5 --size 2GiB --variants direct,playbook

Needs root for ``loop`` (losetup, mount), e2fsprogs, sfdisk, grub-pc-bin, qemu-utils.
ansible-playbook: $ANSIBLE_PLAYBOOK, else the one beside the Python running this, else PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from _common import tool, parse_size, collections_path, ansible_playbook, run, MiB

START_SECTOR = 2048
FS_UUID = "5e0c0ffe-0000-4000-8000-00000000a55e"
GRUB_DIR = "/usr/lib/grub/i386-pc"
VARIANTS = ("loop", "direct", "playbook", "module_utils")

# The collection's steps in one process; prints {step: seconds}.
MODULE_UTILS_RUNNER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from ansible_collections.osimage.builder.plugins.module_utils._disk_image import ensure_disk_image
from ansible_collections.osimage.builder.plugins.module_utils._partition_table import ensure_partition_table
from ansible_collections.osimage.builder.plugins.module_utils._filesystem import ensure_filesystem
from ansible_collections.osimage.builder.plugins.module_utils._grub_bios_install import install_grub_bios
from ansible_collections.osimage.builder.plugins.module_utils._image_convert import convert_image
raw, qcow2, tree, size, uuid, grub_dir = sys.argv[2:8]
steps = {}
def step(name, func, *args, **kwargs):
    started = time.monotonic()
    func(*args, **kwargs)
    steps[name] = time.monotonic() - started
step("disk_image", ensure_disk_image, raw, size, "present")
step("partition_table", ensure_partition_table, raw, "msdos", [{"type": "linux", "bootable": True}])
step("filesystem", ensure_filesystem, raw, 1, "ext4", source=tree, label="root", uuid=uuid)
step("grub_bios_install", install_grub_bios, raw, 1, grub_dir=grub_dir)
step("image_convert", convert_image, raw, qcow2, "qcow2")
print(json.dumps(steps))
"""

# The collection's boot-code step alone, for the direct pipeline.
BOOT_CODE_RUNNER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from ansible_collections.osimage.builder.plugins.module_utils._grub_bios_install import install_grub_bios
install_grub_bios(sys.argv[2], 1, grub_dir=sys.argv[3])
"""

PLAYBOOK = """\
- name: Assemble an image from an existing tree
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Disk, partition table and filesystem
      ansible.builtin.include_role:
        name: osimage.builder.disk
      vars:
        disk_image_path: "{{ raw }}"
        disk_size: "{{ size }}"
        disk_label: msdos
        disk_partitions:
          - {type: linux, bootable: true, fstype: ext4, source: "{{ tree }}", fs_label: root, fs_uuid: "{{ uuid }}"}

    - name: GRUB's boot code
      ansible.builtin.include_role:
        name: osimage.builder.bootloader
        tasks_from: install
      vars:
        bootloader_image: "{{ raw }}"
        bootloader_boot_partition: 1
        bootloader_grub_dir: "{{ grub_dir }}"

    - name: Convert
      osimage.builder.image_convert:
        src: "{{ raw }}"
        dest: "{{ qcow2 }}"
        format: qcow2
"""


class Steps:
    """Wall time per named step."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.started = time.monotonic()

    def __call__(self, name: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        started = time.monotonic()
        try:
            return run(argv, **kwargs)
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.monotonic() - started

    def total(self) -> float:
        return time.monotonic() - self.started


def fsync_files(*paths: str) -> None:
    run([tool("sync")] + list(paths))


def table_script() -> bytes:
    return f"label: dos\nstart={START_SECTOR}, type=83, bootable\n".encode()


def variant_loop(out: str, tree: str, size: int) -> dict[str, float]:
    raw, qcow2, mnt = os.path.join(out, "disk.raw"), os.path.join(out, "disk.qcow2"), os.path.join(out, "mnt")
    os.mkdir(mnt)
    step = Steps()
    step("truncate", [tool("truncate"), "-s", str(size), raw])
    step("sfdisk", [tool("sfdisk"), "-q", raw], input=table_script())
    offset, length = START_SECTOR * 512, size - START_SECTOR * 512
    part_loop = disk_loop = None
    mounted = False
    try:
        part_loop = step("losetup", [tool("losetup"), "-f", "--show", "--offset", str(offset), "--sizelimit", str(length),
                                     raw]).stdout.decode().strip()
        step("mkfs", [tool("mkfs.ext4"), "-q", "-U", FS_UUID, "-L", "root", part_loop])
        step("mount", [tool("mount"), part_loop, mnt])
        mounted = True
        step("cp -a", [tool("cp"), "-a", tree + "/.", mnt + "/"])
        disk_loop = step("losetup", [tool("losetup"), "-f", "--show", raw]).stdout.decode().strip()
        os.makedirs(os.path.join(mnt, "boot", "grub"), exist_ok=True)
        with open(os.path.join(mnt, "boot", "grub", "device.map"), "w", encoding="ascii") as handle:
            handle.write(f"(hd0) {disk_loop}\n")
        step("grub-install", [tool("grub-install"), "--target=i386-pc", "--no-rs-codes", f"--boot-directory={mnt}/boot",
                              disk_loop])
        os.unlink(os.path.join(mnt, "boot", "grub", "device.map"))
        step("umount", [tool("umount"), mnt])
        mounted = False
    finally:
        if mounted:
            run([tool("umount"), mnt])
        for loop in (disk_loop, part_loop):
            if loop:
                step("losetup -d", [tool("losetup"), "-d", loop])
    step("sync raw", [tool("sync"), raw])
    step("qemu-img convert", [tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", raw, qcow2])
    step("sync qcow2", [tool("sync"), qcow2])
    times = dict(step.times)
    times["total"] = step.total()
    return times


def variant_direct(out: str, tree: str, size: int) -> dict[str, float]:
    raw, qcow2 = os.path.join(out, "disk.raw"), os.path.join(out, "disk.qcow2")
    step = Steps()
    step("truncate", [tool("truncate"), "-s", str(size), raw])
    step("sfdisk", [tool("sfdisk"), "-q", raw], input=table_script())
    offset, length = START_SECTOR * 512, size - START_SECTOR * 512
    step("mke2fs -d", [tool("mke2fs"), "-q", "-F", "-t", "ext4", "-U", FS_UUID, "-L", "root", "-E", f"offset={offset}",
                       "-d", tree, raw, f"{length // 1024}k"])
    step("boot code", [sys.executable, "-c", BOOT_CODE_RUNNER, collections_path(os.path.dirname(out)), raw, GRUB_DIR])
    step("sync raw", [tool("sync"), raw])
    step("qemu-img convert", [tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", raw, qcow2])
    step("sync qcow2", [tool("sync"), qcow2])
    times = dict(step.times)
    times["total"] = step.total()
    return times


def variant_playbook(out: str, tree: str, size: int) -> dict[str, float]:
    workdir = os.path.dirname(out)
    playbook = os.path.join(workdir, "assemble.yml")
    if not os.path.exists(playbook):
        with open(playbook, "w", encoding="utf-8") as handle:
            handle.write(PLAYBOOK)
    extra = {"raw": os.path.join(out, "disk.raw"), "qcow2": os.path.join(out, "disk.qcow2"), "tree": tree,
             "size": str(size), "uuid": FS_UUID, "grub_dir": GRUB_DIR}
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections_path(workdir), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false")
    step = Steps()
    done = step("ansible-playbook", [ansible_playbook(), playbook, "-e", json.dumps(extra)], env=env)
    recap = [line for line in done.stdout.decode().splitlines() if "changed=" in line]
    if not recap or "failed=0" not in recap[-1]:
        raise RuntimeError(f"the playbook failed: {done.stdout.decode()[-3000:]}")
    return {"total": step.total()}


def variant_module_utils(out: str, tree: str, size: int) -> dict[str, float]:
    step = Steps()
    done = step("python", [sys.executable, "-c", MODULE_UTILS_RUNNER, collections_path(os.path.dirname(out)),
                           os.path.join(out, "disk.raw"), os.path.join(out, "disk.qcow2"), tree, str(size), FS_UUID,
                           GRUB_DIR])
    times = json.loads(done.stdout.decode().strip().splitlines()[-1])
    times["total"] = step.total()
    return times


RUNNERS = {"loop": variant_loop, "direct": variant_direct, "playbook": variant_playbook,
           "module_utils": variant_module_utils}


def check_output(out: str) -> str:
    """e2fsck of the partition and a look at sector 0: what the variant produced is a real image."""
    raw = os.path.join(out, "disk.raw")
    fsck = subprocess.run([tool("e2fsck"), "-fn", f"{raw}?offset={START_SECTOR * 512}"], capture_output=True, text=True,
                          check=False)
    with open(raw, "rb") as handle:
        sector0 = handle.read(512)
    boot = "GRUB boot.img" if b"GRUB" in sector0 else "no GRUB in sector 0"
    info = json.loads(run([tool("qemu-img"), "info", "--output=json", os.path.join(out, "disk.qcow2")]).stdout)
    return (f"e2fsck rc={fsck.returncode}, {boot}, qcow2 {info['actual-size'] / MiB:.0f} MiB, "
            f"raw allocated {os.stat(raw).st_blocks * 512 / MiB:.0f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", required=True, help="the root tree to put into the image")
    parser.add_argument("--size", default="2GiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", default=os.path.join("/var/tmp", "osimage-bench-assembly"))
    parser.add_argument("--json", help="also write the raw timings here")
    args = parser.parse_args()
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if "loop" in variants and os.geteuid() != 0:
        parser.error("the loop variant needs root (losetup, mount)")
    size = parse_size(args.size)
    os.makedirs(args.workdir, exist_ok=True)
    tree_bytes = int(run(["du", "-sb", args.tree]).stdout.split()[0])
    print(f"tree {args.tree}: {tree_bytes / MiB:.0f} MiB; image {args.size}; {args.rounds} rounds of {' '.join(variants)}; "
          f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for round_number in range(args.rounds):
        for name in variants:
            out = os.path.join(args.workdir, name)
            if os.path.exists(out):
                shutil.rmtree(out)
            os.makedirs(out)
            run([tool("sync")])
            times = RUNNERS[name](out, args.tree, size)
            results[name].append(times)
            note = f"  [{check_output(out)}]" if round_number == 0 else ""
            shutil.rmtree(out)  # big trees make big outputs: keep one at a time
            print(f"round {round_number + 1} {name:13} {times['total']:7.2f} s{note}", flush=True)

    medians = {name: statistics.median(r["total"] for r in runs) for name, runs in results.items()}
    base = medians.get("direct")
    print("\nmedian wall time (s), and ratio to direct:")
    for name in variants:
        runs = [r["total"] for r in results[name]]
        ratio = f"{medians[name] / base:5.2f}x" if base else "   - "
        print(f"  {name:13} {medians[name]:7.2f}  {ratio}   (min {min(runs):.2f}, max {max(runs):.2f})")
    print("\nmedian per step (s):")
    for name in variants:
        steps = [key for key in results[name][0] if key != "total"]
        if steps:
            medians_of_steps = [f"{key} {statistics.median(r.get(key, 0.0) for r in results[name]):.2f}" for key in steps]
            print(f"  {name:13} " + ", ".join(medians_of_steps))
    if base and "playbook" in medians:
        verdict = "met" if medians["playbook"] <= 1.25 * base else "NOT met"
        print(f"\ntarget playbook <= 1.25x direct: {medians['playbook'] / base:.2f}x, {verdict}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"results": results, "medians": medians, "tree_bytes": tree_bytes, "size": size}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
