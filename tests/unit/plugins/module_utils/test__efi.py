# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The pure helpers of grub_efi_install: grub.cfg, grub-mkimage argv, the ESP file plan, PE checks, FAT free space."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from ansible_collections.osimage.builder.plugins.module_utils import _efi
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._fsprobe import probe_fat

UUID = "0f0e0d0c-0b0a-4908-8706-050403020100"
SEARCH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def _tool(name):
    found = shutil.which(name, path=SEARCH)
    if not found:
        pytest.fail(f"{name} is not installed: run scripts/install-system-packages")
    return found


# ---------------------------------------------------------------- grub.cfg

def test_grub_cfg_text():
    assert _efi.grub_cfg(UUID) == (
        "# Written by osimage.builder.grub_efi_install: find the filesystem that holds\n"
        "# /boot/grub by its UUID and run the GRUB configuration there.\n"
        f"search --no-floppy --fs-uuid --set=root {UUID}\n"
        "set prefix=($root)/boot/grub\n"
        "configfile $prefix/grub.cfg\n"
    )
    assert "set prefix=($root)/grub\n" in _efi.grub_cfg(UUID, "/grub")
    assert "set prefix=($root)\n" in _efi.grub_cfg(UUID, "/")
    assert _efi.is_our_cfg(_efi.grub_cfg(UUID).encode())
    assert not _efi.is_our_cfg(b"search --fs-uuid ...\n") and not _efi.is_our_cfg(None)


@pytest.mark.parametrize("value, expected", [
    (UUID.upper(), UUID),
    (f" {UUID} ", UUID),
    ("0f0e0d0c0b0a49088706050403020100", UUID),
    ("1a2b-3c4d", "1A2B-3C4D"),
])
def test_root_uuid_is_normalised(value, expected):
    assert _efi.check_root_uuid(value) == expected


@pytest.mark.parametrize("value", ["", None, "root", "1a2b3c4d", "0f0e0d0c-0b0a-4908-8706-05040302010", "x; halt"])
def test_bad_root_uuid_names_the_option(value):
    with pytest.raises(BuildError) as info:
        _efi.check_root_uuid(value)
    assert info.value.option == "root_uuid"
    with pytest.raises(BuildError) as info:
        _efi.check_root_uuid(value, "boot_partition")
    assert info.value.option == "boot_partition"


@pytest.mark.parametrize("value, expected", [("/boot/grub", "/boot/grub"), ("/grub/", "/grub"), ("/", "/"),
                                             ("/boot/grub2", "/boot/grub2")])
def test_prefix(value, expected):
    assert _efi.check_prefix(value) == expected


@pytest.mark.parametrize("value", ["boot/grub", "", None, "/boot grub", "/boot/$x", "/a/../b", "//boot", "/boot/./grub",
                                   "/boot;halt", '/boot"'])
def test_bad_prefix(value):
    with pytest.raises(BuildError) as info:
        _efi.check_prefix(value)
    assert info.value.option == "prefix"


# ---------------------------------------------------------------- grub-mkimage

def test_module_list():
    assert _efi.efi_modules() == list(_efi.EFI_MODULES)
    assert _efi.efi_modules(["btrfs", "ext2", "lvm.mod", "lvm"]) == list(_efi.EFI_MODULES) + ["btrfs", "lvm"]
    # What a Linux boot from GPT or MBR ESPs needs is always built in.
    for name in ("part_gpt", "part_msdos", "fat", "ext2", "normal", "configfile", "search", "linux", "serial", "terminal"):
        assert name in _efi.EFI_MODULES


@pytest.mark.parametrize("bad", ["", "a b", "../x", None, 3])
def test_bad_module_names(bad):
    with pytest.raises(BuildError) as info:
        _efi.efi_modules([bad])
    assert info.value.option == "modules"


def test_mkimage_argv():
    assert _efi.mkimage_argv("grub-mkimage", "/g", "/tmp/o.efi", ["fat", "normal"]) == [
        "grub-mkimage", "-O", "x86_64-efi", "-d", "/g", "-o", "/tmp/o.efi", "-p", "/EFI/BOOT", "fat", "normal"]


def test_mkimage_output_is_deterministic_and_unsigned(tmp_path):
    mkimage = _tool("grub-mkimage")
    if not os.path.isfile(os.path.join(_efi.DEFAULT_GRUB_DIR, "kernel.img")):
        pytest.fail("grub-efi-amd64-bin is not installed: run scripts/install-system-packages")
    outputs = []
    for name in ("a.efi", "b.efi"):
        path = str(tmp_path / name)
        subprocess.run(_efi.mkimage_argv(mkimage, _efi.DEFAULT_GRUB_DIR, path, _efi.efi_modules()), check=True)
        with open(path, "rb") as handle:
            outputs.append(handle.read())
    assert outputs[0] == outputs[1]
    info = _efi.pe_info(outputs[0])
    assert info == {"machine": 0x8664, "x86_64": True, "signature_bytes": 0}
    with pytest.raises(BuildError, match="no Authenticode signature") as err:
        _efi.check_signed_efi(outputs[0], "a.efi", "shim", "shim", "shim-signed")
    assert err.value.option == "shim"


# ---------------------------------------------------------------- the file plan

def test_file_plan_without_secure_boot():
    files, stale = _efi.file_plan(_efi.grub_cfg(UUID), b"GRUB", "mkimage")
    assert [(f.path, f.data, f.source) for f in files] == [
        ("EFI/BOOT/BOOTX64.EFI", b"GRUB", "mkimage"), ("EFI/BOOT/grub.cfg", _efi.grub_cfg(UUID).encode(), "generated")]
    assert stale == ["EFI/BOOT/grubx64.efi", "EFI/BOOT/mmx64.efi", "EFI/debian/grub.cfg"]
    assert files[0].directory == "EFI/BOOT" and files[0].name == "BOOTX64.EFI"


def test_file_plan_with_secure_boot():
    cfg = _efi.grub_cfg(UUID)
    files, stale = _efi.file_plan(cfg, b"SHIM", "/t/shim", b"SGRUB", "/t/grub", b"MM", "/t/mm")
    assert [(f.path, f.data) for f in files] == [
        ("EFI/BOOT/BOOTX64.EFI", b"SHIM"), ("EFI/BOOT/grubx64.efi", b"SGRUB"), ("EFI/BOOT/mmx64.efi", b"MM"),
        ("EFI/BOOT/grub.cfg", cfg.encode()), ("EFI/debian/grub.cfg", cfg.encode())]
    assert stale == []
    files, stale = _efi.file_plan(cfg, b"SHIM", "/t/shim", b"SGRUB", "/t/grub")
    assert "EFI/BOOT/mmx64.efi" not in [f.path for f in files] and stale == ["EFI/BOOT/mmx64.efi"]


def test_directories_parents_first():
    assert _efi.directories(["EFI/debian/grub.cfg", "EFI/BOOT/BOOTX64.EFI", "EFI/BOOT/grub.cfg"]) == [
        "EFI", "EFI/BOOT", "EFI/debian"]
    assert _efi.directories([]) == []


def test_describe():
    assert _efi.describe(None) == "absent"
    assert _efi.describe(b"abc") == "3 bytes, sha256 ba7816bf8f01cfea"


# ---------------------------------------------------------------- PE


def _pe(machine=0x8664, magic=0x20B, signature=(0, 0), dirs=16, size=4096):
    data = bytearray(size)
    data[0:2] = b"MZ"
    struct.pack_into("<I", data, 0x3C, 0x80)
    data[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<H", data, 0x84, machine)
    optional = 0x80 + 24
    struct.pack_into("<H", data, 0x80 + 20, 240 if magic == 0x20B else 224)
    struct.pack_into("<H", data, optional, magic)
    count_at, dirs_at = (optional + 108, optional + 112) if magic == 0x20B else (optional + 92, optional + 96)
    struct.pack_into("<I", data, count_at, dirs)
    struct.pack_into("<II", data, dirs_at + 4 * 8, *signature)
    return bytes(data)


def test_pe_info():
    assert _efi.pe_info(_pe()) == {"machine": 0x8664, "x86_64": True, "signature_bytes": 0}
    assert _efi.pe_info(_pe(signature=(2048, 1024)))["signature_bytes"] == 1024
    assert _efi.pe_info(_pe(signature=(4000, 1024)))["signature_bytes"] == 0  # past the end of the file
    assert _efi.pe_info(_pe(magic=0x10B, machine=0x14C, signature=(2048, 8)))["signature_bytes"] == 8
    assert _efi.pe_info(_pe(dirs=4, signature=(2048, 8)))["signature_bytes"] == 0
    assert _efi.pe_info(b"MZ" + bytes(100)) is None
    assert _efi.pe_info(b"\x7fELF" + bytes(100)) is None
    assert _efi.pe_info(_pe(magic=0x999)) is None


def test_check_signed_efi():
    _efi.check_signed_efi(_pe(signature=(2048, 1024)), "x", "shim", "shim", "shim-signed")
    for data, text in ((b"#!/bin/sh\n", "not an EFI binary"), (_pe(machine=0xAA64, signature=(2048, 1)), "not x86-64"),
                       (_pe(), "no Authenticode signature")):
        with pytest.raises(BuildError, match=text) as info:
            _efi.check_signed_efi(data, "/t/grub", "GRUB", "signed_grub", "grub-efi-amd64-signed")
        assert info.value.option == "signed_grub" and "grub-efi-amd64-signed" in info.value.message


# ---------------------------------------------------------------- FAT free space

@pytest.mark.parametrize("size_kib, bits", [(1024, 12), (16 * 1024, 16), (40 * 1024, 32)])
def test_fat_free_clusters_match_mtools(tmp_path, size_kib, bits):
    image = str(tmp_path / "fat.img")
    with open(image, "wb") as handle:
        handle.truncate(size_kib * 1024)
    subprocess.run([_tool("mkfs.fat"), "-F", str(bits), image], check=True, capture_output=True)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(300_000))
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1", MTOOLSRC="/dev/null", LC_ALL="C")
    subprocess.run([_tool("mcopy"), "-i", image, str(payload), "::/payload.bin"], check=True, env=env)
    subprocess.run([_tool("mmd"), "-i", image, "::/EFI"], check=True, env=env)

    def read(offset, length):
        with open(image, "rb") as handle:
            handle.seek(offset)
            return handle.read(length)

    info = probe_fat(read, 0)
    assert info["fat_bits"] == bits
    listing = subprocess.run([_tool("mdir"), "-i", image, "::/"], check=True, env=env, capture_output=True, text=True).stdout
    free_line = [line for line in listing.splitlines() if "bytes free" in line][0]
    free_bytes = int(free_line.replace("bytes free", "").replace(" ", ""))
    assert _efi.fat_free_clusters(read, 0, info) * info["cluster_size"] == free_bytes
    assert _efi.clusters_for(300_000, info["cluster_size"]) <= info["clusters"] - _efi.fat_free_clusters(read, 0, info)


# ---------------------------------------------------------------- mtools

def test_mtools_argv_and_listing():
    assert _efi.mdir_argv("mdir", "d@@1048576", "EFI", True) == ["mdir", "-/", "-a", "-b", "-i", "d@@1048576", "::/EFI"]
    assert _efi.mdir_argv("mdir", "d@@1048576", "") == ["mdir", "-a", "-b", "-i", "d@@1048576", "::/"]
    assert _efi.mread_argv("mcopy", "d@@0", "EFI/BOOT/grub.cfg") == ["mcopy", "-n", "-i", "d@@0", "::/EFI/BOOT/grub.cfg", "-"]
    assert _efi.mdel_argv("mdel", "d", ["EFI/BOOT/a", "EFI/b"]) == ["mdel", "-i", "d", "::/EFI/BOOT/a", "::/EFI/b"]
    text = "::/EFI/BOOT/\n::/EFI/BOOT/BOOTX64.EFI\n::/EFI/BOOT/grub.cfg\n::/EFI/debian/\n::/EFI/debian/Grub.CFG\n"
    assert _efi.parse_mdir(text) == {
        "efi/boot": "EFI/BOOT", "efi/boot/bootx64.efi": "EFI/BOOT/BOOTX64.EFI",
        "efi/boot/grub.cfg": "EFI/BOOT/grub.cfg", "efi/debian": "EFI/debian", "efi/debian/grub.cfg": "EFI/debian/Grub.CFG"}
    assert _efi.parse_mdir("") == {}
    assert _efi.parse_mdir("::/EFI/\n::/.hidden\n") == {"efi": "EFI", ".hidden": ".hidden"}
