# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""grub_efi_install on real images: built through the collection's module_utils
(disk_image, partition_table, filesystem), checked with mtools and fsck.vfat, and
booted under OVMF (plain, and with Secure Boot enforced).

The Secure Boot tests need Debian's signed shim and GRUB. They are downloaded once
with ``apt-get download`` (never installed) into /var/cache/osimage-test/debs (or
$OSIMAGE_TEST_CACHE/debs) and unpacked with ``dpkg-deb -x``; when that fails the
tests fail. Missing host tools (mtools, dosfstools, grub-efi-amd64-bin, qemu, ovmf)
fail the tests too.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import time

import pytest

from ansible_collections.osimage.builder.plugins.module_utils import _efi, _grub_efi_install
from ansible_collections.osimage.builder.plugins.module_utils import _qemu as q
from ansible_collections.osimage.builder.plugins.module_utils._boot_test import boot_test
from ansible_collections.osimage.builder.plugins.module_utils._disk_image import ensure_disk_image
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._filesystem import ensure_filesystem
from ansible_collections.osimage.builder.plugins.module_utils._grub_efi_install import install_grub_efi
from ansible_collections.osimage.builder.plugins.module_utils._image import Image
from ansible_collections.osimage.builder.plugins.module_utils._partition_table import ensure_partition_table
from ansible_collections.osimage.builder.plugins.module_utils._state import StateFile, state_path

MARKER = "EFI-SMOKE-OK"
EXPECT = MARKER + r" root=(\S+) lockdown=(\S*) shim_lock=(\S*);"
SEARCH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
EPOCH = 1_700_000_000
SIGNED_PACKAGES = ("shim-signed", "shim-helpers-amd64-signed", "grub-efi-amd64-signed")
# The root filesystem's grub.cfg: no kernel, just the marker (with what Secure Boot did to GRUB) and power off.
ROOT_GRUB_CFG = f"""serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
echo "{MARKER} root=$root lockdown=$lockdown shim_lock=$shim_lock;"
halt
"""


def _tool(name):
    found = shutil.which(name, path=SEARCH)
    if not found:
        pytest.fail(f"{name} is not installed: run scripts/install-system-packages")
    return found


def _env():
    return dict(os.environ, MTOOLS_SKIP_CHECK="1", MTOOLSRC="/dev/null", LC_ALL="C", TZ="UTC")


def _sha(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(autouse=True)
def _fixed_epoch(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(EPOCH))


@pytest.fixture(scope="session")
def uefi_tools():
    for name in ("mcopy", "mmd", "mdel", "mdir", "mkfs.fat", "fsck.vfat", "grub-mkimage", q.QEMU):
        _tool(name)
    if not os.path.isfile(os.path.join(_efi.DEFAULT_GRUB_DIR, "kernel.img")):
        pytest.fail("grub-efi-amd64-bin is not installed: run scripts/install-system-packages")
    for path in q.firmware_files(False) + q.firmware_files(True):
        if not os.path.isfile(path):
            pytest.fail(f"{path} is missing: install ovmf")


@pytest.fixture(scope="session")
def signed_tree(tmp_path_factory):
    """Debian's signed shim, MokManager and GRUB, downloaded once (cached) and unpacked, never installed."""
    cache = os.path.join(os.environ.get("OSIMAGE_TEST_CACHE") or "/var/cache/osimage-test", "debs")
    try:
        os.makedirs(cache, exist_ok=True)
    except PermissionError:
        cache = os.path.join(os.path.expanduser("~"), ".cache", "osimage-test", "debs")
        os.makedirs(cache, exist_ok=True)
    missing = [name for name in SIGNED_PACKAGES if not glob.glob(os.path.join(cache, f"{name}_*.deb"))]
    if missing:
        done = subprocess.run([_tool("apt-get"), "download"] + missing, cwd=cache, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.fail(f"apt-get download {' '.join(missing)} failed in {cache}: {done.stderr.strip() or done.stdout.strip()}")
    tree = tmp_path_factory.mktemp("signed-tree")
    for name in SIGNED_PACKAGES:
        debs = sorted(glob.glob(os.path.join(cache, f"{name}_*.deb")))
        if not debs:
            pytest.fail(f"no {name} package in {cache} after apt-get download")
        subprocess.run([_tool("dpkg-deb"), "-x", debs[-1], str(tree)], check=True)
    for relative in (_efi.SIGNED_SHIM, _efi.SIGNED_GRUB, "usr/lib/shim/" + _efi.MOK_MANAGER_NAME):
        assert os.path.isfile(tree / relative), relative
    return str(tree)


def _root_tree(path):
    os.makedirs(path / "boot" / "grub")
    (path / "boot" / "grub" / "grub.cfg").write_text(ROOT_GRUB_CFG)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (EPOCH, EPOCH))
    return str(path)


def _image(tmp_path, name="disk.raw", esp_size="64MiB", esp_type="esp", esp_fstype="vfat"):
    """gpt [esp vfat, root ext4 holding /boot/grub/grub.cfg], made by the collection's module_utils."""
    image = str(tmp_path / name)
    tree = tmp_path / f"{name}.tree"
    if not tree.exists():
        _root_tree(tree)
    ensure_disk_image(image, "128MiB", "present")
    ensure_partition_table(image, "gpt", [{"name": "esp", "type": esp_type, "size": esp_size}, {"name": "root"}])
    ensure_filesystem(image, "esp", esp_fstype)
    ensure_filesystem(image, "root", "ext4", source=str(tree))
    return image


def _esp_offset(image):
    with Image(image) as img:
        from ansible_collections.osimage.builder.plugins.module_utils._partition_table import find_partition, read_table
        part = find_partition(read_table(img), "esp", "esp_partition")
    return part.start_sector * 512, part.sectors * 512


def _mtools(image, *argv, check=True):
    offset, _size = _esp_offset(image)
    return subprocess.run([_tool(argv[0])] + ["-i", f"{image}@@{offset}"] + list(argv[1:]), capture_output=True,
                          env=_env(), check=check)


def _esp_file(image, path):
    done = _mtools(image, "mcopy", "-n", f"::/{path}", "-", check=False)
    return done.stdout if done.returncode == 0 else None


def _fsck(image, tmp_path):
    offset, size = _esp_offset(image)
    extracted = tmp_path / "esp-extracted.img"
    with open(image, "rb") as src, open(extracted, "wb") as dst:
        src.seek(offset)
        dst.write(src.read(size))
    return subprocess.run([_tool("fsck.vfat"), "-n", str(extracted)], capture_output=True, text=True, check=False)


# ---------------------------------------------------------------- plain UEFI

@pytest.mark.usefixtures("uefi_tools")
def test_install_boots_under_ovmf_and_reruns_are_no_ops(tmp_path):
    image = _image(tmp_path)
    root_uuid = ensure_filesystem(image, "root", "ext4", source=str(tmp_path / "disk.raw.tree"))["uuid"]
    before = _sha(image)
    check = install_grub_efi(image, "esp", boot_partition="root", check_mode=True)
    assert check["changed"] and _sha(image) == before
    assert check["written"] == ["EFI/BOOT/BOOTX64.EFI", "EFI/BOOT/grub.cfg"]
    assert check["diff"]["before"] == "EFI/BOOT/BOOTX64.EFI: absent\nEFI/BOOT/grub.cfg: absent\n"

    result = install_grub_efi(image, "esp", boot_partition="root")
    assert result["changed"] and result["written"] == check["written"] and result["removed"] == []
    assert result["root_uuid"] == root_uuid and result["esp_partition"] == 1 and result["secure_boot"] is False
    assert result["modules"] == list(_efi.EFI_MODULES)
    assert result["diff"]["after"] == check["diff"]["after"]
    assert f"search --no-floppy --fs-uuid --set=root {root_uuid}\n" in result["grub_cfg"]
    assert _esp_file(image, "EFI/BOOT/grub.cfg") == result["grub_cfg"].encode()
    efi = _esp_file(image, "EFI/BOOT/BOOTX64.EFI")
    assert hashlib.sha256(efi).hexdigest() == result["files"]["EFI/BOOT/BOOTX64.EFI"]["sha256"]
    assert _efi.pe_info(efi)["x86_64"] and "warnings" not in result

    listing = _mtools(image, "mdir", "-/", "::/").stdout.decode()
    assert "BOOTX64  EFI" in listing and "grub     cfg" in listing
    assert "2023-11-14  22:13" in listing  # SOURCE_DATE_EPOCH, also for the directories mmd made
    fsck = _fsck(image, tmp_path)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    after = _sha(image)
    again = install_grub_efi(image, "esp", boot_partition="root")
    assert not again["changed"] and again["written"] == [] and again["diff"]["before"] == again["diff"]["after"]
    assert not install_grub_efi(image, "esp", root_uuid=root_uuid.upper(), check_mode=True)["changed"]
    # The filesystem module still recognises the ESP (and the root) as its own.
    assert not ensure_filesystem(image, "esp", "vfat")["changed"]
    assert not ensure_filesystem(image, "root", "ext4", source=str(tmp_path / "disk.raw.tree"))["changed"]
    assert _sha(image) == after

    booted = boot_test(image, firmware="uefi", accel="tcg", expect=EXPECT, timeout=120)
    assert booted["booted"] and f"{MARKER} root=hd0,gpt2 lockdown= shim_lock=;" in booted["log_tail"]
    assert booted["seconds"] < 60
    assert _sha(image) == after


@pytest.mark.usefixtures("uefi_tools")
def test_two_builds_are_identical(tmp_path):
    first = _image(tmp_path, "one.raw")
    install_grub_efi(first, "esp", boot_partition="root")
    time.sleep(2.1)  # FAT times have a 2-second resolution
    second = _image(tmp_path, "two.raw")
    install_grub_efi(second, "esp", boot_partition="root")
    assert _sha(first) == _sha(second)


@pytest.mark.usefixtures("uefi_tools")
def test_without_source_date_epoch_the_timestamp_comes_from_grub(tmp_path, monkeypatch):
    image = _image(tmp_path)
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    install_grub_efi(image, "esp", boot_partition="root")
    newest = max(int(os.stat(os.path.join(_efi.DEFAULT_GRUB_DIR, f"{name}.mod")).st_mtime) for name in _efi.EFI_MODULES)
    newest = max(newest, int(os.stat(os.path.join(_efi.DEFAULT_GRUB_DIR, "kernel.img")).st_mtime))
    stamp = time.strftime("%Y-%m-%d", time.gmtime(newest))
    listing = _mtools(image, "mdir", "::/EFI/BOOT").stdout.decode()
    assert stamp in [line for line in listing.splitlines() if line.startswith("BOOTX64")][0]


@pytest.mark.usefixtures("uefi_tools")
def test_only_what_differs_is_written(tmp_path):
    image = _image(tmp_path)
    install_grub_efi(image, "esp", boot_partition="root")
    other = "5e0c0ffe-0000-4000-8000-00000000b007"
    result = install_grub_efi(image, "esp", root_uuid=other)
    assert result["changed"] and result["written"] == ["EFI/BOOT/grub.cfg"]
    assert other in _esp_file(image, "EFI/BOOT/grub.cfg").decode()
    # Extra modules change BOOTX64.EFI only.
    result = install_grub_efi(image, "esp", root_uuid=other, modules=["btrfs"])
    assert result["written"] == ["EFI/BOOT/BOOTX64.EFI"] and result["modules"][-1] == "btrfs"
    assert not ensure_filesystem(image, "esp", "vfat")["changed"]
    fsck = _fsck(image, tmp_path)
    assert fsck.returncode == 0, fsck.stdout


@pytest.mark.usefixtures("uefi_tools")
def test_a_file_changed_behind_our_back_is_rewritten(tmp_path):
    image = _image(tmp_path)
    install_grub_efi(image, "esp", boot_partition="root")
    junk = tmp_path / "BOOTX64.EFI"
    junk.write_bytes(b"MZ not GRUB")
    _mtools(image, "mcopy", "-o", str(junk), "::/EFI/BOOT/BOOTX64.EFI")
    result = install_grub_efi(image, "esp", boot_partition="root", check_mode=True)
    assert result["changed"] and result["written"] == ["EFI/BOOT/BOOTX64.EFI"]
    assert "EFI/BOOT/BOOTX64.EFI: 11 bytes" in result["diff"]["before"]
    result = install_grub_efi(image, "esp", boot_partition="root")
    assert result["written"] == ["EFI/BOOT/BOOTX64.EFI"]
    assert not install_grub_efi(image, "esp", boot_partition="root")["changed"]
    # That mcopy was not ours: the filesystem module's record is not refreshed over it.
    with pytest.raises(BuildError, match="force"):
        ensure_filesystem(image, "esp", "vfat")


@pytest.mark.usefixtures("uefi_tools")
def test_an_interrupted_install_lets_the_filesystem_module_rebuild(tmp_path, monkeypatch):
    image = _image(tmp_path)
    real_check = _grub_efi_install._Mtools.check
    calls = []

    def dies_after_the_first_command(self, argv, what):
        if calls:
            raise KeyboardInterrupt  # killed halfway
        calls.append(what)
        real_check(self, argv, what)

    monkeypatch.setattr(_grub_efi_install._Mtools, "check", dies_after_the_first_command)
    with pytest.raises(KeyboardInterrupt):
        install_grub_efi(image, "esp", boot_partition="root")
    monkeypatch.undo()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(EPOCH))
    assert StateFile(state_path(image)).get(2048)["installing"] is True
    rebuilt = ensure_filesystem(image, "esp", "vfat")
    assert rebuilt["changed"] and "interrupted" in rebuilt["diff"]["before"]
    assert install_grub_efi(image, "esp", boot_partition="root")["changed"]
    assert "installing" not in StateFile(state_path(image)).get(2048)
    assert not ensure_filesystem(image, "esp", "vfat")["changed"]


@pytest.mark.usefixtures("uefi_tools")
def test_an_esp_not_made_by_the_filesystem_module(tmp_path):
    image = str(tmp_path / "foreign.raw")
    ensure_disk_image(image, "96MiB", "present")
    ensure_partition_table(image, "gpt", [{"name": "esp", "type": "esp", "size": "40MiB"}, {"name": "root"}])
    offset, size = _esp_offset(image)
    subprocess.run([_tool("mkfs.fat"), "-F", "32", f"--offset={offset // 512}", image, str(size // 1024)], check=True,
                   capture_output=True)
    result = install_grub_efi(image, "esp", root_uuid="1A2B-3C4D")
    assert result["changed"] and not os.path.exists(state_path(image))
    assert not install_grub_efi(image, "esp", root_uuid="1a2b-3c4d")["changed"]
    assert _fsck(image, tmp_path).returncode == 0


@pytest.mark.usefixtures("uefi_tools")
@pytest.mark.parametrize("made, stored", [
    (["::/EFI"], "::/EFI/BOOT"),  # EFI empty: mdir says "not found" about it
    (["::/efi", "::/efi/boot"], "::/efi/boot"),
    (["::/EFI", "::/EFI/Boot", "::/EFI/debian"], "::/EFI/Boot"),
])
def test_directories_that_exist_already_in_any_case(tmp_path, made, stored):
    image = _image(tmp_path)
    _mtools(image, "mmd", *made)
    result = install_grub_efi(image, "esp", boot_partition="root")
    assert result["changed"] and result["written"] == ["EFI/BOOT/BOOTX64.EFI", "EFI/BOOT/grub.cfg"]
    assert not install_grub_efi(image, "esp", boot_partition="root")["changed"]
    assert _esp_file(image, "EFI/BOOT/grub.cfg") == result["grub_cfg"].encode()
    listing = _mtools(image, "mdir", "-/", "-b", "::/").stdout.decode().splitlines()
    assert f"{stored}/grub.cfg" in listing and f"{stored}/BOOTX64.EFI" in listing
    assert _fsck(image, tmp_path).returncode == 0


@pytest.mark.usefixtures("uefi_tools")
def test_warns_when_the_partition_type_is_not_esp(tmp_path):
    image = _image(tmp_path, esp_type="linux")
    result = install_grub_efi(image, "esp", boot_partition="root")
    assert result["changed"] and "not the EFI system partition type" in result["warnings"][0]


# ---------------------------------------------------------------- check mode on what does not exist yet

@pytest.mark.usefixtures("uefi_tools")
def test_check_mode_before_the_image_or_its_esp_exists(tmp_path):
    missing = str(tmp_path / "later.raw")
    assert install_grub_efi(missing, "esp", boot_partition="root", check_mode=True)["changed"]
    assert not os.path.exists(missing)
    ensure_disk_image(missing, "96MiB", "present")
    assert "no partition table" in install_grub_efi(missing, "esp", boot_partition="root", check_mode=True)["msg"]
    ensure_partition_table(missing, "gpt", [{"name": "esp", "type": "esp", "size": "40MiB"}, {"name": "root"}])
    result = install_grub_efi(missing, "esp", boot_partition="root", check_mode=True)
    assert result["changed"] and "no filesystem yet" in result["msg"]
    ensure_filesystem(missing, "esp", "vfat")
    result = install_grub_efi(missing, "esp", boot_partition="root", check_mode=True)
    assert result["changed"] and "partition 2 holds no filesystem yet" in result["msg"]
    with pytest.raises(BuildError) as info:
        install_grub_efi(missing, "esp", boot_partition="root")
    assert info.value.option == "boot_partition"


# ---------------------------------------------------------------- errors: clear, and nothing written

@pytest.mark.usefixtures("uefi_tools")
def test_errors_name_the_option_and_leave_the_image_alone(tmp_path, signed_tree):
    image = _image(tmp_path)
    unsigned = tmp_path / "unsigned.efi"
    subprocess.run(_efi.mkimage_argv(_tool("grub-mkimage"), _efi.DEFAULT_GRUB_DIR, str(unsigned), ["fat"]), check=True)
    empty_grub = tmp_path / "no-grub"
    empty_grub.mkdir()
    cases = [
        ({"esp_partition": "root", "boot_partition": "root"}, "esp_partition", "holds ext4"),
        ({"esp_partition": "nope", "boot_partition": "root"}, "esp_partition", "there is no partition 'nope'"),
        ({"esp_partition": "", "boot_partition": "root"}, "esp_partition", "give the number"),
        ({"esp_partition": "esp"}, "root_uuid", "exactly one"),
        ({"esp_partition": "esp", "root_uuid": "x", "boot_partition": "root"}, "root_uuid", "exactly one"),
        ({"esp_partition": "esp", "root_uuid": "not-a-uuid"}, "root_uuid", "not a filesystem UUID"),
        ({"esp_partition": "esp", "boot_partition": "esp", "prefix": "boot/grub"}, "prefix", "not a GRUB directory"),
        ({"esp_partition": "esp", "boot_partition": "root", "secure_boot": True}, "tree", "shim-signed and grub-efi-amd64-signed"),
        ({"esp_partition": "esp", "boot_partition": "root", "secure_boot": True, "tree": str(tmp_path)}, "tree",
         "install shim-signed into the tree"),
        ({"esp_partition": "esp", "boot_partition": "root", "secure_boot": True, "tree": str(tmp_path / "nothing")}, "tree",
         "is not a directory"),
        ({"esp_partition": "esp", "boot_partition": "root", "secure_boot": True, "shim": str(unsigned),
          "signed_grub": os.path.join(signed_tree, _efi.SIGNED_GRUB)}, "shim", "no Authenticode signature"),
        ({"esp_partition": "esp", "boot_partition": "root", "secure_boot": True, "tree": signed_tree,
          "signed_grub": str(tmp_path / "missing.efi")}, "signed_grub", "does not exist"),
        ({"esp_partition": "esp", "boot_partition": "root", "secure_boot": True, "tree": signed_tree, "modules": ["btrfs"]},
         "modules", "cannot be added to the signed GRUB"),
        ({"esp_partition": "esp", "boot_partition": "root", "modules": ["no_such_module"]}, "modules", "grub-mkimage failed"),
        ({"esp_partition": "esp", "boot_partition": "root", "grub_dir": str(empty_grub)}, "grub_dir", "grub-efi-amd64-bin"),
        ({"esp_partition": "esp", "boot_partition": "root", "mkimage": str(tmp_path / "no-mkimage")}, "mkimage", "not found"),
    ]
    before = _sha(image)
    for kwargs, option, text in cases:
        with pytest.raises(BuildError) as info:
            install_grub_efi(image, **kwargs)
        assert info.value.option == option, (kwargs, str(info.value))
        assert text in info.value.message, (kwargs, str(info.value))
        assert _sha(image) == before, kwargs


@pytest.mark.usefixtures("uefi_tools")
def test_an_esp_too_small_fails_before_writing(tmp_path, signed_tree):
    image = _image(tmp_path, esp_size="4MiB")
    before = _sha(image)
    with pytest.raises(BuildError) as info:
        install_grub_efi(image, "esp", boot_partition="root", secure_boot=True, tree=signed_tree)
    assert info.value.option == "esp_partition" and "make the ESP bigger" in info.value.message
    assert _sha(image) == before
    assert install_grub_efi(image, "esp", boot_partition="root")["changed"]  # the plain GRUB fits


# ---------------------------------------------------------------- Secure Boot

@pytest.mark.usefixtures("uefi_tools")
def test_secure_boot_chain_boots_with_secure_boot_enforced(tmp_path, signed_tree):
    image = _image(tmp_path)
    result = install_grub_efi(image, "esp", boot_partition="root", secure_boot=True, tree=signed_tree)
    assert result["written"] == ["EFI/BOOT/BOOTX64.EFI", "EFI/BOOT/grubx64.efi", "EFI/BOOT/mmx64.efi",
                                 "EFI/BOOT/grub.cfg", "EFI/debian/grub.cfg"]
    assert result["modules"] == [] and result["secure_boot"] is True
    with open(os.path.join(signed_tree, _efi.SIGNED_SHIM), "rb") as handle:
        assert _esp_file(image, "EFI/BOOT/BOOTX64.EFI") == handle.read()
    assert _esp_file(image, "EFI/debian/grub.cfg") == _esp_file(image, "EFI/BOOT/grub.cfg") == result["grub_cfg"].encode()
    assert _fsck(image, tmp_path).returncode == 0
    assert not install_grub_efi(image, "esp", boot_partition="root", secure_boot=True, tree=signed_tree)["changed"]
    assert not ensure_filesystem(image, "esp", "vfat")["changed"]
    # Explicit paths give the same files.
    assert not install_grub_efi(image, "esp", boot_partition="root", secure_boot=True,
                                shim=os.path.join(signed_tree, _efi.SIGNED_SHIM),
                                signed_grub=os.path.join(signed_tree, _efi.SIGNED_GRUB))["changed"]

    after = _sha(image)
    booted = boot_test(image, firmware="uefi", secure_boot=True, accel="tcg", expect=EXPECT, timeout=120)
    # Debian's signed GRUB saw Secure Boot on: it enforces lockdown and verifies through shim.
    assert f"{MARKER} root=hd0,gpt2 lockdown=y shim_lock=y;" in booted["log_tail"]
    assert booted["seconds"] < 60 and "q35,smm=on" in booted["cmd"]
    # The same chain under plain OVMF: no lockdown.
    booted = boot_test(image, firmware="uefi", accel="tcg", expect=EXPECT, timeout=120)
    assert f"{MARKER} root=hd0,gpt2 lockdown= shim_lock=;" in booted["log_tail"]
    assert _sha(image) == after


@pytest.mark.usefixtures("uefi_tools")
def test_secure_boot_refuses_the_self_built_grub(tmp_path):
    image = _image(tmp_path)
    install_grub_efi(image, "esp", boot_partition="root")
    start = time.monotonic()
    with pytest.raises(BuildError) as info:
        boot_test(image, firmware="uefi", secure_boot=True, accel="tcg", expect=EXPECT, timeout=120)
    assert time.monotonic() - start < 60
    assert "Access Denied" in info.value.details["log_tail"]
    assert MARKER not in info.value.details["log_tail"]


@pytest.mark.usefixtures("uefi_tools")
def test_switching_modes_removes_the_other_modes_files(tmp_path, signed_tree):
    image = _image(tmp_path)
    install_grub_efi(image, "esp", boot_partition="root", secure_boot=True, tree=signed_tree)
    result = install_grub_efi(image, "esp", boot_partition="root")
    assert result["written"] == ["EFI/BOOT/BOOTX64.EFI"]
    assert result["removed"] == ["EFI/BOOT/grubx64.efi", "EFI/BOOT/mmx64.efi", "EFI/debian/grub.cfg"]
    assert "EFI/BOOT/grubx64.efi: absent" in result["diff"]["after"]
    for path in result["removed"]:
        assert _esp_file(image, path) is None
    assert not install_grub_efi(image, "esp", boot_partition="root")["changed"]
    assert _fsck(image, tmp_path).returncode == 0
    assert not ensure_filesystem(image, "esp", "vfat")["changed"]
    booted = boot_test(image, firmware="uefi", accel="tcg", expect=EXPECT, timeout=120)
    assert booted["booted"]
    # A grub.cfg in EFI/debian that this module did not write is left alone.
    theirs = tmp_path / "grub.cfg"
    theirs.write_text("configfile (hd0,gpt2)/boot/grub/grub.cfg\n")
    _mtools(image, "mcopy", str(theirs), "::/EFI/debian/grub.cfg")
    result = install_grub_efi(image, "esp", boot_partition="root")
    assert not result["changed"] and _esp_file(image, "EFI/debian/grub.cfg") == theirs.read_bytes()


# ---------------------------------------------------------------- the module

def _run_module(args, capsys, check_mode=False, diff=False):
    from ansible.module_utils.testing import patch_module_args  # pylint: disable=import-outside-toplevel

    from ansible_collections.osimage.builder.plugins.modules import grub_efi_install as module  # pylint: disable=import-outside-toplevel

    if check_mode:
        args = dict(args, _ansible_check_mode=True)
    if diff:
        args = dict(args, _ansible_diff=True)
    with patch_module_args(args):
        with pytest.raises(SystemExit) as exc:
            module.main()
    return exc.value.code, json.loads(capsys.readouterr().out)


@pytest.mark.usefixtures("uefi_tools")
def test_module(tmp_path, capsys):
    image = _image(tmp_path)
    rc, result = _run_module({"image": image, "esp_partition": "1", "boot_partition": "root"}, capsys, check_mode=True, diff=True)
    assert rc == 0 and result["changed"] and result["diff"]["after"]
    rc, result = _run_module({"image": image, "esp_partition": "esp", "boot_partition": "root"}, capsys)
    assert rc == 0 and result["changed"] and "diff" not in result
    rc, result = _run_module({"image": image, "esp_partition": "esp", "boot_partition": "root"}, capsys)
    assert rc == 0 and not result["changed"]
    rc, result = _run_module({"image": image, "esp_partition": "root", "boot_partition": "root"}, capsys)
    assert rc == 1 and result["option"] == "esp_partition" and result["msg"].startswith("esp_partition: ")
    rc, result = _run_module({"image": image, "esp_partition": "esp"}, capsys)
    assert rc == 1 and "one of the following is required" in result["msg"]
    rc, result = _run_module({"image": image, "esp_partition": "esp", "boot_partition": "root",
                              "root_uuid": "1A2B-3C4D"}, capsys)
    assert rc == 1 and "mutually exclusive" in result["msg"]
