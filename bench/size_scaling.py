# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The same tree into 1, 4 and 16 GiB images: assembly time should not grow with the disk size.

Each run assembles a qcow2 from --tree (disk_image, partition_table, filesystem,
grub_bios_install, image_convert: the functions the modules call, in one Python process)
into a fresh directory; with --direct, the plain ``truncate + sfdisk + mke2fs -d -E offset= +
qemu-img convert`` pipeline runs alongside for comparison. Runs are interleaved
(1G 4G 16G 1G 4G 16G ...), --rounds rounds (default 5); printed: median total and per-step
times per size, the ratio to the smallest size, and what the outputs occupy on disk (the raw
image's allocated bytes and the qcow2's size, which must not grow with the disk either).

    python3 bench/size_scaling.py --tree /var/tmp/out/.work/debian-12/tree
    python3 bench/size_scaling.py --tree TREE --sizes 1GiB,4GiB,16GiB --rounds 5 --direct
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

from _common import tool, parse_size, collections_path, run, MiB

GRUB_DIR = "/usr/lib/grub/i386-pc"

RUNNER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from ansible_collections.osimage.builder.plugins.module_utils._disk_image import ensure_disk_image
from ansible_collections.osimage.builder.plugins.module_utils._partition_table import ensure_partition_table
from ansible_collections.osimage.builder.plugins.module_utils._filesystem import ensure_filesystem
from ansible_collections.osimage.builder.plugins.module_utils._grub_bios_install import install_grub_bios
from ansible_collections.osimage.builder.plugins.module_utils._image_convert import convert_image
raw, qcow2, tree, size, grub_dir = sys.argv[2:7]
steps = {}
def step(name, func, *args, **kwargs):
    started = time.monotonic()
    func(*args, **kwargs)
    steps[name] = time.monotonic() - started
step("disk_image", ensure_disk_image, raw, size, "present")
step("partition_table", ensure_partition_table, raw, "msdos", [{"type": "linux", "bootable": True}])
step("filesystem", ensure_filesystem, raw, 1, "ext4", source=tree, label="root")
step("grub_bios_install", install_grub_bios, raw, 1, grub_dir=grub_dir)
step("image_convert", convert_image, raw, qcow2, "qcow2")
print(json.dumps(steps))
"""


def ours(workdir: str, out: str, tree: str, size: int) -> dict[str, float]:
    started = time.monotonic()
    done = run([sys.executable, "-c", RUNNER, collections_path(workdir), os.path.join(out, "disk.raw"),
                os.path.join(out, "disk.qcow2"), tree, str(size), GRUB_DIR])
    times = json.loads(done.stdout.decode().strip().splitlines()[-1])
    times["total"] = time.monotonic() - started
    return times


def direct(workdir: str, out: str, tree: str, size: int) -> dict[str, float]:  # pylint: disable=unused-argument
    raw, qcow2 = os.path.join(out, "disk.raw"), os.path.join(out, "disk.qcow2")
    times: dict[str, float] = {}
    started = time.monotonic()
    run([tool("truncate"), "-s", str(size), raw])
    run([tool("sfdisk"), "-q", raw], input=b"label: dos\nstart=2048, type=83, bootable\n")
    mark = time.monotonic()
    run([tool("mke2fs"), "-q", "-F", "-t", "ext4", "-L", "root", "-E", "offset=1048576", "-d", tree, raw,
         f"{(size - MiB) // 1024}k"])
    run([tool("sync"), raw])
    times["mke2fs -d"] = time.monotonic() - mark
    mark = time.monotonic()
    run([tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", raw, qcow2])
    run([tool("sync"), qcow2])
    times["qemu-img convert"] = time.monotonic() - mark
    times["total"] = time.monotonic() - started
    return times


def footprint(out: str) -> tuple[float, float]:
    raw, qcow2 = os.path.join(out, "disk.raw"), os.path.join(out, "disk.qcow2")
    return os.stat(raw).st_blocks * 512 / MiB, os.stat(qcow2).st_blocks * 512 / MiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", required=True)
    parser.add_argument("--sizes", default="1GiB,4GiB,16GiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--direct", action="store_true", help="also time the plain mke2fs -d pipeline at each size")
    parser.add_argument("--workdir", default="/var/tmp/osimage-bench-sizes")
    parser.add_argument("--json", help="also write the raw timings here")
    args = parser.parse_args()
    sizes = [text.strip() for text in args.sizes.split(",") if text.strip()]
    variants = [("ours", ours)] + ([("direct", direct)] if args.direct else [])
    os.makedirs(args.workdir, exist_ok=True)
    tree_bytes = int(run(["du", "-sb", args.tree]).stdout.split()[0])
    print(f"tree {args.tree}: {tree_bytes / MiB:.0f} MiB; sizes {' '.join(sizes)}; {args.rounds} rounds; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    space: dict[tuple[str, str], tuple[float, float]] = {}
    for round_number in range(args.rounds):
        for size in sizes:
            for name, func in variants:
                out = os.path.join(args.workdir, f"{name}-{size}")
                if os.path.exists(out):
                    shutil.rmtree(out)
                os.makedirs(out)
                run([tool("sync")])
                times = func(args.workdir, out, args.tree, parse_size(size))
                results.setdefault((name, size), []).append(times)
                space[(name, size)] = footprint(out)
                print(f"round {round_number + 1} {name:6} {size:>6} {times['total']:7.2f} s", flush=True)
    for name, _func in variants:
        for size in sizes:
            shutil.rmtree(os.path.join(args.workdir, f"{name}-{size}"), ignore_errors=True)

    print("\nmedian seconds per size (ratio to the first size), and what the outputs occupy:")
    for name, _func in variants:
        base = statistics.median(r["total"] for r in results[(name, sizes[0])])
        for size in sizes:
            runs = results[(name, size)]
            total = statistics.median(r["total"] for r in runs)
            steps = ", ".join(f"{key} {statistics.median(r[key] for r in runs):.2f}" for key in runs[0] if key != "total")
            raw_mib, qcow2_mib = space[(name, size)]
            print(f"  {name:6} {size:>6} {total:7.2f} s  {total / base:5.2f}x   raw allocated {raw_mib:6.0f} MiB, "
                  f"qcow2 {qcow2_mib:6.0f} MiB   [{steps}]")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({f"{name} {size}": runs for (name, size), runs in results.items()}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
