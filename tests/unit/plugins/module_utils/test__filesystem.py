# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Real builds of small images with mke2fs / mkfs.fat / mtools (skipped where they are missing)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess

import pytest

from ansible_collections.osimage.builder.plugins.module_utils import _filesystem
from ansible_collections.osimage.builder.plugins.module_utils._disk_image import ensure_disk_image
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._filesystem import (
    _InodeCsumDelta, _crc32c_raw, ensure_filesystem, pin_ext_times,
)
from ansible_collections.osimage.builder.plugins.module_utils._fsprobe import probe
from ansible_collections.osimage.builder.plugins.module_utils._image import Image
from ansible_collections.osimage.builder.plugins.module_utils._partition_table import ensure_partition_table
from ansible_collections.osimage.builder.plugins.module_utils._state import walk_tree

MiB = 1024 * 1024
SEARCH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
EPOCH = 1_700_000_000


def _tool(name):
    found = shutil.which(name, path=SEARCH)
    if not found:
        pytest.fail(f"{name} is not installed: run scripts/install-system-packages")
    return found


@pytest.fixture(autouse=True)
def _no_source_date_epoch(monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


def _sha(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _make_image(tmp_path, name="disk.raw", size="128MiB", esp="34MiB"):
    path = str(tmp_path / name)
    ensure_disk_image(path, size, "present")
    ensure_partition_table(path, "gpt", [{"name": "esp", "type": "esp", "size": esp}, {"name": "root"}])
    return path


def _make_tree(root, files=3, size=1000):
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("image\n")
    for index in range(files):
        (root / f"data-{index}.bin").write_bytes(bytes([index % 251]) * size)
    os.symlink("etc/hostname", root / "link")
    os.link(root / "etc" / "hostname", root / "hardlink")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (EPOCH - 5, EPOCH), follow_symlinks=False)
    os.utime(root, (EPOCH - 5, EPOCH))
    return str(root)


def _root_offset(image):
    with Image(image) as img:
        from ansible_collections.osimage.builder.plugins.module_utils._partition_table import find_partition, read_table
        part = find_partition(read_table(img), "root", "partition")
    return part.start_sector * 512


def _debugfs(image, offset, request):
    return subprocess.run([_tool("debugfs"), "-R", request, f"{image}?offset={offset}"], capture_output=True, text=True, check=False).stdout


def _e2fsck(image, offset):
    return subprocess.run([_tool("e2fsck"), "-fn", f"{image}?offset={offset}"], capture_output=True, text=True, check=False)


# --- ext4 ------------------------------------------------------------------------------------

def test_build_ext4_then_rerun_is_a_noop(tmp_path, monkeypatch):
    _tool("mke2fs")
    image = _make_image(tmp_path)
    source = _make_tree(tmp_path / "tree")
    result = ensure_filesystem(image, "root", "ext4", source=source, label="root")
    assert result["changed"] and result["built"]
    assert result["partition"] == 2 and result["fstype"] == "ext4" and result["label"] == "root"
    offset = _root_offset(image)
    assert result["offset"] == offset == 35 * MiB and result["size"] == 92 * MiB
    assert "(empty partition)" in result["diff"]["before"] and "ext4" in result["diff"]["after"]
    fsck = _e2fsck(image, offset)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    listing = _debugfs(image, offset, "ls -l /")
    for name in ("etc", "data-0.bin", "link", "hardlink", "lost+found"):
        assert name in listing
    stat = _debugfs(image, offset, "stat /data-1.bin")
    assert stat.count("0x6553f100") == 4  # atime, ctime, mtime: the tree's mtime; crtime: the newest mtime
    with Image(image) as img:
        found = probe(img.read, offset)
    assert found["uuid"] == result["uuid"] and found["label"] == "root" and found["mkfs_time"] == EPOCH
    assert os.stat(image).st_blocks * 512 < 40 * MiB  # still sparse
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]

    # The rerun reads the fingerprint's few MiB, never the partition, and runs no mke2fs.
    read_bytes = []
    real_read = Image.read

    def counting_read(self, offset, length):
        read_bytes.append(length)
        return real_read(self, offset, length)
    monkeypatch.setattr(Image, "read", counting_read)
    runs = []
    real_run = _filesystem._run

    def counting_run(argv, env, what):
        runs.append(argv)
        return real_run(argv, env, what)
    monkeypatch.setattr(_filesystem, "_run", counting_run)
    before = _sha(image)
    again = ensure_filesystem(image, "root", "ext4", source=source, label="root")
    assert not again["changed"] and not again["built"]
    assert again["uuid"] == result["uuid"]
    assert sum(read_bytes) < 5 * MiB
    assert runs == []
    assert _sha(image) == before
    checked = ensure_filesystem(image, "root", "ext4", source=source, label="root", check_mode=True)
    assert not checked["changed"]


def test_changed_inputs_rebuild_our_own_filesystem_without_force(tmp_path):
    _tool("mke2fs")
    image = _make_image(tmp_path)
    source = _make_tree(tmp_path / "tree")
    first = ensure_filesystem(image, "root", "ext4", source=source)
    (tmp_path / "tree" / "new-file").write_text("new\n")
    second = ensure_filesystem(image, "root", "ext4", source=source)
    assert second["changed"] and second["built"] and second["uuid"] == first["uuid"]
    assert "new-file" in _debugfs(image, _root_offset(image), "ls /")
    relabelled = ensure_filesystem(image, "root", "ext4", source=source, label="other")
    assert relabelled["changed"] and "label 'other'" in relabelled["diff"]["after"]


def test_modified_behind_our_back_needs_force(tmp_path):
    _tool("mke2fs")
    image = _make_image(tmp_path)
    source = _make_tree(tmp_path / "tree")
    ensure_filesystem(image, "root", "ext4", source=source)
    offset = _root_offset(image)
    # What a mount does: bump the mount count in the superblock.
    subprocess.run([_tool("debugfs"), "-w", "-R", "ssv mnt_count 7", f"{image}?offset={offset}"], check=True,
                   capture_output=True)
    modified = _sha(image)
    with pytest.raises(BuildError, match="force=true") as exc:
        ensure_filesystem(image, "root", "ext4", source=source)
    assert exc.value.option == "partition"
    assert "changed since this module built it" in exc.value.message
    with pytest.raises(BuildError):
        ensure_filesystem(image, "root", "ext4", source=source, check_mode=True)
    assert _sha(image) == modified
    forced = ensure_filesystem(image, "root", "ext4", source=source, force=True)
    assert forced["changed"] and "changed since" in forced["diff"]["before"]
    assert not ensure_filesystem(image, "root", "ext4", source=source)["changed"]


def test_a_file_written_with_debugfs_is_noticed(tmp_path):
    _tool("mke2fs")
    image = _make_image(tmp_path)
    source = _make_tree(tmp_path / "tree")
    ensure_filesystem(image, "root", "ext4", source=source)
    offset = _root_offset(image)
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(3 * MiB))
    subprocess.run([_tool("debugfs"), "-w", "-R", f"write {payload} /payload", f"{image}?offset={offset}"], check=True,
                   capture_output=True)
    with pytest.raises(BuildError, match="force"):
        ensure_filesystem(image, "root", "ext4", source=source)


def test_foreign_filesystem_is_refused_then_replaced_with_force(tmp_path):
    mke2fs = _tool("mke2fs")
    image = _make_image(tmp_path)
    offset = _root_offset(image)
    with Image(image) as img:
        from ansible_collections.osimage.builder.plugins.module_utils._partition_table import find_partition, read_table
        part = find_partition(read_table(img), 2, "partition")
    subprocess.run([mke2fs, "-F", "-q", "-t", "ext3", "-L", "theirs", "-E", f"offset={offset}", image,
                    str(part.sectors // 2)], check=True)
    before = _sha(image)
    with pytest.raises(BuildError) as exc:
        ensure_filesystem(image, 2, "ext4")
    assert "ext3" in exc.value.message and "theirs" in exc.value.message and "did not build it" in exc.value.message
    assert _sha(image) == before
    replaced = ensure_filesystem(image, 2, "ext4", force=True)
    assert replaced["changed"] and "theirs" in replaced["diff"]["before"]
    assert _e2fsck(image, offset).returncode == 0


def test_allocated_zeros_are_no_data(tmp_path):
    _tool("mke2fs")
    image = _make_image(tmp_path)
    offset = _root_offset(image)
    with open(image, "r+b") as handle:  # preallocated, as dd if=/dev/zero or qemu-img preallocation=full leave it
        handle.seek(offset)
        handle.write(bytes(8 * MiB))
    result = ensure_filesystem(image, "root", "ext4")
    assert result["changed"] and "all zeros" in result["diff"]["before"]
    with open(image, "r+b") as handle:  # but one byte of someone else's data is data
        handle.seek(offset + 6 * MiB)
        handle.write(b"\1")
    os.unlink(image + ".osimage-state.json")
    with pytest.raises(BuildError, match="did not build it"):
        ensure_filesystem(image, "root", "ext4")


def test_an_interrupted_install_is_rebuilt_without_force(tmp_path, monkeypatch):
    _tool("mke2fs")
    image = _make_image(tmp_path)
    source = _make_tree(tmp_path / "tree")
    ensure_filesystem(image, "root", "ext4", source=source)
    real_install = _filesystem.install

    def disk_full(img, tmp_fd, offset, size):
        real_install(img, tmp_fd, offset, size // 2)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(_filesystem, "install", disk_full)
    (tmp_path / "tree" / "more").write_text("more\n")
    with pytest.raises(BuildError, match="filled up") as caught:
        ensure_filesystem(image, "root", "ext4", source=source)
    assert caught.value.option == "image"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    monkeypatch.setattr(_filesystem, "install", real_install)
    again = ensure_filesystem(image, "root", "ext4", source=source)
    assert again["changed"] and "interrupted" in again["diff"]["before"]
    assert _e2fsck(image, _root_offset(image)).returncode == 0
    assert not ensure_filesystem(image, "root", "ext4", source=source)["changed"]


def test_tree_too_big_fails_before_building(tmp_path):
    _tool("mke2fs")
    image = _make_image(tmp_path, size="48MiB", esp="34MiB")
    source = _make_tree(tmp_path / "tree", files=4, size=5 * MiB)
    before = _sha(image)
    with pytest.raises(BuildError, match="needs about") as exc:
        ensure_filesystem(image, "root", "ext4", source=source)
    assert exc.value.option == "source"
    assert "partition 2 has" in exc.value.message and "MiB" in exc.value.message
    assert exc.value.details["needed"] > exc.value.details["available"]
    assert _sha(image) == before
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert not os.path.exists(image + ".osimage-state.json")


def test_estimate_misses_then_mke2fs_failure_is_translated(tmp_path, monkeypatch):
    _tool("mke2fs")
    image = _make_image(tmp_path, size="48MiB", esp="34MiB")
    source = _make_tree(tmp_path / "tree", files=4, size=5 * MiB)
    monkeypatch.setattr(_filesystem, "_check_fits", lambda ctx, info: None)
    before = _sha(image)
    with pytest.raises(BuildError, match="does not fit") as exc:
        ensure_filesystem(image, "root", "ext4", source=source)
    assert exc.value.option == "source"
    assert _sha(image) == before
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_missing_partition_and_bad_options(tmp_path):
    _tool("mke2fs")
    image = _make_image(tmp_path)
    before = _sha(image)
    for kwargs, option in (
        ({"partition": 9, "fstype": "ext4"}, "partition"),
        ({"partition": "nope", "fstype": "ext4"}, "partition"),
        ({"partition": 2, "fstype": "xfs"}, "fstype"),
        ({"partition": 2, "fstype": "ext4", "mkfs_options": ["-L", "x"]}, "mkfs_options"),
        ({"partition": 2, "fstype": "ext4", "uuid": "nope"}, "uuid"),
        ({"partition": 2, "fstype": "vfat", "label": "much too long"}, "label"),
        ({"partition": 2, "fstype": "ext4", "source": str(tmp_path / "missing")}, "source"),
        ({"partition": 2, "fstype": "ext4", "seed": ""}, "seed"),
    ):
        with pytest.raises(BuildError) as exc:
            ensure_filesystem(image, **kwargs)
        assert exc.value.option == option, exc.value
    with pytest.raises(BuildError) as exc:
        ensure_filesystem(str(tmp_path / "missing.raw"), 2, "ext4")
    assert exc.value.option == "image"
    assert _sha(image) == before


def test_check_mode(tmp_path):
    _tool("mke2fs")
    planned = ensure_filesystem(str(tmp_path / "fresh.raw"), "root", "ext4", check_mode=True)
    assert planned["changed"] and not planned["built"] and "does not exist yet" in planned["msg"]
    assert not os.path.exists(tmp_path / "fresh.raw")
    bare = str(tmp_path / "bare.raw")
    ensure_disk_image(bare, "64MiB", "present")
    assert "no partition table yet" in ensure_filesystem(bare, "root", "ext4", check_mode=True)["msg"]
    image = _make_image(tmp_path)
    source = _make_tree(tmp_path / "tree")
    before = _sha(image)
    not_yet = ensure_filesystem(image, "root", "ext4", source=str(tmp_path / "tree-made-later"), check_mode=True)
    assert not_yet["changed"] and "does not exist yet" in not_yet["msg"]
    with pytest.raises(BuildError) as missing:
        ensure_filesystem(image, "root", "ext4", source=str(tmp_path / "tree-made-later"))
    assert missing.value.option == "source"
    planned = ensure_filesystem(image, "root", "ext4", source=source, check_mode=True)
    assert planned["changed"] and not planned["built"] and planned["uuid"]
    assert _sha(image) == before and not os.path.exists(image + ".osimage-state.json")
    real = ensure_filesystem(image, "root", "ext4", source=source)
    assert real["uuid"] == planned["uuid"]
    big = _make_tree(tmp_path / "big", files=30, size=4 * MiB)
    with pytest.raises(BuildError, match="needs about"):
        ensure_filesystem(image, "root", "ext4", source=big, check_mode=True)


def test_two_builds_are_identical(tmp_path):
    _tool("mke2fs")
    source = _make_tree(tmp_path / "tree")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _make_image(tmp_path / "a")
    second = _make_image(tmp_path / "b")
    ensure_filesystem(first, "root", "ext4", source=source)
    ensure_filesystem(first, "esp", "vfat", source=str(tmp_path / "tree" / "etc"))
    # Reading the tree moved its atimes; a copy of it has new ctimes: neither may show.
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", source, str(copy)], check=True)
    ensure_filesystem(second, "root", "ext4", source=str(copy))
    ensure_filesystem(second, "esp", "vfat", source=str(copy / "etc"))
    assert _sha(first) == _sha(second)


def test_source_date_epoch_is_the_timestamp(tmp_path, monkeypatch):
    _tool("mke2fs")
    image = _make_image(tmp_path)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234567890")
    ensure_filesystem(image, "root", "ext4")
    with Image(image) as img:
        assert probe(img.read, _root_offset(image))["mkfs_time"] == 1234567890
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(BuildError, match="SOURCE_DATE_EPOCH"):
        ensure_filesystem(image, "root", "ext4")


def test_mkfs_options_and_explicit_uuid(tmp_path):
    _tool("mke2fs")
    image = _make_image(tmp_path)
    result = ensure_filesystem(image, "root", "ext3", uuid="0A1B2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D",
                               mkfs_options=["-b", "4096", "-E", "stride=4", "-m", "0"])
    with Image(image) as img:
        found = probe(img.read, _root_offset(image))
    assert found["fstype"] == "ext3" and found["block_size"] == 4096 and found["reserved_blocks"] == 0
    assert found["uuid"] == result["uuid"] == "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


def test_install_fallbacks_keep_the_result(tmp_path, monkeypatch):
    _tool("mke2fs")
    source = _make_tree(tmp_path / "tree")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _make_image(tmp_path / "a")
    ensure_filesystem(first, "root", "ext4", source=source)
    second = _make_image(tmp_path / "b")
    with open(second, "r+b") as handle:  # stale data the zeroing fallback must clear
        handle.seek(_root_offset(second) + 50 * MiB)
        handle.write(b"old" * 1000)
    monkeypatch.setattr(_filesystem, "_punch_hole", lambda fd, offset, length: False)

    def no_copy_file_range(*args):
        raise OSError(errno.ENOSYS, "not here")
    monkeypatch.setattr(os, "copy_file_range", no_copy_file_range, raising=False)
    ensure_filesystem(second, "root", "ext4", source=source, force=True)
    assert _sha(first) == _sha(second)


# --- vfat ------------------------------------------------------------------------------------

def _esp_tree(root):
    (root / "EFI" / "BOOT").mkdir(parents=True)
    (root / "EFI" / "BOOT" / "BOOTX64.EFI").write_bytes(b"MZ" + bytes(5000))
    (root / ".hidden").write_text("dot file\n")
    (root / "A long name, with spaces.txt").write_text("long\n")
    (root / "empty-dir").mkdir()
    return str(root)


def test_build_vfat(tmp_path):
    _tool("mkfs.fat")
    mdir = _tool("mdir")
    image = _make_image(tmp_path)
    source = _esp_tree(tmp_path / "esp")
    result = ensure_filesystem(image, "esp", "vfat", source=source, label="efi")
    assert result["changed"] and result["label"] == "EFI" and len(result["uuid"]) == 9
    with Image(image) as img:
        found = probe(img.read, result["offset"])
        data = img.read(result["offset"], result["size"])
    assert found["fat_bits"] == 32 and found["uuid"] == result["uuid"] and found["label"] == "EFI"
    assert found["hidden_sectors"] == 2048
    extracted = tmp_path / "esp.img"
    extracted.write_bytes(data)
    fsck = subprocess.run([_tool("fsck.vfat"), "-n", str(extracted)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout
    listing = subprocess.run([mdir, "-/", "-a", "-i", f"{image}@@{result['offset']}", "::/"], capture_output=True, text=True,
                             env=dict(os.environ, MTOOLS_SKIP_CHECK="1"), check=False).stdout
    for name in ("BOOTX64", ".hidden", "A long name, with spaces.txt", "empty-dir"):
        assert name in listing
    assert not ensure_filesystem(image, "esp", "vfat", source=source, label="efi")["changed"]
    # mcopy into it behind our back
    extra = tmp_path / "extra.txt"
    extra.write_text("x")
    subprocess.run([_tool("mcopy"), "-i", f"{image}@@{result['offset']}", str(extra), "::/"], check=True,
                   env=dict(os.environ, MTOOLS_SKIP_CHECK="1"))
    with pytest.raises(BuildError, match="force"):
        ensure_filesystem(image, "esp", "vfat", source=source, label="efi")


@pytest.mark.parametrize("make, match", [
    (lambda root: os.symlink("x", root / "link"), "symlink"),
    (lambda root: os.mkfifo(root / "fifo"), "fifo"),
    (lambda root: (root / "a:b").write_text(""), "cannot contain"),
    (lambda root: (root / "trailing.").write_text(""), "end with a dot"),
    (lambda root: ((root / "Case").write_text(""), (root / "CASE").write_text("")), "differ only in case"),
])
def test_vfat_refuses_what_fat_cannot_hold(tmp_path, make, match):
    _tool("mkfs.fat")
    image = _make_image(tmp_path)
    root = tmp_path / "esp"
    root.mkdir()
    (root / "fine").write_text("ok")
    make(root)
    before = _sha(image)
    with pytest.raises(BuildError, match=match) as exc:
        ensure_filesystem(image, "esp", "vfat", source=str(root))
    assert exc.value.option == "source" and str(root) in exc.value.message
    assert _sha(image) == before


def test_vfat_too_big(tmp_path):
    _tool("mkfs.fat")
    image = _make_image(tmp_path, esp="34MiB")
    root = tmp_path / "esp"
    root.mkdir()
    for index in range(8):
        (root / f"blob{index}").write_bytes(os.urandom(5 * MiB))
    before = _sha(image)
    with pytest.raises(BuildError, match="needs about") as exc:
        ensure_filesystem(image, "esp", "vfat", source=str(root))
    assert exc.value.option == "source" and "partition 1 has" in exc.value.message
    assert _sha(image) == before


def test_empty_vfat_and_ext_without_source(tmp_path):
    _tool("mkfs.fat")
    _tool("mke2fs")
    image = _make_image(tmp_path)
    esp = ensure_filesystem(image, 1, "vfat")
    root = ensure_filesystem(image, 2, "ext2", label="r")
    assert esp["changed"] and root["changed"]
    assert _e2fsck(image, _root_offset(image)).returncode == 0
    assert not ensure_filesystem(image, 1, "vfat")["changed"]
    assert not ensure_filesystem(image, 2, "ext2", label="r")["changed"]


# --- the inode time pass ---------------------------------------------------------------------

def test_crc32c_and_delta():
    assert _crc32c_raw(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283  # the CRC-32C check value
    delta = _InodeCsumDelta(256)
    old = bytes(range(256))
    new = bytearray(old)
    new[8:12] = b"\x01\x02\x03\x04"
    new[200] = 0xFF
    seed = 0x12345678
    assert _crc32c_raw(seed, old) ^ _crc32c_raw(seed, bytes(new)) == delta.delta(old, new)


@pytest.mark.parametrize("options, size", [
    ([], 32 * MiB),
    (["-I", "128"], 32 * MiB),
    (["-O", "^metadata_csum,uninit_bg"], 32 * MiB),
    (["-b", "1024", "-O", "meta_bg,^resize_inode"], 512 * MiB),  # descriptors spread over 4 meta groups
])
def test_pin_ext_times_on_a_fresh_mke2fs(tmp_path, options, size):
    mke2fs = _tool("mke2fs")
    tree = tmp_path / "tree"
    _make_tree(tree, files=20)
    for index in range(20):
        os.utime(tree / f"data-{index}.bin", (EPOCH - 1000 * index, EPOCH - index))
    target = tmp_path / "fs.img"
    with open(target, "wb") as handle:
        handle.truncate(size)
    subprocess.run([mke2fs, "-F", "-q", "-t", "ext4"] + options + ["-d", str(tree), str(target)], check=True,
                   env=dict(os.environ, E2FSPROGS_FAKE_TIME=str(EPOCH)))
    fd = os.open(target, os.O_RDWR)
    try:
        assert pin_ext_times(fd) > 0
        assert pin_ext_times(fd) == 0
    finally:
        os.close(fd)
    fsck = subprocess.run([_tool("e2fsck"), "-fn", str(target)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout
    stat = subprocess.run([_tool("debugfs"), "-R", "stat /data-7.bin", str(target)], capture_output=True, text=True, check=False).stdout
    mtime = f"0x{EPOCH - 7:08x}"
    assert stat.count(mtime) == 3, stat


def test_unreadable_entries_are_named(tmp_path):
    tree = walk_tree(_make_tree(tmp_path / "tree"))
    entry = tree.entries[2]
    tree.entries[2] = type(entry)(**dict(entry.__dict__, readable=False))
    with pytest.raises(BuildError, match="cannot be read") as exc:
        _filesystem._check_readable(tree)
    assert exc.value.option == "source" and entry.display() in exc.value.message


@pytest.mark.parametrize("fstype", ["ext4", "ext2", "vfat"])
def test_estimates_match_what_the_tools_use(tmp_path, fstype):
    """The space estimate is within a few percent of what mke2fs -d / mcopy really allocate."""
    root = tmp_path / "tree"
    for index in range(12):
        (root / f"dir{index}" / "sub").mkdir(parents=True)
        for number in range(25):
            (root / f"dir{index}" / ("sub" if number % 2 else "") / f"file-with-a-longer-name-{number}").write_bytes(
                os.urandom(97 * number + 1))
    (root / "big").write_bytes(os.urandom(3 * MiB + 5))
    tree = walk_tree(str(root))
    target = str(tmp_path / "fs.img")

    def measure(with_tree):
        if os.path.exists(target):
            os.unlink(target)
        with open(target, "wb") as handle:
            handle.truncate(256 * MiB)
        env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
        if fstype == "vfat":
            subprocess.run([_tool("mkfs.fat"), "-F", "32", "-s", "1", target], check=True, capture_output=True)
            if with_tree:
                subprocess.run([_tool("mcopy"), "-s", "-i", target] + [str(path) for path in sorted(root.iterdir())] + ["::/"],
                               check=True, env=env)
            out = subprocess.run([_tool("fsck.vfat"), "-n", target], capture_output=True, text=True, check=True).stdout
            used = int(out.split()[-2].split("/")[0])
        else:
            subprocess.run([_tool("mke2fs"), "-F", "-q", "-t", fstype] + (["-d", str(root)] if with_tree else []) + [target],
                           check=True)
            used = None
        fd = os.open(target, os.O_RDONLY)
        try:
            info = probe(lambda offset, length: os.pread(fd, length, offset), 0)
        finally:
            os.close(fd)
        return info, used

    empty, empty_used = measure(False)
    full, full_used = measure(True)
    if fstype == "vfat":
        need, _root_entries = _filesystem.fat_needs(tree, empty)
        actual = full_used - empty_used
    else:
        need, inodes = _filesystem.ext_needs(tree, empty)
        actual = empty["free_blocks"] - full["free_blocks"]
        assert inodes == empty["free_inodes"] - full["free_inodes"]
    assert actual * 0.97 <= need <= actual * 1.05, (need, actual)
