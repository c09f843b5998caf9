# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Reliability and security of the image-writing modules, with real tools on small images.

1. Two builds of one spec from one tree, a second apart in different directories, give
   byte-identical raw and qcow2 images.
2. ``filesystem`` killed with SIGKILL at random points (fixed seed): the partition holds the
   old filesystem, nothing, the complete new one, or a partial one its record marks as
   unfinished -- never one the record claims is good; a rerun repairs it without force and
   leaves no temporary files. (image_convert's kill trials and concurrent runs live in
   test__image_convert.py: test_killed_at_random_points_never_leaves_a_partial_dest,
   test_concurrent_runs_take_turns.)
3. A full disk (a 40 MiB tmpfs holds the image directory): filesystem and image_convert fail
   with an error naming the cause and leave no temporary files or half-written outputs.
4. Concurrent filesystem and grub_bios_install runs on one image are serialized by the
   image lock and give the same bytes as one sequential run.
5. Security: devices behind symlinks are refused unless allow_block_device (and char devices
   always); no code under plugins/ hands a string to a shell (checked on the AST).
6. The partition-table parser fed real tables corrupted byte by byte, with and without
   repaired CRCs, and truncated reads: never anything but BuildError.

The tmpfs and the block-device node need root; those tests skip without it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ansible_collections.osimage.builder as collection
from ansible_collections.osimage.builder.plugins.module_utils._disk_image import ensure_disk_image
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._filesystem import ensure_filesystem
from ansible_collections.osimage.builder.plugins.module_utils._grub_bios_install import install_grub_bios
from ansible_collections.osimage.builder.plugins.module_utils._image import Image
from ansible_collections.osimage.builder.plugins.module_utils._image_convert import convert_image, leftovers
from ansible_collections.osimage.builder.plugins.module_utils._partition import (
    GPT_ENTRIES_SECTORS, SECTOR_SIZE, parse, plan_table, serialize,
)
from ansible_collections.osimage.builder.plugins.module_utils._partition_table import ensure_partition_table
from ansible_collections.osimage.builder.plugins.module_utils._state import StateFile, fingerprint, state_path
from ansible_collections.osimage.builder.tests.unit.plugins.module_utils.processes import group_alive

MiB = 1024 * 1024
EPOCH = 1_700_000_000
SEARCH = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin"
GRUB_DIR = "/usr/lib/grub/i386-pc"
PLUGINS = os.path.join(list(collection.__path__)[0], "plugins")
COLLECTIONS_ROOT = os.path.abspath(os.path.join(list(collection.__path__)[0], "..", "..", ".."))

LAYOUTS = {
    "msdos": ("msdos", [{"type": "linux", "bootable": True}], 1),
    "gpt": ("gpt", [{"name": "bios", "type": "bios_grub", "size": "1MiB"}, {"name": "root", "type": "linux"}], 2),
}

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tmpfs mount, device nodes)")


def _tool(name):
    found = shutil.which(name, path=SEARCH)
    if not found:
        pytest.fail(f"{name} is not installed: run scripts/install-system-packages")
    return found


@pytest.fixture(autouse=True)
def _no_source_date_epoch(monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


def _sha(path, offset=0, length=None):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(offset)
        left = os.fstat(handle.fileno()).st_size - offset if length is None else length
        while left > 0:
            chunk = handle.read(min(left, 4 * MiB))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _all_zero(path, offset, length):
    with open(path, "rb") as handle:
        handle.seek(offset)
        while length > 0:
            chunk = handle.read(min(length, 4 * MiB))
            if not chunk:
                return True
            if chunk.count(0) != len(chunk):
                return False
            length -= len(chunk)
    return True


def make_tree(root, variant=0, data_mib=1):
    """A small tree with directories, a symlink, a hard link and ``data_mib`` MiB of pseudo-random data."""
    rng = random.Random(variant)
    os.makedirs(os.path.join(root, "etc"))
    os.makedirs(os.path.join(root, "boot", "grub"))
    os.makedirs(os.path.join(root, "usr", "share", "data"))
    with open(os.path.join(root, "etc", "hostname"), "w", encoding="ascii") as handle:
        handle.write(f"variant{variant}\n")
    with open(os.path.join(root, "boot", "grub", "grub.cfg"), "w", encoding="ascii") as handle:
        handle.write("set timeout=1\n")
    for index in range(max(data_mib, 1) * 2):
        with open(os.path.join(root, "usr", "share", "data", f"blob-{index:03d}.bin"), "wb") as handle:
            handle.write(rng.randbytes(MiB // 2 if data_mib else 4096))
    os.symlink("../etc/hostname", os.path.join(root, "usr", "hostname-link"))
    os.link(os.path.join(root, "etc", "hostname"), os.path.join(root, "etc", "hostname.hard"))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (EPOCH - 7, EPOCH), follow_symlinks=False)
    os.utime(root, (EPOCH - 7, EPOCH))
    return root


def build(directory, tree, layout="msdos", size="96MiB", formats=("qcow2",)):
    """The whole assembly through the module_utils functions; returns the raw image's path."""
    label, parts, boot = LAYOUTS[layout]
    os.makedirs(directory, exist_ok=True)
    raw = os.path.join(directory, "disk.raw")
    ensure_disk_image(raw, size, "present")
    ensure_partition_table(raw, label, parts)
    ensure_filesystem(raw, boot, "ext4", source=tree, label="root")
    install_grub_bios(raw, boot, grub_dir=GRUB_DIR)
    for fmt in formats:
        convert_image(raw, os.path.join(directory, f"disk.{fmt}"), fmt)
    return raw


def _partition_range(image, number):
    with Image(image) as img:
        from ansible_collections.osimage.builder.plugins.module_utils._partition_table import (  # pylint: disable=import-outside-toplevel
            find_partition, read_table,
        )
        part = find_partition(read_table(img), number, "partition")
    return part.start_sector * SECTOR_SIZE, part.sectors * SECTOR_SIZE


def _e2fsck(image, offset):
    return subprocess.run([_tool("e2fsck"), "-fn", f"{image}?offset={offset}"], capture_output=True, text=True, check=False)


def _temp_files(directory):
    """What an interrupted or failed run may leave: temp files, mtools homes, convert temp dirs."""
    return sorted(name for name in os.listdir(directory)
                  if name.endswith(".tmp") or ".osimage-mtools-" in name or ".osimage-convert-" in name)


# ----------------------------------------------------------------------------
# 1. Reproducibility


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_builds_of_one_spec_are_byte_identical(tmp_path, layout):
    for name in ("mke2fs", "qemu-img", "grub-mkimage", "e2fsck"):
        _tool(name)
    tree = make_tree(str(tmp_path / "tree"))
    first = build(str(tmp_path / "a" / "one"), tree, layout)
    time.sleep(1.1)  # the clock must not leak into any byte
    for dirpath, _dirnames, filenames in os.walk(tree):  # reading the tree moves atimes
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as handle:
                handle.read()
    second = build(str(tmp_path / "b" / "elsewhere"), tree, layout)
    assert _sha(first) == _sha(second), "raw images differ"
    assert _sha(first[:-3] + "qcow2") == _sha(second[:-3] + "qcow2"), "qcow2 images differ"
    offset, _size = _partition_range(first, LAYOUTS[layout][2])
    assert _e2fsck(first, offset).returncode == 0


def test_a_copy_of_the_tree_gives_the_same_image(tmp_path):
    """cp -a keeps mtimes but not ctimes or atimes, and moves the tree: none of that may show."""
    for name in ("mke2fs", "qemu-img", "grub-mkimage"):
        _tool(name)
    tree = make_tree(str(tmp_path / "tree"))
    first = build(str(tmp_path / "a"), tree, formats=())
    time.sleep(1.1)
    subprocess.run(["cp", "-a", tree, str(tmp_path / "copy")], check=True)
    second = build(str(tmp_path / "b"), str(tmp_path / "copy"), formats=())
    assert _sha(first) == _sha(second)


# ----------------------------------------------------------------------------
# 2. kill -9 during filesystem

_FS_RUNNER = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from ansible_collections.osimage.builder.plugins.module_utils import _filesystem
if os.environ.get("RELIABILITY_SLOW_INSTALL"):
    real_copy = _filesystem._copy_range
    def slow_copy(src, dst, src_offset, dst_offset, length):
        step = 256 * 1024
        while length > 0:
            real_copy(src, dst, src_offset, dst_offset, min(step, length))
            src_offset += step; dst_offset += step; length -= step
            open(os.environ["RELIABILITY_SLOW_INSTALL"], "a").close()
            import time; time.sleep(0.05)
    _filesystem._copy_range = slow_copy
result = _filesystem.ensure_filesystem(sys.argv[2], int(sys.argv[3]), "ext4", source=sys.argv[4], label="root")
print(result["changed"])
"""


def _start_fs(image, tree, partition=1, env=None):
    child_env = {key: value for key, value in os.environ.items() if key != "SOURCE_DATE_EPOCH"}
    child_env.update(env or {})
    return subprocess.Popen([sys.executable, "-c", _FS_RUNNER, COLLECTIONS_ROOT, image, str(partition), tree],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=child_env)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()
    deadline = time.monotonic() + 30
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _classify(image, offset, size, hashes):
    """What the partition holds after a kill, and check the record never vouches for anything else."""
    now = _sha(image, offset, size)
    record = StateFile(state_path(image)).get(offset // SECTOR_SIZE)
    if now in hashes.values():
        content = next(name for name, value in hashes.items() if value == now)
    elif _all_zero(image, offset, size):
        content = "nothing"
    else:
        content = "partial"
    vouched = record is not None and not record.get("installing") and "fingerprint" in record
    if vouched:
        with Image(image) as img:
            matches = fingerprint(img, offset, size) == record["fingerprint"]
        if matches:
            # The record says "this is the filesystem of tree X and nobody touched it": it must be so.
            assert content == record["tree"], f"the record vouches for tree {record['tree']} but the partition holds {content}"
    if content in ("partial", "nothing"):
        assert record is not None and record.get("installing"), f"{content} partition without an 'installing' record"
    return content, bool(record and record.get("installing"))


@pytest.fixture(name="kill_setup")
def fixture_kill_setup(tmp_path):
    for name in ("mke2fs", "e2fsck"):
        _tool(name)
    trees = [make_tree(str(tmp_path / f"tree{variant}"), variant, data_mib=12) for variant in (0, 1)]
    from ansible_collections.osimage.builder.plugins.module_utils._state import walk_tree  # pylint: disable=import-outside-toplevel
    digests = [walk_tree(tree).digest for tree in trees]
    # Reference bytes of each tree's filesystem, built once each in another directory.
    hashes = {}
    for variant, tree in enumerate(trees):
        ref = str(tmp_path / f"ref{variant}" / "disk.raw")
        os.makedirs(os.path.dirname(ref))
        ensure_disk_image(ref, "64MiB", "present")
        ensure_partition_table(ref, "msdos", [{}])
        ensure_filesystem(ref, 1, "ext4", source=tree, label="root")
        offset, size = _partition_range(ref, 1)
        hashes[digests[variant]] = _sha(ref, offset, size)
    work = tmp_path / "work"
    work.mkdir()
    image = str(work / "disk.raw")
    ensure_disk_image(image, "64MiB", "present")
    ensure_partition_table(image, "msdos", [{}])
    started = time.monotonic()
    ensure_filesystem(image, 1, "ext4", source=trees[0], label="root")
    duration = time.monotonic() - started
    return image, trees, digests, hashes, duration


def _rerun_repairs(image, tree, digest, hashes, offset, size, trial):
    result = ensure_filesystem(image, 1, "ext4", source=tree, label="root")
    assert _sha(image, offset, size) == hashes[digest], f"trial {trial}: the rerun did not rebuild the filesystem"
    assert _e2fsck(image, offset).returncode == 0
    assert _temp_files(os.path.dirname(image)) == [], f"trial {trial}: temporary files left"
    assert not ensure_filesystem(image, 1, "ext4", source=tree, label="root")["changed"]
    return result


def test_filesystem_killed_at_random_points(kill_setup):
    image, trees, digests, hashes, duration = kill_setup
    offset, size = _partition_range(image, 1)
    rng = random.Random(20240607)
    outcomes = []
    for trial in range(10):
        new = (trial + 1) % 2
        proc = _start_fs(image, trees[new])
        time.sleep(rng.uniform(0.0, duration * 1.3 + 0.2))
        _kill_group(proc)
        content, installing = _classify(image, offset, size, hashes)
        label = {digests[new]: "new", digests[1 - new]: "old"}.get(content, content)
        if label == "old":
            assert _e2fsck(image, offset).returncode == 0, f"trial {trial}: the old filesystem is damaged"
        result = _rerun_repairs(image, trees[new], digests[new], hashes, offset, size, trial)
        outcomes.append((label, installing, result["changed"]))
    print("kill outcomes (content, record says installing, rerun changed):", outcomes)
    assert any(changed for _label, _installing, changed in outcomes), "no kill landed before the build finished"


def test_filesystem_killed_while_copying_in(kill_setup, tmp_path):
    """The one window where the partition is half-written: the record must say so, and the rerun needs no force."""
    image, trees, digests, hashes, _duration = kill_setup
    offset, size = _partition_range(image, 1)
    marker = str(tmp_path / "copying")
    proc = _start_fs(image, trees[1], env={"RELIABILITY_SLOW_INSTALL": marker})
    deadline = time.monotonic() + 60
    while not os.path.exists(marker) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.12)
    _kill_group(proc)
    content, installing = _classify(image, offset, size, hashes)
    assert (content, installing) == ("partial", True)
    result = _rerun_repairs(image, trees[1], digests[1], hashes, offset, size, "copy")
    assert result["changed"] and "interrupted" in result["diff"]["before"]


# ----------------------------------------------------------------------------
# 3. A full disk


class _Tmpfs:
    def __init__(self, parent, size="40m"):
        self.path = tempfile.mkdtemp(prefix="tmpfs-", dir=parent)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", self.path], check=True)

    def __enter__(self):
        return self.path

    def __exit__(self, *exc):
        if subprocess.run(["umount", self.path], check=False).returncode != 0:
            subprocess.run(["umount", "-l", self.path], check=False)
        os.rmdir(self.path)


def _fill(path, mib):
    with open(path, "wb") as handle:
        for _index in range(mib):
            handle.write(b"\xa5" * MiB)


@needs_root
def test_full_disk_while_mke2fs_fills_the_tree(tmp_path):
    _tool("mke2fs")
    tree = make_tree(str(tmp_path / "tree"), data_mib=50)
    with _Tmpfs(str(tmp_path)) as mnt:
        image = os.path.join(mnt, "disk.raw")
        ensure_disk_image(image, "128MiB", "present")
        ensure_partition_table(image, "msdos", [{}])
        before = _sha(image)
        with pytest.raises(BuildError) as caught:
            ensure_filesystem(image, 1, "ext4", source=tree)
        assert "No space left on device" in caught.value.message
        assert _sha(image) == before, "the image was changed"
        assert sorted(os.listdir(mnt)) == ["disk.raw"], "temporary files or a record were left"


@needs_root
def test_full_disk_while_copying_into_the_image(tmp_path):
    """The temporary filesystem fits, copying it into the image would not: refused before the partition is touched."""
    _tool("mke2fs")
    tree = make_tree(str(tmp_path / "tree"), data_mib=24)
    with _Tmpfs(str(tmp_path)) as mnt:
        image = os.path.join(mnt, "disk.raw")
        ensure_disk_image(image, "128MiB", "present")
        ensure_partition_table(image, "msdos", [{}])
        with pytest.raises(BuildError) as caught:
            ensure_filesystem(image, 1, "ext4", source=tree)
        assert caught.value.option == "image" and "free" in caught.value.message
        assert _temp_files(mnt) == []
        offset, size = _partition_range(image, 1)
        assert StateFile(state_path(image)).get(offset // SECTOR_SIZE) is None
        with open(image, "rb") as handle:
            handle.seek(offset)
            assert not handle.read(size).strip(b"\0"), "the partition was written although the copy could not fit"
        subprocess.run(["mount", "-o", "remount,size=80m", mnt], check=True)
        again = ensure_filesystem(image, 1, "ext4", source=tree)
        assert again["changed"]
        assert _e2fsck(image, offset).returncode == 0


@needs_root
def test_full_disk_during_image_convert(tmp_path):
    _tool("qemu-img")
    with _Tmpfs(str(tmp_path)) as mnt:
        raw = os.path.join(mnt, "disk.raw")
        with open(raw, "wb") as handle:
            handle.truncate(64 * MiB)
            handle.seek(8 * MiB)
            handle.write(random.Random(5).randbytes(14 * MiB))
        _fill(os.path.join(mnt, "filler"), 18)
        dest = os.path.join(mnt, "disk.qcow2")
        with pytest.raises(BuildError) as caught:
            convert_image(raw, dest, "qcow2")
        assert caught.value.option == "dest" and "No space left on device" in caught.value.message
        assert not os.path.exists(dest)
        assert leftovers(dest) == [] and _temp_files(mnt) == []
        assert not os.path.exists(state_path(dest))
        os.unlink(os.path.join(mnt, "filler"))
        assert convert_image(raw, dest, "qcow2")["changed"]


# ----------------------------------------------------------------------------
# 4. Two runs on one image at once

_CONCURRENT_RUNNER = r"""
import fcntl, json, os, sys, time
sys.path.insert(0, sys.argv[1])
from ansible_collections.osimage.builder.plugins.module_utils import _filesystem, _grub_bios_install, _image
what, image, go, log = sys.argv[2:6]
def logged(name, func):
    def wrapper(*args, **kwargs):
        with open(log, "a") as handle:
            handle.write(f"enter {os.getpid()} {name}\n")
        try:
            return func(*args, **kwargs)
        finally:
            with open(log, "a") as handle:
                handle.write(f"exit {os.getpid()} {name}\n")
    return wrapper
_filesystem.install = logged("filesystem", _filesystem.install)
_image.Image.write_all = logged("write_all", _image.Image.write_all)
real_lock = _image.Image.lock
def timed_lock(self):
    started = time.monotonic()
    real_lock(self)
    with open(log, "a") as handle:
        handle.write(f"lock {os.getpid()} {time.monotonic() - started:.3f}\n")
_image.Image.lock = timed_lock
while not os.path.exists(go):
    time.sleep(0.002)
if what == "filesystem":
    result = _filesystem.ensure_filesystem(image, 1, "ext4", source=sys.argv[6], label="root")
else:
    result = _grub_bios_install.install_grub_bios(image, 1, grub_dir=sys.argv[6])
print(json.dumps({"what": what, "changed": result["changed"]}))
"""


def test_concurrent_runs_are_serialized(tmp_path):
    for name in ("mke2fs", "grub-mkimage", "e2fsck"):
        _tool(name)
    trees = [make_tree(str(tmp_path / f"tree{variant}"), variant, data_mib=8) for variant in (0, 1)]
    reference = str(tmp_path / "ref" / "disk.raw")
    os.makedirs(os.path.dirname(reference))
    ensure_disk_image(reference, "64MiB", "present")
    ensure_partition_table(reference, "msdos", [{"bootable": True}])
    ensure_filesystem(reference, 1, "ext4", source=trees[1], label="root")
    install_grub_bios(reference, 1, grub_dir=GRUB_DIR)

    image = str(tmp_path / "work" / "disk.raw")
    os.makedirs(os.path.dirname(image))
    ensure_disk_image(image, "64MiB", "present")
    ensure_partition_table(image, "msdos", [{"bootable": True}])
    ensure_filesystem(image, 1, "ext4", source=trees[0], label="root")
    go, log = str(tmp_path / "go"), str(tmp_path / "log")
    jobs = [("filesystem", trees[1]), ("grub", GRUB_DIR), ("filesystem", trees[1]), ("grub", GRUB_DIR)]
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_RUNNER, COLLECTIONS_ROOT, what, image, go, log, arg],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for what, arg in jobs]
    time.sleep(0.3)
    open(go, "w", encoding="ascii").close()
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err.decode()
    results = [json.loads(out) for out, _err in outputs]
    assert sorted(r["changed"] for r in results if r["what"] == "filesystem") == [False, True]
    assert sorted(r["changed"] for r in results if r["what"] == "grub") == [False, True]

    with open(log, encoding="ascii") as handle:
        lines = handle.read().split("\n")[:-1]
    waits = [float(line.split()[2]) for line in lines if line.startswith("lock ")]
    assert len(waits) == 4 and max(waits) > 0.02, f"the runs did not contend for the lock: {waits}"
    events = [line for line in lines if not line.startswith("lock ")]
    inside = None
    for event in events:  # writes into the image never overlap
        kind, pid, _name = event.split()
        if kind == "enter":
            assert inside is None, f"{pid} wrote while {inside} was writing: {events}"
            inside = pid
        else:
            assert inside == pid
            inside = None
    assert _sha(image) == _sha(reference), "the image differs from one sequential build"
    with open(image, "rb") as got, open(reference, "rb") as want:
        assert got.read(2048 * SECTOR_SIZE) == want.read(2048 * SECTOR_SIZE)  # sector 0 and core.img in the MBR gap
    assert _e2fsck(image, _partition_range(image, 1)[0]).returncode == 0
    assert _temp_files(os.path.dirname(image)) == []


# ----------------------------------------------------------------------------
# 5. Security: devices and shells


def _a_block_device():
    """A loop device node with nothing attached (reading it reads nothing; nothing here writes to it)."""
    for index in range(8):
        path = f"/dev/loop{index}"
        try:
            with open(f"/sys/block/loop{index}/size", encoding="ascii") as handle:
                attached = handle.read().strip() != "0"
        except OSError:
            continue
        if not attached and os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode):
            return path
    return None


def _writers(path, regular):
    """Every way a module opens an image, with ``path`` as the image (check mode: nothing is written)."""
    return {
        "disk_image": lambda **kw: ensure_disk_image(path, kw.pop("size", "64MiB"), "present", **kw),
        "partition_table": lambda **kw: ensure_partition_table(path, "msdos", [{}], **kw),
        "filesystem": lambda **kw: ensure_filesystem(path, 1, "ext4", **kw),
        "grub_bios_install": lambda **kw: install_grub_bios(path, 1, grub_dir=GRUB_DIR, **kw),
        "image_convert src": lambda **kw: convert_image(path, regular + ".qcow2", "qcow2", **kw),
    }


WRITERS = ["disk_image", "partition_table", "filesystem", "grub_bios_install", "image_convert src"]


@needs_root
@pytest.mark.parametrize("module", WRITERS)
def test_a_symlink_to_a_block_device_is_refused(tmp_path, module):
    device = _a_block_device()
    if device is None:
        pytest.skip("no block device node (e.g. /dev/loop0) on this host")
    link = str(tmp_path / "disk.raw")
    os.symlink(device, link)
    regular = str(tmp_path / "plain.raw")
    with open(regular, "wb") as handle:
        handle.truncate(MiB)
    writers = _writers(link, regular)
    for check_mode in (False, True):
        with pytest.raises(BuildError) as caught:
            writers[module](check_mode=check_mode)
        assert "block device" in caught.value.message and "allow_block_device" in caught.value.message, caught.value
        assert caught.value.option in ("path", "image", "src")
    # Allowed, the same call gets past the device check (check mode, so nothing is written to the device).
    try:
        if module == "disk_image":
            writers[module](size=None, allow_block_device=True, check_mode=True)
        else:
            writers[module](allow_block_device=True, check_mode=True)
    except BuildError as exc:
        assert "allow_block_device" not in exc.message, exc
    assert not os.path.exists(regular + ".qcow2")


@needs_root
def test_image_convert_never_writes_to_a_device(tmp_path):
    device = _a_block_device()
    if device is None:
        pytest.skip("no block device node on this host")
    source = str(tmp_path / "plain.raw")
    with open(source, "wb") as handle:
        handle.truncate(MiB)
    for target in (device, "/dev/null"):
        link = str(tmp_path / f"dest-{os.path.basename(target)}")
        os.symlink(target, link)
        for allow in (False, True):
            with pytest.raises(BuildError, match="not a regular file") as caught:
                convert_image(source, link, "qcow2", allow_block_device=allow)
            assert caught.value.option == "dest"


@pytest.mark.parametrize("module", WRITERS)
def test_a_symlink_to_a_char_device_is_refused_even_when_devices_are_allowed(tmp_path, module):
    link = str(tmp_path / "disk.raw")
    os.symlink("/dev/null", link)
    regular = str(tmp_path / "plain.raw")
    with open(regular, "wb") as handle:
        handle.truncate(MiB)
    for allow in (False, True):
        with pytest.raises(BuildError, match="neither a regular file nor a block device"):
            _writers(link, regular)[module](allow_block_device=allow)


# No user string reaches a shell: checked on the syntax tree of every file under plugins/.

_SUBPROCESS_FUNCS = {"run", "call", "check_call", "check_output", "Popen"}
_ALWAYS_SHELL = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
                 ("asyncio", "create_subprocess_shell"), ("pty", "spawn"), ("commands", "getoutput")}
_SPAWN = {("os", name) for name in ("spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
                                    "spawnvpe", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp",
                                    "execvpe", "posix_spawn", "posix_spawnp")}


def _is_string_expr(node, strings):
    """Whether ``node`` evaluates to a str (literal, f-string, concatenation, %, .format, .join, or a str variable)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (str, bytes))
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        return _is_string_expr(node.left, strings) or (isinstance(node.op, ast.Add) and _is_string_expr(node.right, strings))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("format", "join"):
        return node.func.attr == "format" or _is_string_expr(node.func.value, strings)
    if isinstance(node, ast.IfExp):
        return _is_string_expr(node.body, strings) or _is_string_expr(node.orelse, strings)
    if isinstance(node, ast.Name):
        return node.id in strings
    return False


class _ShellFinder(ast.NodeVisitor):
    """Collect every place a process could be started through a shell or from a command string."""

    def __init__(self):
        self.problems = []
        self.aliases = {}  # local name -> (module, function) from ``from x import y``
        self.modules = {}  # local name -> module from ``import x as y``
        self.scopes = [set()]  # names assigned a string, per function

    def visit_Import(self, node):  # pylint: disable=invalid-name
        for alias in node.names:
            self.modules[alias.asname or alias.name] = alias.name
        self.generic_visit(node)

    def visit_ImportFrom(self, node):  # pylint: disable=invalid-name
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = (node.module or "", alias.name)
        self.generic_visit(node)

    def _visit_function(self, node):
        strings = set()
        for child in ast.walk(node):
            if isinstance(child, ast.Assign) and _is_string_expr(child.value, strings):
                strings.update(target.id for target in child.targets if isinstance(target, ast.Name))
            elif isinstance(child, (ast.AnnAssign, ast.AugAssign)) and child.value is not None \
                    and isinstance(child.target, ast.Name) and _is_string_expr(child.value, strings):
                strings.add(child.target.id)
        self.scopes.append(strings)
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = _visit_function  # noqa: N815
    visit_AsyncFunctionDef = _visit_function  # noqa: N815

    def _target(self, func):
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            return self.modules.get(func.value.id, func.value.id), func.attr
        if isinstance(func, ast.Name) and func.id in self.aliases:
            return self.aliases[func.id]
        if isinstance(func, ast.Attribute):
            return "", func.attr
        return "", getattr(func, "id", "")

    def visit_Call(self, node):  # pylint: disable=invalid-name
        module, name = self._target(node.func)
        where = node.lineno
        for keyword in node.keywords:
            if keyword.arg in ("shell", "use_unsafe_shell") and not (isinstance(keyword.value, ast.Constant) and not keyword.value.value):
                self.problems.append((where, f"{keyword.arg}= on a call of {name}"))
        if (module, name) in _ALWAYS_SHELL:
            self.problems.append((where, f"{module}.{name} runs a shell"))
        command = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg in ("args", "argv")), None)
        runs = (module == "subprocess" and name in _SUBPROCESS_FUNCS) or name in ("run_command", "run_tool") or (module, name) in _SPAWN
        if runs and command is not None and _is_string_expr(command, self.scopes[-1]):
            self.problems.append((where, f"a string command passed to {name}"))
        self.generic_visit(node)


def shell_problems(source):
    finder = _ShellFinder()
    finder.visit(ast.parse(source))
    return finder.problems


@pytest.mark.parametrize("snippet", [
    "import subprocess\nsubprocess.run(['ls'], shell=True)",
    "import subprocess\nsubprocess.Popen(cmd, shell=flag)",
    "import os\nos.system('ls ' + path)",
    "import os as o\no.popen('ls')",
    "from subprocess import check_output\ncheck_output(f'ls {path}')",
    "from subprocess import getoutput as g\ng('ls')",
    "import subprocess\ndef f(p):\n    cmd = 'ls %s' % p\n    subprocess.call(cmd)",
    "import subprocess\nsubprocess.run(args=' '.join(argv))",
    "module.run_command('ls ' + path)",
    "module.run_command(['ls'], use_unsafe_shell=True)",
    "import os\nos.execvp('sh', ['sh', '-c', x]) if False else os.execl('/bin/sh ' + x)",
])
def test_the_shell_check_finds_shells(snippet):
    assert shell_problems(snippet)


@pytest.mark.parametrize("snippet", [
    "import subprocess\nsubprocess.run(['ls', path], shell=False)",
    "import subprocess\nsubprocess.run(list(argv), check=False)",
    "import subprocess\ndef f(p):\n    argv = ['ls', p]\n    subprocess.Popen(argv)",
    "module.run_command(['ls', path])",
])
def test_the_shell_check_lets_argv_lists_pass(snippet):
    assert shell_problems(snippet) == []


def test_no_user_string_reaches_a_shell():
    checked = []
    problems = []
    for dirpath, _dirnames, filenames in os.walk(PLUGINS):
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as handle:
                source = handle.read()
            checked.append(path)
            problems += [f"{os.path.relpath(path, PLUGINS)}:{line}: {what}" for line, what in shell_problems(source)]
    assert any(path.endswith("_commands.py") for path in checked)
    assert problems == []


# ----------------------------------------------------------------------------
# 6. The partition-table parser on corrupted real tables

_SMALL = 8 * MiB
_TABLES = {
    "msdos": plan_table("msdos", _SMALL, [{"size": "2MiB", "bootable": True}, {"type": "swap", "size": "1MiB"}, {}]),
    "gpt": plan_table("gpt", _SMALL, [{"name": "bios", "type": "bios_grub", "size": "1MiB"},
                                      {"name": "esp", "type": "esp", "size": "2MiB"}, {"name": "root"}]),
    "hybrid": plan_table("hybrid", _SMALL, [{"name": "bios", "type": "bios_grub", "size": "1MiB"},
                                            {"name": "esp", "type": "esp", "size": "2MiB"}, {"name": "root"}]),
}
_DISKS = {}
for _label, _table in _TABLES.items():
    _disk = bytearray(_SMALL)
    for _offset, _data in serialize(_table):
        _disk[_offset:_offset + len(_data)] = _data
    _DISKS[_label] = bytes(_disk)
_LAST = _SMALL // SECTOR_SIZE - 1
# The sectors a parser reads: MBR, primary header and entries, backup entries and header.
_SECTORS = list(range(0, 2 + GPT_ENTRIES_SECTORS)) + list(range(_LAST - GPT_ENTRIES_SECTORS, _LAST + 1))


def _fix_gpt_crcs(disk):
    """Recompute the entry-array and header CRCs of both GPT headers, as a careful corrupter would."""
    for lba in (1, _LAST):
        at = lba * SECTOR_SIZE
        if disk[at:at + 8] != b"EFI PART":
            continue
        header_size = struct.unpack_from("<I", disk, at + 12)[0]
        entries_lba, count, entry_size = struct.unpack_from("<QII", disk, at + 72)
        if 92 <= header_size <= SECTOR_SIZE and entries_lba <= _LAST and count * entry_size <= 4 * MiB:
            start = entries_lba * SECTOR_SIZE
            struct.pack_into("<I", disk, at + 88, zlib.crc32(bytes(disk[start:start + count * entry_size])))
            struct.pack_into("<I", disk, at + 16, 0)
            struct.pack_into("<I", disk, at + 16, zlib.crc32(bytes(disk[at:at + header_size])))


def _parse_must_not_crash(disk, size, read=None):
    def reader(offset, length):
        return bytes(disk[offset:offset + length])
    try:
        table = parse(read or reader, size)
    except BuildError:
        return
    if table is not None:
        table.describe()
        json.dumps(table.as_dict())


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label=st.sampled_from(sorted(_TABLES)),
       flips=st.lists(st.tuples(st.sampled_from(_SECTORS), st.integers(0, SECTOR_SIZE - 1), st.integers(0, 255)),
                      min_size=1, max_size=12),
       fix_crcs=st.booleans())
def test_parse_real_tables_corrupted_byte_by_byte(label, flips, fix_crcs):
    disk = bytearray(_DISKS[label])
    for sector, offset, value in flips:
        disk[sector * SECTOR_SIZE + offset] = value
    if fix_crcs:
        _fix_gpt_crcs(disk)
    _parse_must_not_crash(disk, _SMALL)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label=st.sampled_from(sorted(_TABLES)),
       field=st.sampled_from([(0x1BE + 8, 4), (0x1BE + 12, 4), (0x1CE + 8, 4), (0x1CE + 12, 4), (512 + 12, 4), (512 + 24, 8),
                              (512 + 32, 8), (512 + 40, 8), (512 + 48, 8), (512 + 72, 8), (512 + 80, 4), (512 + 84, 4),
                              (1024 + 32, 8), (1024 + 40, 8), (1024 + 128 + 32, 8)]),
       value=st.sampled_from([0, 1, 2, 33, 34, 2047, 2048, _LAST, _LAST + 1, 2 ** 31, 2 ** 32 - 1, 2 ** 63, 2 ** 64 - 1]),
       fix_crcs=st.booleans())
def test_parse_real_tables_with_absurd_fields(label, field, value, fix_crcs):
    offset, width = field
    disk = bytearray(_DISKS[label])
    disk[offset:offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    if fix_crcs:
        _fix_gpt_crcs(disk)
    _parse_must_not_crash(disk, _SMALL)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label=st.sampled_from(sorted(_TABLES)),
       cut=st.integers(0, SECTOR_SIZE * 2),
       after=st.integers(0, _SMALL),
       size=st.sampled_from([0, 511, 512, 17 * 1024, 1 * MiB, _SMALL - 512, _SMALL, _SMALL + 4 * MiB]))
def test_parse_real_tables_with_truncated_reads(label, cut, after, size):
    disk = _DISKS[label]

    def short(offset, length):
        data = disk[offset:offset + length]
        return data[:cut] if offset >= after else data
    _parse_must_not_crash(disk, size, read=short)


# ----------------------------------------------------------------------------
# A kill while the filesystem record is being saved

_SAVE_KILLER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from ansible_collections.osimage.builder.plugins.module_utils import _state
real_fsync = _state.os.fsync
def fsync(fd):
    target = os.readlink(f"/proc/self/fd/{fd}")
    if target.endswith(".tmp") and ".osimage-state.json." in target:
        open(sys.argv[4], "w").close()
        time.sleep(60)  # killed here, in the middle of StateFile.save()
    real_fsync(fd)
_state.os.fsync = fsync
from ansible_collections.osimage.builder.plugins.module_utils._filesystem import ensure_filesystem
ensure_filesystem(sys.argv[2], 1, "ext4", source=sys.argv[3])
"""


def test_a_rerun_removes_what_a_kill_during_the_state_save_left(tmp_path):
    tree = make_tree(str(tmp_path / "tree"))
    work = tmp_path / "work"
    work.mkdir()
    image = str(work / "disk.raw")
    ensure_disk_image(image, "64MiB", "present")
    ensure_partition_table(image, "msdos", [{}])
    marker = str(tmp_path / "saving")
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_KILLER, COLLECTIONS_ROOT, image, tree, marker])
    deadline = time.monotonic() + 60
    while not os.path.exists(marker):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(name.endswith(".tmp") for name in os.listdir(work))
    assert ensure_filesystem(image, 1, "ext4", source=tree)["changed"]
    assert sorted(os.listdir(work)) == ["disk.raw", "disk.raw.osimage-state.json"]


# ----------------------------------------------------------------------------
# Which disk is full: the build host's or the partition

@needs_root
def test_a_full_build_directory_is_not_blamed_on_the_partition(tmp_path):
    tree = make_tree(str(tmp_path / "tree"), data_mib=50)
    with _Tmpfs(str(tmp_path)) as mnt:
        image = os.path.join(mnt, "disk.raw")
        ensure_disk_image(image, "128MiB", "present")
        ensure_partition_table(image, "msdos", [{}])
        with pytest.raises(BuildError) as caught:
            ensure_filesystem(image, 1, "ext4", source=tree)
        assert "make the partition bigger" not in caught.value.message
        assert mnt in caught.value.message and caught.value.option == "image"


@needs_root
def test_a_full_build_directory_while_copying_in_is_refused_before_the_partition_is_touched(tmp_path):
    tree = make_tree(str(tmp_path / "tree"), data_mib=24)
    with _Tmpfs(str(tmp_path)) as mnt:
        image = os.path.join(mnt, "disk.raw")
        ensure_disk_image(image, "128MiB", "present")
        ensure_partition_table(image, "msdos", [{}])
        ensure_filesystem(image, 1, "ext4", source=make_tree(str(tmp_path / "small"), variant=1, data_mib=0))
        offset, size = _partition_range(image, 1)
        with open(image, "rb") as handle:
            handle.seek(offset)
            old = handle.read(size)
        with pytest.raises(BuildError) as caught:
            ensure_filesystem(image, 1, "ext4", source=tree)
        assert mnt in caught.value.message and caught.value.option == "image"
        with open(image, "rb") as handle:
            handle.seek(offset)
            assert handle.read(size) == old
        assert sorted(os.listdir(mnt)) == ["disk.raw", "disk.raw.osimage-state.json"]
