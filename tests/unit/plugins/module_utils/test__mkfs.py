# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._fsprobe import probe_fat
from ansible_collections.osimage.builder.plugins.module_utils._mkfs import (
    MkfsOptions, check_label, check_mkfs_options, check_uuid, fat_geometry, fat_volume_id, mcopy_argv, mke2fs_argv,
    mke2fs_env, mkfs_fat_argv, mmd_argv, mtools_env, parse_version,
)

MiB = 1024 * 1024


@pytest.fixture(scope="session")
def dosfstools():
    search = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    if not (shutil.which("mkfs.fat", path=search) and shutil.which("fsck.vfat", path=search)):
        pytest.fail("dosfstools is not installed: run scripts/install-system-packages")


needs_mkfs_fat = pytest.mark.usefixtures("dosfstools")


def _sbin(name):
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


# --- versions, labels, identifiers -------------------------------------------------------------

@pytest.mark.parametrize("text, program, expected", [
    ("mke2fs 1.47.0 (5-Feb-2023)\n\tUsing EXT2FS Library version 1.47.0\n", "mke2fs", (1, 47, 0)),
    ("Usage: mkfs.fat [OPTIONS] TARGET\nmkfs.fat 4.2 (2021-01-31)\n", "mkfs.fat", (4, 2)),
    ("mcopy (GNU mtools) 4.0.32\nconfigured with ...", "mtools", (4, 0, 32)),
    ("something else", "mke2fs", ()),
])
def test_parse_version(text, program, expected):
    assert parse_version(text, program) == expected


@pytest.mark.parametrize("fstype, label, expected", [
    ("vfat", "esp", "ESP"),
    ("vfat", "EFI SYSTEM", "EFI SYSTEM"),
    ("vfat", "a-b_c{1}", "A-B_C{1}"),
    ("vfat", None, ""),
    ("ext4", "root", "root"),
    ("ext4", "sixteen-bytes-ok", "sixteen-bytes-ok"),
    ("ext4", "räksmörgås", "räksmörgås"),
])
def test_labels(fstype, label, expected):
    assert check_label(fstype, label) == expected


@pytest.mark.parametrize("fstype, label", [
    ("vfat", "twelve-chars"),
    ("vfat", "a.b"),
    ("vfat", "bad/slash"),
    ("vfat", "ümlaut"),
    ("vfat", " lead"),
    ("ext4", "seventeen-bytes-x"),
    ("ext4", "räksmörgåsarna"),  # 14 characters, 17 bytes
])
def test_bad_labels(fstype, label):
    with pytest.raises(BuildError) as exc:
        check_label(fstype, label)
    assert exc.value.option == "label"


def test_uuids():
    assert check_uuid("ext4", "0A1B2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D") == "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
    assert check_uuid("vfat", "1a2b-3c4d") == "1A2B-3C4D"
    assert check_uuid("vfat", "0x1a2b3c4d") == "1A2B-3C4D"
    assert check_uuid("ext4", None) is None
    for fstype, value in (("ext4", "not-a-uuid"), ("vfat", "12345"), ("vfat", "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d")):
        with pytest.raises(BuildError) as exc:
            check_uuid(fstype, value)
        assert exc.value.option == "uuid"


def test_fat_volume_id_is_never_zero():
    assert fat_volume_id(uuid.UUID(int=0)) == "0000-0001"
    assert fat_volume_id(uuid.UUID("12345678-0000-0000-0000-000000000000")) == "1234-5678"


# --- mkfs_options ------------------------------------------------------------------------------

def test_ext_options_pass_through_and_merge_extended():
    opts = check_mkfs_options("ext4", ["-b", "4096", "-Estride=8,stripe_width=16", "-O", "^has_journal", "-m0", "-jq"])
    assert opts.args == ("-b", "4096", "-O", "^has_journal", "-m0", "-j", "-q")
    assert opts.extended == ("stride=8", "stripe_width=16")
    assert opts.features == ("^has_journal",)
    assert opts.block_size == 4096


@pytest.mark.parametrize("options, match", [
    (["-d", "/tmp"], "source"),
    (["-U", "random"], "uuid"),
    (["-L", "x"], "label"),
    (["-t", "ext3"], "fstype"),
    (["-E", "hash_seed=0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"], "seed"),
    (["-E", "offset=4096"], "partition"),
    (["-b", "3000"], "block size"),
    (["-b"], "needs a value"),
    (["-X"], "not an option"),
    (["4096"], "options only"),
    (["--weird"], "options only"),
    ("-b 4096", "list"),
])
def test_ext_options_refused(options, match):
    with pytest.raises(BuildError, match=match) as exc:
        check_mkfs_options("ext4", options)
    assert exc.value.option == "mkfs_options"


def test_fat_options():
    opts = check_mkfs_options("vfat", ["-F", "16", "-s4", "--codepage=437", "-a", "-h", "63"])
    assert opts.args == ("-F", "16", "-s4", "--codepage=437", "-a", "-h", "63")
    assert (opts.fat_size, opts.cluster_sectors, opts.hidden_sectors) == (16, 4, True)
    for options in (["-n", "X"], ["-i", "1234"], ["-C"], ["--offset=8"], ["--invariant"], ["-F", "24"], ["-s", "3"], ["--nope"]):
        with pytest.raises(BuildError) as exc:
            check_mkfs_options("vfat", options)
        assert exc.value.option == "mkfs_options"


# --- argv, argument by argument ----------------------------------------------------------------

def test_mke2fs_argv_147():
    argv = mke2fs_argv("/sbin/mke2fs", "ext4", "/img/.tmp", "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
                       "11111111-2222-3333-4444-555555555555", "root", (0, 0), "/src",
                       check_mkfs_options("ext4", ["-b", "4096", "-E", "stride=8"]), (1, 47, 0))
    assert argv == [
        "/sbin/mke2fs", "-F", "-q", "-t", "ext4",
        "-U", "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
        "-E", "hash_seed=11111111-2222-3333-4444-555555555555,root_owner=0:0,nodiscard,assume_storage_prezeroed=1,stride=8",
        "-L", "root",
        "-b", "4096",
        "-d", "/src",
        "/img/.tmp",
    ]


def test_mke2fs_argv_older_without_label_or_tree():
    argv = mke2fs_argv("mke2fs", "ext2", "t", "u", "h", "", (1000, 100), None, MkfsOptions(), (1, 46, 5))
    assert argv == ["mke2fs", "-F", "-q", "-t", "ext2", "-U", "u",
                    "-E", "hash_seed=h,root_owner=1000:100,nodiscard,lazy_itable_init=0,lazy_journal_init=0", "t"]


def test_mke2fs_env_pins_time_and_collation():
    env = mke2fs_env({"PATH": "/bin", "MKE2FS_SYNC": "1", "LC_ALL": "de_DE.UTF-8"}, 0)
    assert env["E2FSPROGS_FAKE_TIME"] == "1"  # 0 would mean the clock
    assert env["SOURCE_DATE_EPOCH"] == "1"
    assert env["LC_ALL"] == "C" and env["TZ"] == "UTC" and env["PATH"] == "/bin"
    assert "MKE2FS_SYNC" not in env
    assert mke2fs_env({}, 1700000000)["E2FSPROGS_FAKE_TIME"] == "1700000000"


def test_mkfs_fat_argv():
    geometry = fat_geometry(256 * MiB)
    argv = mkfs_fat_argv("/sbin/mkfs.fat", "/img/.tmp", "1A2B-3C4D", "ESP", 2048, geometry, MkfsOptions(), (4, 2))
    assert argv == ["/sbin/mkfs.fat", "--invariant", "-i", "1A2B3C4D", "--mbr=n", "-n", "ESP", "-h", "2048",
                    "-F", "32", "-s", "1", "/img/.tmp"]
    # The user's geometry wins over ours, and 4.1 has no --mbr.
    argv = mkfs_fat_argv("mkfs.fat", "t", "1A2B-3C4D", "", 0, geometry, check_mkfs_options("vfat", ["-F", "16"]), (4, 1))
    assert argv == ["mkfs.fat", "--invariant", "-i", "1A2B3C4D", "-h", "0", "-F", "16", "t"]
    argv = mkfs_fat_argv("mkfs.fat", "t", "1A2B-3C4D", "", 0, geometry, check_mkfs_options("vfat", ["-h", "63"]), (4, 2))
    assert argv == ["mkfs.fat", "--invariant", "-i", "1A2B3C4D", "--mbr=n", "-F", "32", "-s", "1", "-h", "63", "t"]


def test_mtools_argv_and_env():
    assert mmd_argv("mmd", "t", [b"EFI", b"EFI/BOOT"]) == [["mmd", "-i", "t", b"::/EFI", b"::/EFI/BOOT"]]
    assert mcopy_argv("mcopy", "t", [b"/s/a", b"/s/b"], b"") == [["mcopy", "-m", "-Q", "-D", "o", "-i", "t", b"/s/a", b"/s/b",
                                                                  b"::/"]]
    assert mcopy_argv("mcopy", "t", [b"/s/EFI/x"], b"EFI")[0][-1] == b"::/EFI/"
    many = mcopy_argv("mcopy", "t", [b"/s/%d" % n for n in range(1500)], b"d")
    assert len(many) == 3 and sum(len(argv) - 8 for argv in many) == 1500
    env = mtools_env({"PATH": "/bin", "MTOOLS_LOWER_CASE": "1", "HOME": "/root"}, 1700000000, "/tmp/h")
    assert env["MTOOLS_LOWER_CASE"] == "0" and env["HOME"] == "/tmp/h" and env["MTOOLSRC"] == "/dev/null"
    assert env["SOURCE_DATE_EPOCH"] == "1700000000" and env["TZ"] == "UTC" and env["MTOOLS_SKIP_CHECK"] == "1"


# --- FAT geometry ------------------------------------------------------------------------------

GEOMETRY = [
    # size, FAT bits, sectors per cluster
    (32 * MiB, 16, 4),
    (33 * MiB, 32, 1),
    (64 * MiB, 32, 1),
    (100 * MiB, 32, 1),
    (256 * MiB, 32, 1),
    (260 * MiB, 32, 1),
    (512 * MiB, 32, 8),
    (1024 * MiB, 32, 8),
    (4096 * MiB, 32, 8),
]


@pytest.mark.parametrize("size, bits, per_cluster", GEOMETRY)
def test_fat_geometry_table(size, bits, per_cluster):
    geometry = fat_geometry(size)
    assert (geometry.fat_bits, geometry.sectors_per_cluster) == (bits, per_cluster)
    low, high = {16: (4085, 65524), 32: (65525, 0x0FFFFFF5)}[bits]
    assert low + 64 <= geometry.clusters <= high - 64


def test_fat_geometry_small_and_limits():
    assert fat_geometry(1 * MiB).fat_bits == 12
    assert fat_geometry(4 * MiB).fat_bits == 16
    with pytest.raises(BuildError) as exc:
        fat_geometry(8 * 1024)
    assert exc.value.option == "partition"
    with pytest.raises(BuildError):
        fat_geometry(3 * 1024 ** 4)


@needs_mkfs_fat
@pytest.mark.parametrize("size, bits, per_cluster", GEOMETRY)
def test_fat_geometry_formats_with_mkfs_fat(tmp_path, size, bits, per_cluster):
    """Each size really formats, passes fsck.vfat -n, and is the FAT type the cluster count says."""
    path = tmp_path / "fat.img"
    with open(path, "wb") as handle:
        handle.truncate(size)
    geometry = fat_geometry(size)
    argv = mkfs_fat_argv(_sbin("mkfs.fat"), str(path), "1234-ABCD", "TEST", 2048, geometry, MkfsOptions(),
                         parse_version(subprocess.run([_sbin("mkfs.fat"), "--help"], capture_output=True, text=True, check=False).stdout,
                                       "mkfs.fat"))
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stdout + done.stderr
    fsck = subprocess.run([_sbin("fsck.vfat"), "-n", str(path)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout
    fd = os.open(path, os.O_RDONLY)
    try:
        info = probe_fat(lambda offset, length: os.pread(fd, length, offset), 0)
    finally:
        os.close(fd)
    assert info["fat_bits"] == bits and info["sectors_per_cluster"] == per_cluster
    assert abs(info["clusters"] - geometry.clusters) < 16
    assert info["uuid"] == "1234-ABCD" and info["label"] == "TEST" and info["hidden_sectors"] == 2048
