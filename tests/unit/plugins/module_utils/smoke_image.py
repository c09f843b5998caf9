# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Test helper: build a tiny bootable GRUB "smoke" image without root, loop devices or mounts.

The image prints ``MARKER root=$root`` on the serial console and then powers
off (``halt``), hangs (``sleep``) or never gets that far (no boot code at all).
Only host tools are used: ``sfdisk`` for the table, ``mke2fs -d -E offset=``
(BIOS) or ``mkfs.vfat --offset`` + ``mcopy -i img@@offset`` (UEFI) for the
filesystem, ``grub-mkimage`` for core.img / BOOTX64.EFI, and
``plugins/module_utils/_bootcode.py`` for the boot code writes (the bytes
``grub-install --no-rs-codes`` writes). It does not use the collection's modules,
so boot_test's tests do not depend on them.

Also a script, for the integration target::

    python smoke_image.py OUT.img [--label msdos|gpt] [--marker TEXT] [--after halt|hang] [--no-boot-code]
                              [--firmware bios|uefi] [--signed-root DIR]

Run as a script it finds the collection through its own path
(``.../ansible_collections/osimage/builder/tests/...``) or PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

GRUB_PC_DIR = "/usr/lib/grub/i386-pc"
GRUB_EFI_DIR = "/usr/lib/grub/x86_64-efi"
MIB = 1024 * 1024
SECTOR = 512
BIOS_BOOT_GUID = "21686148-6449-6E6F-744E-656564454649"
LINUX_FS_GUID = "0FC63DAF-8483-4772-8E3D-3D69D8477DE4"
ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
FS_UUID = "5e0c0ffe-0000-4000-8000-00000000b007"
DISK_GUID = "5E0C0FFE-0000-4000-8000-000000000D15"
AFTER = ("halt", "hang")
# Modules built into the UEFI GRUB image: everything grub.cfg needs, since the
# ESP carries no x86_64-efi/*.mod to load them from.
EFI_MODULES = ["part_gpt", "fat", "normal", "configfile", "echo", "serial", "terminal", "halt", "sleep", "test"]


def _bootcode():
    # Imported late so that ``--help`` works before the collection is on sys.path.
    from ansible_collections.osimage.builder.plugins.module_utils import _bootcode  # pylint: disable=import-outside-toplevel

    return _bootcode


def _run(argv, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1", LC_ALL="C")
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env, check=False, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with rc={proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def grub_cfg(marker: str, after: str = "halt") -> str:
    """The grub.cfg of the smoke image: serial console, the marker, then power off or hang."""
    if after not in AFTER:
        raise ValueError(f"after must be one of {AFTER}, got {after!r}")
    if '"' in marker or "\\" in marker or "$" in marker or "\n" in marker:
        raise ValueError(f"marker {marker!r} must not contain quotes, backslashes, $ or newlines")
    lines = [
        "serial --unit=0 --speed=115200",
        "terminal_input serial console",
        "terminal_output serial console",
        f'echo "{marker} root=$root"',
    ]
    # GRUB's sleep counts seconds; an hour is "forever" for a test with a timeout.
    lines.append("halt" if after == "halt" else "sleep 3600")
    return "\n".join(lines) + "\n"


def _sfdisk_script(label: str, firmware: str) -> str:
    if firmware == "uefi":
        if label != "gpt":
            raise ValueError("the UEFI smoke image needs label='gpt'")
        return f"label: gpt\nlabel-id: {DISK_GUID}\nstart=2048, type={ESP_GUID}, name=esp\n"
    if label == "msdos":
        return "label: dos\nlabel-id: 0x5e0c0ffe\nstart=2048, type=83, bootable\n"
    if label == "gpt":
        return (f"label: gpt\nlabel-id: {DISK_GUID}\n"
                f"start=2048, size=2048, type={BIOS_BOOT_GUID}, name=bios\n"
                f"start=4096, type={LINUX_FS_GUID}, name=boot\n")
    raise ValueError(f"label must be 'msdos' or 'gpt', got {label!r}")


def _partitions(path: str) -> list:
    table = json.loads(_run(["sfdisk", "--json", path]).stdout)["partitiontable"]
    parts = []
    for entry in table["partitions"]:
        node = entry["node"]
        digits = len(node) - len(node.rstrip("0123456789"))
        parts.append({"number": int(node[-digits:]), "type": entry["type"].upper(),
                      "start_sector": int(entry["start"]), "sectors": int(entry["size"])})
    return parts


def _copy_grub_modules(grub_dir: str, dest: str) -> None:
    os.makedirs(dest)
    for name in sorted(os.listdir(grub_dir)):
        if name.endswith((".mod", ".lst")):
            shutil.copy2(os.path.join(grub_dir, name), os.path.join(dest, name))


def _write_at(path: str, writes) -> None:
    with open(path, "r+b") as f:
        for offset, data in writes:
            f.seek(offset)
            f.write(data)


def _bios_image(path: str, label: str, cfg: str, boot_code: bool, work: str) -> None:
    bc = _bootcode()
    parts = _partitions(path)
    boot = parts[-1]
    tree = os.path.join(work, "tree")
    _copy_grub_modules(GRUB_PC_DIR, os.path.join(tree, "boot", "grub", "i386-pc"))
    with open(os.path.join(tree, "boot", "grub", "grub.cfg"), "w") as f:
        f.write(cfg)
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "smoke", "-U", FS_UUID, "-d", tree,
          "-E", f"offset={boot['start_sector'] * SECTOR}", path, f"{boot['sectors'] * SECTOR // 1024}k"])
    if not boot_code:
        return
    core_path = os.path.join(work, "core.img")
    modules = bc.core_modules(label, "ext4")
    prefix = bc.grub_prefix(label, boot["number"])
    _run(bc.mkimage_argv("grub-mkimage", GRUB_PC_DIR, core_path, prefix, modules))
    with open(os.path.join(GRUB_PC_DIR, "boot.img"), "rb") as f:
        boot_img = f.read()
    with open(core_path, "rb") as f:
        core_img = f.read()
    with open(path, "rb") as f:
        sector0 = f.read(SECTOR)
    area = bc.embedding_area(label, parts)
    _write_at(path, bc.install_writes(boot_img, core_img, sector0, area))


SIGNED_SHIM = "usr/lib/shim/shimx64.efi.signed"  # shim-signed (signed by Microsoft)
SIGNED_GRUB = "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"  # grub-efi-amd64-signed (signed by Debian)


def signed_boot_files(root: str = "/") -> dict | None:
    """Debian's signed shim, GRUB and newest kernel under ``root`` (a system or an unpacked .deb tree), or None.

    ``root`` may hold the files installed (shim-signed, grub-efi-amd64-signed,
    linux-image-*-amd64) or the same packages unpacked with ``dpkg-deb -x``.
    """
    shim = os.path.join(root, SIGNED_SHIM)
    grub = os.path.join(root, SIGNED_GRUB)
    boot = os.path.join(root, "boot")
    kernels = sorted(n for n in os.listdir(boot) if n.startswith("vmlinuz-")) if os.path.isdir(boot) else []
    if not (os.path.isfile(shim) and os.path.isfile(grub) and kernels):
        return None
    return {"shim": shim, "grub": grub, "kernel": os.path.join(boot, kernels[-1])}


def signed_grub_cfg(marker: str) -> str:
    """grub.cfg for the signed chain: the marker, then the kernel, which panics (no root) and resets."""
    return grub_cfg(marker, "halt").replace("halt\n", "linux /vmlinuz console=ttyS0,115200 panic=-1\nboot\n")


def _uefi_image(path: str, cfg: str, boot_code: bool, work: str, signed: dict | None = None) -> None:
    esp = _partitions(path)[0]
    _run(["mkfs.vfat", f"--offset={esp['start_sector']}", "-n", "SMOKE-ESP", "-i", "5E0C0FFE", path, str(esp["sectors"] * SECTOR // 1024)])
    target = f"{path}@@{esp['start_sector'] * SECTOR}"
    _run(["mmd", "-i", target, "::/EFI", "::/EFI/BOOT"])
    cfg_path = os.path.join(work, "grub.cfg")
    with open(cfg_path, "w") as f:
        f.write(cfg)
    files = [cfg_path]
    if signed:
        # shim (removable path) loads grubx64.efi from its own directory; Debian's signed GRUB
        # has prefix /EFI/debian and falls back to $cmdpath/grub.cfg when that is missing.
        for src, name in ((signed["shim"], "BOOTX64.EFI"), (signed["grub"], "grubx64.efi")):
            shutil.copyfile(src, os.path.join(work, name))
            files.append(os.path.join(work, name))
        kernel = os.path.join(work, "vmlinuz")
        shutil.copyfile(signed["kernel"], kernel)
        _run(["mcopy", "-i", target, kernel, "::/vmlinuz"])
    elif boot_code:
        efi = os.path.join(work, "BOOTX64.EFI")
        _run(["grub-mkimage", "-O", "x86_64-efi", "-d", GRUB_EFI_DIR, "-o", efi, "-p", "/EFI/BOOT"] + EFI_MODULES)
        files.append(efi)
    _run(["mcopy", "-i", target] + files + ["::/EFI/BOOT/"])


def build_smoke_image(path: str, label: str = "msdos", marker: str = "SMOKE-OK", after: str = "halt",
                      boot_code: bool = True, firmware: str = "bios", size_mib: int = 64,
                      signed: dict | None = None) -> str:
    """Build the smoke image at ``path`` (replaced if it exists) and return ``path``.

    ``label``: ``msdos`` (core.img in the MBR gap) or ``gpt`` (core.img in a
    bios_grub partition); ``firmware='uefi'`` needs ``gpt`` and makes a single
    ESP with ``EFI/BOOT/BOOTX64.EFI`` (needs grub-efi-amd64-bin).
    ``after``: ``halt`` powers the VM off after the marker, ``hang`` sleeps an
    hour instead. ``boot_code=False`` leaves out the boot code: nothing boots
    and the serial console stays silent. ``signed`` (from signed_boot_files(),
    UEFI only) boots Debian's signed shim -> GRUB -> kernel instead, which
    passes Secure Boot: the kernel prints "Secure boot enabled" and, having no
    root filesystem, panics and resets (QEMU exits).
    """
    if firmware not in ("bios", "uefi"):
        raise ValueError(f"firmware must be 'bios' or 'uefi', got {firmware!r}")
    grub_dir = GRUB_PC_DIR if firmware == "bios" else GRUB_EFI_DIR
    if not os.path.isdir(grub_dir):
        raise RuntimeError(f"{grub_dir} is missing: install {'grub-pc-bin' if firmware == 'bios' else 'grub-efi-amd64-bin'}")
    if signed and firmware != "uefi":
        raise ValueError("signed boot files need firmware='uefi'")
    cfg = signed_grub_cfg(marker) if signed else grub_cfg(marker, after)
    script = _sfdisk_script(label, firmware)
    work = tempfile.mkdtemp(prefix="smoke-image-")
    tmp_image = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp_image, "wb") as f:
            f.truncate(size_mib * MIB)
        _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", tmp_image], input=script)
        if firmware == "bios":
            _bios_image(tmp_image, label, cfg, boot_code, work)
        else:
            _uefi_image(tmp_image, cfg, boot_code, work, signed)
        os.replace(tmp_image, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if os.path.exists(tmp_image):
            os.unlink(tmp_image)
    return path


def _make_importable() -> None:
    """Put the directory above ``ansible_collections`` on sys.path (script use)."""
    here = os.path.dirname(os.path.abspath(__file__))
    parts = here.split(os.sep)
    if "ansible_collections" in parts:
        index = len(parts) - 1 - parts[::-1].index("ansible_collections")
        root = os.sep.join(parts[:index]) or os.sep
        if root not in sys.path:
            sys.path.insert(0, root)
        return
    # A plain checkout (not under ansible_collections/osimage/builder): link one, like conftest.py.
    collection = os.sep.join(parts[:-4])
    root = os.path.join(tempfile.gettempdir(), f"pytest-collections-osimage-builder-{os.getuid()}")
    link = os.path.join(root, "ansible_collections", "osimage", "builder")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.realpath(link) != os.path.realpath(collection):
        tmp_link = f"{link}.{os.getpid()}"
        os.symlink(collection, tmp_link)
        os.replace(tmp_link, link)
    sys.path.insert(0, root)


def main(argv=None) -> int:
    import argparse  # pylint: disable=import-outside-toplevel

    parser = argparse.ArgumentParser(description="Build a tiny GRUB smoke image that prints a marker on the serial console.")
    parser.add_argument("path")
    parser.add_argument("--label", choices=["msdos", "gpt"], default="msdos")
    parser.add_argument("--marker", default="SMOKE-OK")
    parser.add_argument("--after", choices=AFTER, default="halt")
    parser.add_argument("--firmware", choices=["bios", "uefi"], default="bios")
    parser.add_argument("--no-boot-code", dest="boot_code", action="store_false")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--signed-root", help="boot Debian's signed shim, GRUB and kernel found under this root (UEFI)")
    args = parser.parse_args(argv)
    signed = None
    if args.signed_root:
        signed = signed_boot_files(args.signed_root)
        if signed is None:
            parser.error(f"no {SIGNED_SHIM}, {SIGNED_GRUB} and boot/vmlinuz-* under {args.signed_root}")
    try:
        import ansible_collections.osimage.builder.plugins.module_utils._bootcode  # noqa: F401 pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        _make_importable()
    build_smoke_image(args.path, label=args.label, marker=args.marker, after=args.after,
                      boot_code=args.boot_code, firmware=args.firmware, size_mib=args.size_mib, signed=signed)
    print(json.dumps({"path": args.path, "label": args.label, "marker": args.marker, "after": args.after,
                      "boot_code": args.boot_code, "firmware": args.firmware}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
