# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Side-by-side timing of qemu-img convert raw -> qcow2: uncompressed, zlib, zstd.

Every variant converts the same source; each is run --runs times (default 3) and the
median wall time is printed, with the output size, its ratio to the source's allocated
bytes and to the uncompressed qcow2, and whether the runs gave byte-identical outputs.
The time includes the fsync of the output (the module makes the output durable before
renaming it), unless the variant sets a qemu-img cache mode that flushes by itself.

    python3 bench/convert_compression.py --src /var/tmp/disk.raw
    python3 bench/convert_compression.py --tree /usr/share --size 2GiB     # build the source first

--tree builds the source with ``mke2fs -d`` (ext4, no mount, no root needed) in --workdir.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    # name: (extra qemu-img arguments, do we fsync afterwards)
    "none": (["-O", "qcow2"], True),
    "zlib": (["-O", "qcow2", "-c"], True),
    "zstd": (["-O", "qcow2", "-c", "-o", "compression_type=zstd"], True),
    # cache modes of the uncompressed conversion, for the record
    "none -t writeback": (["-O", "qcow2", "-t", "writeback"], False),
    "none -t none": (["-O", "qcow2", "-t", "none"], False),
    "none -m 16": (["-O", "qcow2", "-m", "16"], True),
    # out-of-order writes: faster, but the output differs from run to run
    "zstd -W": (["-O", "qcow2", "-c", "-o", "compression_type=zstd", "-W"], True),
}
DEFAULT_VARIANTS = ["none", "zlib", "zstd"]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(4 * 1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _build_source(tree: str, size: str, workdir: str) -> str:
    path = os.path.join(workdir, "bench-src.raw")
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run(["truncate", "-s", size.replace("iB", ""), path], check=True)
    mke2fs = shutil.which("mke2fs", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or "mke2fs"
    subprocess.run([mke2fs, "-q", "-t", "ext4", "-d", tree, path], check=True)
    return path


def _one_run(qemu_img: str, src: str, out: str, extra: list[str], fsync: bool) -> float:
    if os.path.exists(out):
        os.unlink(out)
    os.sync()
    start = time.monotonic()
    subprocess.run([qemu_img, "convert", "-f", "raw"] + extra + [src, out], check=True)
    if fsync:
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", help="raw source image")
    parser.add_argument("--tree", help="build the raw source from this directory with mke2fs -d")
    parser.add_argument("--size", default="2GiB", help="size of the built source (default 2GiB)")
    parser.add_argument("--workdir", default=None, help="where outputs are written (default: beside --src)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS))
    parser.add_argument("--qemu-img", default=shutil.which("qemu-img") or "qemu-img")
    args = parser.parse_args()
    if not args.src and not args.tree:
        parser.error("give --src or --tree")
    workdir = args.workdir or (os.path.dirname(os.path.abspath(args.src)) if args.src else tempfile.mkdtemp(prefix="convert-bench-"))
    src = args.src or _build_source(args.tree, args.size, workdir)
    st = os.stat(src)
    allocated = st.st_blocks * 512
    version = subprocess.run([args.qemu_img, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    print(f"{version}; source {src}: {st.st_size} bytes, {allocated} allocated; median of {args.runs} runs")
    # Warm the page cache so the first variant is not penalised.
    with open(src, "rb") as handle:
        while handle.read(16 * 1024 * 1024):
            pass
    out = os.path.join(workdir, "bench-out.qcow2")
    rows = []
    for name in args.variants:
        extra, fsync = VARIANTS[name]
        times, digests = [], set()
        for _run in range(args.runs):
            times.append(_one_run(args.qemu_img, src, out, extra, fsync))
            digests.add(_sha256(out))
        rows.append((name, statistics.median(times), min(times), max(times), os.stat(out).st_size, len(digests) == 1))
    os.unlink(out)
    base = next((row[4] for row in rows if row[0] == "none"), None)
    print(f"{'variant':<20} {'median s':>9} {'min':>7} {'max':>7} {'size MB':>9} {'/alloc':>7} {'/none':>7}  identical")
    for name, median, low, high, size, same in rows:
        vs_none = f"{size / base:.3f}" if base else "-"
        print(f"{name:<20} {median:9.2f} {low:7.2f} {high:7.2f} {size / 1e6:9.1f} {size / allocated:7.3f} {vs_none:>7}  {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
