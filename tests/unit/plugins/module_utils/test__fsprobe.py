# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ansible_collections.osimage.builder.plugins.module_utils._fsprobe import describe, probe

MiB = 1024 * 1024
SEARCH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
UUID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


def _tool(name):
    found = shutil.which(name, path=SEARCH)
    if not found:
        pytest.fail(f"{name} is not installed: run scripts/install-system-packages")
    return found


def _image(tmp_path, size, offset=0):
    path = tmp_path / "fs.img"
    with open(path, "wb") as handle:
        handle.truncate(size + offset)
    return path


def _reader(path):
    data = open(path, "rb").read()

    def read(offset, length):
        chunk = data[offset:offset + length]
        return chunk + bytes(length - len(chunk))
    return read


@pytest.mark.parametrize("fstype, options, size", [
    ("ext2", [], 8 * MiB),
    ("ext3", [], 16 * MiB),
    ("ext4", [], 16 * MiB),
    ("ext4", ["-b", "4096", "-O", "64bit"], 64 * MiB),
])
def test_ext_superblocks_made_by_mke2fs(tmp_path, fstype, options, size):
    path = _image(tmp_path, size)
    subprocess.run([_tool("mke2fs"), "-F", "-q", "-t", fstype, "-U", UUID, "-L", "my-root"] + options + [str(path)],
                   check=True, env=dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000"))
    found = probe(_reader(path), 0)
    assert found["fstype"] == fstype
    assert found["uuid"] == UUID
    assert found["label"] == "my-root"
    assert found["size"] <= size and found["size"] > size * 0.9
    assert 0 < found["free_blocks"] < found["blocks"]
    assert found["mkfs_time"] == 1700000000
    assert found["inode_size"] in (128, 256)
    if "-b" in options:
        assert found["block_size"] == 4096
    blkid = shutil.which("blkid", path=SEARCH)
    if blkid:
        out = subprocess.run([blkid, "-p", "-o", "export", str(path)], capture_output=True, text=True, check=False).stdout
        assert f"TYPE={fstype}" in out and f"UUID={UUID}" in out
    assert describe(found) == f"{fstype}, UUID {UUID}, label 'my-root'"


@pytest.mark.parametrize("size, bits", [(1 * MiB, 12), (16 * MiB, 16), (40 * MiB, 32)])
def test_fat_boot_sectors_made_by_mkfs_fat(tmp_path, size, bits):
    offset = 2 * MiB
    path = _image(tmp_path, size, offset)
    subprocess.run([_tool("mkfs.fat"), "--invariant", "-i", "1A2B3C4D", "-n", "MYESP", "-F", str(bits),
                    "--offset", str(offset // 512), str(path), str(size // 1024)], check=True, capture_output=True)
    read = _reader(path)
    found = probe(read, offset)
    assert found["fstype"] == "vfat"
    assert found["fat_bits"] == bits
    assert found["uuid"] == "1A2B-3C4D"
    assert found["label"] == "MYESP"
    assert found["size"] == size
    assert probe(read, 0) is None
    assert describe(found) == f"vfat (FAT{bits}), UUID 1A2B-3C4D, label 'MYESP'"


def test_fat_label_entry_wins_over_boot_sector(tmp_path):
    path = _image(tmp_path, 40 * MiB)
    subprocess.run([_tool("mkfs.fat"), "--invariant", "-n", "OLD", str(path)], check=True, capture_output=True)
    mlabel = _tool("mlabel")
    subprocess.run([mlabel, "-i", str(path), "::NEW"], check=True, env=dict(os.environ, MTOOLS_SKIP_CHECK="1"))
    assert probe(_reader(path), 0)["label"] == "NEW"


def test_fat_without_label(tmp_path):
    path = _image(tmp_path, 40 * MiB)
    subprocess.run([_tool("mkfs.fat"), "--invariant", str(path)], check=True, capture_output=True)
    found = probe(_reader(path), 0)
    assert found["label"] == "" and found["uuid"] == "1234-ABCD"


def test_nothing_recognised():
    assert probe(lambda offset, length: bytes(length), 0) is None
    noise = bytes((index * 37 + 11) & 0xFF for index in range(8192))
    assert probe(lambda offset, length: noise[offset:offset + length].ljust(length, b"\0"), 0) is None
    # An NTFS boot sector: jump, OEM id, but no FAT geometry.
    ntfs = bytearray(512)
    ntfs[0:3] = b"\xebR\x90"
    ntfs[3:11] = b"NTFS    "
    ntfs[11:13] = (512).to_bytes(2, "little")
    ntfs[13] = 8
    ntfs[21] = 0xF8
    ntfs[510:512] = b"\x55\xaa"
    assert probe(lambda offset, length: bytes(ntfs[offset:offset + length]).ljust(length, b"\0"), 0) is None
    assert describe(None) == "no filesystem this module recognises"
