# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Two builds from scratch, back to back (same mirror state), compared byte by byte.

Runs ``build-image.yml`` twice with the same SOURCE_DATE_EPOCH into two output directories,
compares the raw and the converted images, and when they differ locates every difference:

* which region of the disk (sector 0, the MBR gap with core.img, a partition, the GPT backup);
* inside an ext2/3/4 partition, which filesystem structure (superblock, group descriptors,
  bitmaps, inode table -> which inodes and which inode fields, journal, directory or file
  data -> which paths, through ``debugfs icheck`` / ``ncheck``);
* in the trees themselves: a listing of both trees (type, mode, owner, size, mtime, link
  target, sha256 of contents) and every path that differs, split into "contents differ",
  "only the mtime differs", "only in one tree".

    python3 bench/reproducibility.py --workdir /var/tmp/repro            # build twice, then compare
    python3 bench/reproducibility.py --workdir /var/tmp/repro --compare-only
    python3 bench/reproducibility.py --a DIR_A --b DIR_B                  # compare two existing output dirs
    python3 bench/reproducibility.py --workdir /var/tmp/repro --compare-only --clamp-check

--clamp-check tries the planned fix: it copies both trees, sets every mtime later than
SOURCE_DATE_EPOCH to it, assembles each copy again (the playbook's disk, boot code and
convert steps) and compares those images.

ansible-playbook: $ANSIBLE_PLAYBOOK, else the one beside the Python running this, else PATH.
Needs root (mmdebstrap and bwrap_chroot as the playbook uses them), e2fsprogs and qemu-img.
Writes the report to stdout and, as JSON, to WORKDIR/report.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time

from _common import tool, collections_path, ansible_playbook, REPO

SECTOR = 512
BLOCK_CMP = 4096
NAME = "debian-12"


def build(workdir: str, name: str, epoch: int, extra: list[str]) -> dict:
    out = os.path.join(workdir, name)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(epoch), ANSIBLE_COLLECTIONS_PATH=collections_path(workdir),
               ANSIBLE_NOCOLOR="1")
    argv = [ansible_playbook(), os.path.join(REPO, "build-image.yml"),
            "-e", json.dumps({"osimage_output_dir": out, "osimage_boot_test": False})] + extra
    log = os.path.join(workdir, f"{name}.log")
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run(argv, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"build {name} failed (rc {done.returncode}); see {log}")
    print(f"build {name}: {seconds:.1f} s ({' '.join(argv)}; SOURCE_DATE_EPOCH={epoch})", flush=True)
    return {"dir": out, "seconds": round(seconds, 1), "log": log}


# ----------------------------------------------------------------------------
# Comparing bytes


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(4 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def differing_blocks(path_a: str, path_b: str, block: int = BLOCK_CMP) -> list[tuple[int, int]]:
    """(start, end) byte ranges, in ``block`` units, where the two files differ (what ``cmp -l`` would list)."""
    ranges: list[tuple[int, int]] = []
    size = max(os.path.getsize(path_a), os.path.getsize(path_b))
    chunk = 4 << 20
    with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
        pos = 0
        while pos < size:
            da, db = fa.read(chunk), fb.read(chunk)
            if da != db:
                n = max(len(da), len(db))
                da, db = da.ljust(n, b"\0"), db.ljust(n, b"\0")
                for off in range(0, n, block):
                    if da[off:off + block] != db[off:off + block]:
                        start = pos + off
                        if ranges and ranges[-1][1] == start:
                            ranges[-1] = (ranges[-1][0], start + block)
                        else:
                            ranges.append((start, start + block))
            pos += chunk
    return ranges


def partitions(raw: str) -> tuple[str, list[dict]]:
    table = json.loads(subprocess.run([tool("sfdisk"), "--json", raw], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    parts = []
    for entry in table.get("partitions", []):
        number = int(re.search(r"(\d+)$", entry["node"]).group(1))
        parts.append({"number": number, "start": int(entry["start"]) * SECTOR, "size": int(entry["size"]) * SECTOR,
                      "type": entry.get("type")})
    return table["label"], parts


def region_of(offset: int, label: str, parts: list[dict], disk_size: int) -> str:
    if offset < SECTOR:
        return "sector 0 (boot code, MBR)"
    for part in parts:
        if part["start"] <= offset < part["start"] + part["size"]:
            return f"partition {part['number']}"
    first = min((p["start"] for p in parts), default=disk_size)
    if offset < first:
        return "GPT header/entries or MBR gap (core.img)" if label == "gpt" else "MBR gap (core.img)"
    return "after the last partition (GPT backup)" if label == "gpt" else "after the last partition"


# ----------------------------------------------------------------------------
# Inside an ext filesystem


def ext_layout(raw: str, offset: int) -> dict:
    """Block size, inode size and per-group metadata locations, from dumpe2fs."""
    text = subprocess.run([tool("dumpe2fs"), f"{raw}?offset={offset}"], capture_output=True, text=True,
                          check=False).stdout
    info = {"block_size": 4096, "inode_size": 256, "inodes_per_group": 0, "structures": []}
    for key, name in (("Block size", "block_size"), ("Inode size", "inode_size"), ("Inodes per group", "inodes_per_group")):
        found = re.search(rf"^{key}:\s+(\d+)", text, re.M)
        if found:
            info[name] = int(found.group(1))
    group = None
    for line in text.splitlines():
        found = re.match(r"^Group (\d+):", line)
        if found:
            group = int(found.group(1))
            continue
        if group is None:
            continue
        for what, pattern in (("superblock", r"superblock at (\d+)"),
                              ("group descriptors", r"Group descriptors at (\d+)-(\d+)"),
                              ("reserved GDT blocks", r"Reserved GDT blocks at (\d+)-(\d+)"),
                              ("block bitmap", r"Block bitmap at (\d+)"),
                              ("inode bitmap", r"Inode bitmap at (\d+)"),
                              ("inode table", r"Inode table at (\d+)-(\d+)")):
            for found in re.finditer(pattern, line):
                start = int(found.group(1))
                end = int(found.group(2)) if found.lastindex and found.lastindex > 1 else start
                info["structures"].append((start, end, what, group))
    return info


def structure_of(block: int, layout: dict) -> tuple[str, int | None, int | None]:
    for start, end, what, group in layout["structures"]:
        if start <= block <= end:
            return what, group, start
    return "data", None, None


_INODE_FIELDS = [  # (name, offset, length) of struct ext2_inode / ext4 large inode
    ("mode", 0, 2), ("uid", 2, 2), ("size", 4, 4), ("atime", 8, 4), ("ctime", 12, 4), ("mtime", 16, 4), ("dtime", 20, 4),
    ("gid", 24, 2), ("links", 26, 2), ("blocks", 28, 4), ("flags", 32, 4), ("version", 36, 4), ("block/extents", 40, 60),
    ("generation", 100, 4), ("file_acl", 104, 4), ("size_high", 108, 4), ("faddr", 112, 4), ("osd2", 116, 8),
    ("checksum_lo", 124, 2), ("extra_isize", 128, 2), ("checksum_hi", 130, 2), ("ctime_extra", 132, 4),
    ("mtime_extra", 136, 4), ("atime_extra", 140, 4), ("crtime", 144, 4), ("crtime_extra", 148, 4),
    ("version_hi", 152, 4), ("projid", 156, 4), ("in-inode xattrs", 160, 96),
]


def inode_differences(raw_a: str, raw_b: str, offset: int, layout: dict, ranges: list[tuple[int, int]]) -> dict[int, list[str]]:
    """Inode number -> the fields that differ, for every inode in differing inode-table blocks."""
    block_size, inode_size, per_group = layout["block_size"], layout["inode_size"], layout["inodes_per_group"]
    found: dict[int, list[str]] = {}
    with open(raw_a, "rb") as fa, open(raw_b, "rb") as fb:
        for start, end in ranges:
            for pos in range(start, end, block_size):
                block = (pos - offset) // block_size
                what, group, table_start = structure_of(block, layout)
                if what != "inode table":
                    continue
                fa.seek(pos)
                fb.seek(pos)
                da, db = fa.read(block_size), fb.read(block_size)
                for index in range(block_size // inode_size):
                    ia, ib = da[index * inode_size:(index + 1) * inode_size], db[index * inode_size:(index + 1) * inode_size]
                    if ia == ib:
                        continue
                    number = group * per_group + (block - table_start) * (block_size // inode_size) + index + 1
                    found[number] = [name for name, at, length in _INODE_FIELDS
                                     if at + length <= inode_size and ia[at:at + length] != ib[at:at + length]]
    return found


def debugfs(raw: str, offset: int, request: str) -> str:
    return subprocess.run([tool("debugfs"), "-R", request, f"{raw}?offset={offset}"], capture_output=True, text=True,
                          check=False).stdout


def inode_paths(raw: str, offset: int, inodes: list[int]) -> dict[int, str]:
    paths: dict[int, str] = {}
    for start in range(0, len(inodes), 500):
        batch = inodes[start:start + 500]
        for line in debugfs(raw, offset, "ncheck -c " + " ".join(map(str, batch))).splitlines()[1:]:
            parts = line.split("\t", 1)
            if len(parts) == 2 and parts[0].strip().isdigit():
                paths.setdefault(int(parts[0]), re.sub(r"^/+", "/", parts[1].strip()))
    for number in inodes:
        paths.setdefault(number, {7: "<resize inode>", 8: "<journal>", 2: "/", 11: "/lost+found"}.get(number, "<unlinked>"))
    return paths


def block_owners(raw: str, offset: int, blocks: list[int]) -> dict[int, int | None]:
    owners: dict[int, int | None] = {}
    for start in range(0, len(blocks), 500):
        batch = blocks[start:start + 500]
        for line in debugfs(raw, offset, "icheck " + " ".join(map(str, batch))).splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                owners[int(parts[0])] = int(parts[1]) if parts[1].isdigit() else None
    return owners


def explain_partition(raw_a: str, raw_b: str, part: dict, ranges: list[tuple[int, int]], limit: int) -> dict:
    offset = part["start"]
    kind = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", "-O", str(offset), raw_a], capture_output=True,
                          text=True, check=False).stdout.strip()
    report: dict = {"fstype": kind, "structures": {}, "inodes": {}, "data_paths": {}}
    if not kind.startswith("ext"):
        report["note"] = "not an ext filesystem: only byte ranges are reported"
        return report
    layout = ext_layout(raw_a, offset)
    block_size = layout["block_size"]
    data_blocks = []
    for start, end in ranges:
        for pos in range(start, end, block_size):
            block = (pos - offset) // block_size
            what, _group, _table = structure_of(block, layout)
            if block == 0:
                what = "superblock (group 0)"
            report["structures"][what] = report["structures"].get(what, 0) + 1
            if what == "data":
                data_blocks.append(block)
    inodes = inode_differences(raw_a, raw_b, offset, layout, ranges)
    paths = inode_paths(raw_a, offset, sorted(inodes))
    fields: dict[str, int] = {}
    for number, names in inodes.items():
        key = ",".join(names)
        fields[key] = fields.get(key, 0) + 1
    report["inode_field_sets"] = dict(sorted(fields.items(), key=lambda item: -item[1]))
    report["inodes"] = {paths[number]: inodes[number] for number in sorted(inodes)[:limit]}
    report["inodes_total"] = len(inodes)
    owners = block_owners(raw_a, offset, data_blocks[:20000])
    owner_inodes = sorted({owner for owner in owners.values() if owner})
    owner_paths = inode_paths(raw_a, offset, owner_inodes)
    counts: dict[str, int] = {}
    for block in data_blocks[:20000]:
        owner = owners.get(block)
        name = owner_paths.get(owner, "<free or metadata block>") if owner else "<free or metadata block (extent tree, htree)>"
        counts[name] = counts.get(name, 0) + 1
    report["data_paths"] = dict(sorted(counts.items(), key=lambda item: -item[1])[:limit])
    report["data_blocks_total"] = len(data_blocks)
    return report


# ----------------------------------------------------------------------------
# The trees


def tree_listing(root: str) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, size, mtime_ns, link target, sha256) for every entry, symlinks not followed."""
    entries: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [""] + sorted(dirnames + filenames):
            full = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(full, root)
            if rel in entries:
                continue
            st = os.lstat(full)
            target, digest = "", ""
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                digest = sha256(full)
            entries[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                            st.st_size if not stat.S_ISDIR(st.st_mode) else 0, st.st_mtime_ns, target, digest)
    return entries


def compare_trees(tree_a: str, tree_b: str) -> dict:
    la, lb = tree_listing(tree_a), tree_listing(tree_b)
    only_a = sorted(set(la) - set(lb))
    only_b = sorted(set(lb) - set(la))
    contents, meta, mtime_only = [], [], []
    for path in sorted(set(la) & set(lb)):
        a, b = la[path], lb[path]
        if a == b:
            continue
        if a[7] != b[7] or a[6] != b[6] or a[0] != b[0]:
            contents.append(path)
        elif a[:5] != b[:5]:
            meta.append(path)
        else:
            mtime_only.append((path, a[5] / 1e9, b[5] / 1e9))
    return {"entries": len(la), "only_in_a": only_a, "only_in_b": only_b, "contents_differ": contents,
            "mode_owner_size_differ": meta, "mtime_only": mtime_only}


# ----------------------------------------------------------------------------


def compare(dir_a: str, dir_b: str, limit: int) -> dict:
    work_a, work_b = (os.path.join(d, ".work", NAME) for d in (dir_a, dir_b))
    raw_a, raw_b = os.path.join(work_a, "disk.raw"), os.path.join(work_b, "disk.raw")
    outputs = sorted(name for name in os.listdir(dir_a) if name.startswith(NAME + ".") and not name.endswith(".json"))
    report: dict = {"a": dir_a, "b": dir_b, "files": {}}
    pairs = [("raw", raw_a, raw_b)] + [(name, os.path.join(dir_a, name), os.path.join(dir_b, name)) for name in outputs]
    for label, pa, pb in pairs:
        ha, hb = sha256(pa), sha256(pb)
        report["files"][label] = {"a": ha, "b": hb, "identical": ha == hb}
        print(f"{label:24} {'IDENTICAL' if ha == hb else 'DIFFERENT'}  {ha[:16]}  {hb[:16]}")
    if report["files"]["raw"]["identical"]:
        for name in outputs:
            if not report["files"][name]["identical"]:
                ranges = differing_blocks(os.path.join(dir_a, name), os.path.join(dir_b, name), 512)
                report["files"][name]["ranges"] = ranges[:limit]
                print(f"{name}: the raw images are identical but the conversions differ at {ranges[:limit]}")
        report["tree"] = compare_trees(os.path.join(work_a, "tree"), os.path.join(work_b, "tree"))
        print_tree(report["tree"], limit)
        return report
    label, parts = partitions(raw_a)
    ranges = differing_blocks(raw_a, raw_b)
    regions: dict[str, list[tuple[int, int]]] = {}
    for start, end in ranges:
        regions.setdefault(region_of(start, label, parts, os.path.getsize(raw_a)), []).append((start, end))
    report["regions"] = {name: {"ranges": len(rs), "bytes": sum(e - s for s, e in rs), "first": rs[:5]}
                         for name, rs in regions.items()}
    print(f"\nraw: {len(ranges)} differing ranges, {sum(e - s for s, e in ranges)} bytes (in {BLOCK_CMP}-byte blocks)")
    for name, info in report["regions"].items():
        print(f"  {name}: {info['ranges']} ranges, {info['bytes']} bytes; first {info['first']}")
    report["partitions"] = {}
    for part in parts:
        key = f"partition {part['number']}"
        if key not in regions:
            continue
        detail = explain_partition(raw_a, raw_b, part, regions[key], limit)
        report["partitions"][key] = detail
        print(f"\n{key} ({detail['fstype']}): blocks by structure {detail['structures']}")
        if "inode_field_sets" in detail:
            print(f"  {detail['inodes_total']} inodes differ; which fields (count):")
            for fields, count in detail["inode_field_sets"].items():
                print(f"    {count:6}  {fields}")
            print("  inodes (first ones):")
            for path, fields in list(detail["inodes"].items())[:limit]:
                print(f"    {path}: {', '.join(fields)}")
            print(f"  {detail['data_blocks_total']} data blocks differ; owners:")
            for path, count in detail["data_paths"].items():
                print(f"    {count:6}  {path}")
    report["tree"] = compare_trees(os.path.join(work_a, "tree"), os.path.join(work_b, "tree"))
    print_tree(report["tree"], limit)
    return report


def print_tree(tree: dict, limit: int) -> None:
    print(f"\ntrees: {tree['entries']} entries; {len(tree['contents_differ'])} differ in contents, "
          f"{len(tree['mode_owner_size_differ'])} in mode/owner/size only, {len(tree['mtime_only'])} in mtime only, "
          f"{len(tree['only_in_a'])} only in A, {len(tree['only_in_b'])} only in B")
    for key in ("contents_differ", "mode_owner_size_differ", "only_in_a", "only_in_b"):
        for path in tree[key][:limit]:
            print(f"  {key}: {path}")
    for path, ma, mb in tree["mtime_only"][:limit]:
        print(f"  mtime_only: {path}  {time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(ma))}  "
              f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(mb))}")
    if len(tree["mtime_only"]) > limit:
        dirs: dict[str, int] = {}
        for path, _ma, _mb in tree["mtime_only"]:
            top = "/".join(path.split("/")[:3])
            dirs[top] = dirs.get(top, 0) + 1
        print("  mtime_only by directory: " + ", ".join(f"{k} {v}" for k, v in sorted(dirs.items(), key=lambda i: -i[1])[:25]))


# ----------------------------------------------------------------------------
# The planned fix, tried: clamp the trees' mtimes to SOURCE_DATE_EPOCH, then assemble again

ASSEMBLE = r"""
import sys
sys.path.insert(0, sys.argv[1])
from ansible_collections.osimage.builder.plugins.module_utils._disk_image import ensure_disk_image
from ansible_collections.osimage.builder.plugins.module_utils._partition_table import ensure_partition_table
from ansible_collections.osimage.builder.plugins.module_utils._filesystem import ensure_filesystem
from ansible_collections.osimage.builder.plugins.module_utils._grub_bios_install import install_grub_bios
from ansible_collections.osimage.builder.plugins.module_utils._image_convert import convert_image
raw, tree = sys.argv[2:4]
ensure_disk_image(raw, "2GiB", "present")
ensure_partition_table(raw, "msdos", [{"type": "linux", "bootable": True}], seed=NAME)
ensure_filesystem(raw, 1, "ext4", source=tree, label="root", seed=NAME)
install_grub_bios(raw, 1)
convert_image(raw, raw[:-4] + ".qcow2", "qcow2", seed=NAME)
""".replace("NAME", repr(NAME))


def clamp_mtimes(root: str, epoch: int) -> int:
    """Set every mtime later than ``epoch`` to ``epoch`` (symlinks themselves, not their targets)."""
    count = 0
    limit = epoch * 1_000_000_000
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [""] + dirnames + filenames:
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            if st.st_mtime_ns > limit:
                os.utime(path, ns=(min(st.st_atime_ns, limit), limit), follow_symlinks=False)
                count += 1
    return count


def clamp_check(workdir: str, dir_a: str, dir_b: str, epoch: int) -> dict:
    """Copy both trees, clamp their mtimes, assemble each (the playbook's disk steps), compare."""
    result: dict = {}
    outputs = []
    for name, out in (("a", dir_a), ("b", dir_b)):
        base = os.path.join(workdir, f"clamped-{name}")
        if os.path.exists(base):
            shutil.rmtree(base)
        os.makedirs(base)
        tree = os.path.join(base, "tree")
        subprocess.run(["cp", "-a", os.path.join(out, ".work", NAME, "tree"), tree], check=True)
        result[f"clamped_{name}"] = clamp_mtimes(tree, epoch)
        raw = os.path.join(base, "disk.raw")
        subprocess.run([sys.executable, "-c", ASSEMBLE, collections_path(workdir), raw, tree], check=True,
                       env=dict(os.environ, SOURCE_DATE_EPOCH=str(epoch)))
        outputs.append(raw)
    for label, suffix in (("raw", ".raw"), ("qcow2", ".qcow2")):
        ha, hb = (sha256(path[:-4] + suffix) for path in outputs)
        result[label] = {"a": ha, "b": hb, "identical": ha == hb}
    print(f"\nwith every mtime clamped to SOURCE_DATE_EPOCH={epoch} ({result['clamped_a']} and {result['clamped_b']} "
          f"entries changed) and assembled again: raw {'IDENTICAL' if result['raw']['identical'] else 'DIFFERENT'}, "
          f"qcow2 {'IDENTICAL' if result['qcow2']['identical'] else 'DIFFERENT'}")
    for name in ("a", "b"):
        shutil.rmtree(os.path.join(workdir, f"clamped-{name}"), ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "osimage-repro"))
    parser.add_argument("--epoch", type=int, default=1700000000, help="SOURCE_DATE_EPOCH for both builds")
    parser.add_argument("--compare-only", action="store_true", help="compare WORKDIR/a and WORKDIR/b without building")
    parser.add_argument("--a", help="an existing output directory (with .work/%s)" % NAME)
    parser.add_argument("--b")
    parser.add_argument("--limit", type=int, default=40, help="how many paths/inodes to list per category")
    parser.add_argument("--clamp-check", action="store_true",
                        help="then copy both trees, clamp their mtimes to the epoch, assemble and compare again")
    parser.add_argument("extra", nargs="*", help="more ansible-playbook arguments (after --)")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    builds = {}
    if args.a and args.b:
        dir_a, dir_b = args.a, args.b
    else:
        dir_a, dir_b = os.path.join(args.workdir, "a"), os.path.join(args.workdir, "b")
        if not args.compare_only:
            for name in ("a", "b"):
                builds[name] = build(args.workdir, name, args.epoch, args.extra)
    report = compare(dir_a, dir_b, args.limit)
    report["builds"] = builds
    report["epoch"] = args.epoch
    if args.clamp_check:
        report["clamp_check"] = clamp_check(args.workdir, dir_a, dir_b, args.epoch)
    path = os.path.join(args.workdir, "report.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1, default=str)
    print(f"\nreport: {path}")
    return 0 if all(info["identical"] for info in report["files"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
