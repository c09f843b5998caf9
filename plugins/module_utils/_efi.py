# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What goes onto an EFI system partition, and how: the small grub.cfg, the
``grub-mkimage -O x86_64-efi`` command line, the file plan of the removable boot
path (with and without Secure Boot), PE checks of the signed binaries, and the
free space of a FAT.

Pure: nothing here runs a program or touches a file (readers are passed in).

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import hashlib
import re
import struct
import typing as t
import uuid as uuidlib
from dataclasses import dataclass

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError

# The removable-media boot path (UEFI 2.x §3.5.1.1): firmware boots it without any NVRAM entry.
BOOT_DIR = "EFI/BOOT"
BOOT_FILE = "EFI/BOOT/BOOTX64.EFI"
BOOT_CFG = "EFI/BOOT/grub.cfg"
# shim loads its second stage from its own directory; MokManager when that fails to verify.
SHIM_GRUB = "EFI/BOOT/grubx64.efi"
SHIM_MOK_MANAGER = "EFI/BOOT/mmx64.efi"
# Debian's signed GRUB has the prefix /EFI/debian built in (and falls back to $cmdpath/grub.cfg).
DEBIAN_DIR = "EFI/debian"
DEBIAN_CFG = "EFI/debian/grub.cfg"

# Where Debian's packages install the signed binaries, relative to a root tree.
SIGNED_SHIM = "usr/lib/shim/shimx64.efi.signed"  # shim-signed (signed by Microsoft)
SIGNED_GRUB = "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"  # grub-efi-amd64-signed (signed by Debian)
MOK_MANAGER_NAME = "mmx64.efi.signed"  # shim-helpers-amd64-signed, beside the shim
SIGNED_PACKAGES = "shim-signed and grub-efi-amd64-signed"

DEFAULT_GRUB_DIR = "/usr/lib/grub/x86_64-efi"
DEFAULT_PREFIX = "/boot/grub"
MKIMAGE_PREFIX = "/EFI/BOOT"  # no device: GRUB takes the device it was loaded from, the ESP

# The modules built into the self-made BOOTX64.EFI. The ESP carries no x86_64-efi/*.mod
# and the root filesystem only carries what the tree staged, so everything a usual
# Linux boot needs is built in:
#   reach and read EFI/BOOT/grub.cfg:   part_gpt part_msdos fat normal configfile
#   find the root filesystem by UUID:   search search_fs_uuid ext2 (ext2/3/4)
#   the configuration language:         echo test (normal has set, if, menuentry)
#   boot Linux:                         linux (and initrd) gzio
#   consoles and video for the kernel:  serial terminal all_video (efi_gop, efi_uga)
#   commands common grub.cfg files use: loadenv (grubenv) halt reboot sleep
EFI_MODULES = (
    "part_gpt", "part_msdos", "fat", "ext2", "normal", "configfile", "search", "search_fs_uuid", "echo", "test",
    "linux", "gzio", "all_video", "serial", "terminal", "loadenv", "halt", "reboot", "sleep",
)

CFG_HEADER = "# Written by osimage.builder.grub_efi_install"

_FAT_ID_RE = re.compile(r"^[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}$")
_PREFIX_RE = re.compile(r"^/[A-Za-z0-9._+/-]*$")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

# PE/COFF (Microsoft PE format specification).
_IMAGE_FILE_MACHINE_AMD64 = 0x8664
_PE32 = 0x10B
_PE32_PLUS = 0x20B
_SECURITY_DIRECTORY = 4


def check_root_uuid(value: object, option: str = "root_uuid") -> str:
    """The UUID as GRUB's ``search --fs-uuid`` takes it; BuildError naming ``option``.

    A filesystem UUID (ext, btrfs, xfs) or a FAT volume id (``ABCD-1234``). GRUB
    compares case-insensitively; it is written lower-case (FAT ids upper-case, as blkid shows them).
    """
    text = str(value if value is not None else "").strip()
    if _FAT_ID_RE.match(text):
        return text.upper()
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        raise BuildError(f"{value!r} is not a filesystem UUID; give one like 0f0e0d0c-0b0a-4908-8706-050403020100 "
                         "(ext4, as blkid shows it) or a FAT volume id like 1A2B-3C4D", option=option)


def check_prefix(prefix: object) -> str:
    """GRUB's directory on the root filesystem: absolute, and nothing GRUB's shell would expand."""
    text = str(prefix if prefix is not None else "")
    if not _PREFIX_RE.match(text) or "//" in text or "/../" in text + "/" or "/./" in text + "/":
        raise BuildError(f"{prefix!r} is not a GRUB directory; give an absolute path of letters, digits and ._+-/, "
                         "like /boot/grub (or /grub when the partition is a separate /boot)", option="prefix")
    return text.rstrip("/") or "/"


def efi_modules(extra: t.Sequence[str] = ()) -> list[str]:
    """The modules of the self-built GRUB image: EFI_MODULES, then ``extra`` not already there."""
    modules = list(EFI_MODULES)
    for name in extra:
        if not isinstance(name, str) or not _MODULE_RE.match(name):
            raise BuildError(f"{name!r} is not a GRUB module name", option="modules")
        name = name[:-4] if name.endswith(".mod") else name
        if name not in modules:
            modules.append(name)
    return modules


def grub_cfg(root_uuid: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The grub.cfg on the ESP: find the root filesystem by UUID, then run its GRUB configuration."""
    return (
        f"{CFG_HEADER}: find the filesystem that holds\n"
        f"# {prefix} by its UUID and run the GRUB configuration there.\n"
        f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        f"set prefix=($root){prefix if prefix != '/' else ''}\n"
        "configfile $prefix/grub.cfg\n"
    )


def is_our_cfg(data: bytes | None) -> bool:
    """Whether a grub.cfg was written by this module (so it may be removed)."""
    return data is not None and data.startswith(CFG_HEADER.encode())


def mkimage_argv(program: str, grub_dir: str, output: str, modules: t.Sequence[str], prefix: str = MKIMAGE_PREFIX) -> list[str]:
    """``grub-mkimage -O x86_64-efi -d GRUB_DIR -o OUTPUT -p /EFI/BOOT MODULES...``."""
    return [program, "-O", "x86_64-efi", "-d", grub_dir, "-o", output, "-p", prefix] + list(modules)


@dataclass(frozen=True)
class PlannedFile:
    """One file the module puts onto the ESP."""

    path: str  # relative to the FAT's root, e.g. EFI/BOOT/BOOTX64.EFI
    data: bytes
    source: str  # where it comes from, for the result and the diff

    @property
    def directory(self) -> str:
        return self.path.rsplit("/", 1)[0]

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]


def file_plan(cfg: str, boot_efi: bytes, boot_source: str, signed_grub: bytes | None = None, grub_source: str = "",
              mok_manager: bytes | None = None, mok_source: str = "") -> tuple[list[PlannedFile], list[str]]:
    """The files to write and the paths this module owns that must not stay.

    Without Secure Boot (``signed_grub`` None): ``EFI/BOOT/BOOTX64.EFI`` is the
    self-built GRUB and ``EFI/BOOT/grub.cfg`` its configuration; a shim second stage
    (``grubx64.efi``, ``mmx64.efi``) left from a Secure Boot install is removed, and
    so is ``EFI/debian/grub.cfg`` if this module wrote it (the caller checks).
    With Secure Boot: ``BOOTX64.EFI`` is the shim, ``grubx64.efi`` the signed GRUB,
    ``mmx64.efi`` MokManager when given, and grub.cfg goes to both ``EFI/debian/``
    (the signed GRUB's prefix) and ``EFI/BOOT/`` (its fallback, ``$cmdpath``).
    """
    data = cfg.encode("utf-8")
    if signed_grub is None:
        files = [PlannedFile(BOOT_FILE, boot_efi, boot_source), PlannedFile(BOOT_CFG, data, "generated")]
        return files, [SHIM_GRUB, SHIM_MOK_MANAGER, DEBIAN_CFG]
    files = [PlannedFile(BOOT_FILE, boot_efi, boot_source), PlannedFile(SHIM_GRUB, signed_grub, grub_source)]
    stale = []
    if mok_manager is not None:
        files.append(PlannedFile(SHIM_MOK_MANAGER, mok_manager, mok_source))
    else:
        stale.append(SHIM_MOK_MANAGER)
    files += [PlannedFile(BOOT_CFG, data, "generated"), PlannedFile(DEBIAN_CFG, data, "generated")]
    return files, stale


def directories(paths: t.Iterable[str]) -> list[str]:
    """Every directory the paths need, parents first (``EFI``, ``EFI/BOOT``, ...)."""
    found: list[str] = []
    for path in paths:
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directory = "/".join(parts[:depth])
            if directory not in found:
                found.append(directory)
    return sorted(found, key=lambda item: (item.count("/"), item))


def describe(data: bytes | None) -> str:
    """``N bytes, sha256 XXXXXXXXXXXXXXXX`` or ``absent``, for the diff."""
    if data is None:
        return "absent"
    return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}"


# ----------------------------------------------------------------------------
# PE checks of the signed binaries


def pe_info(data: bytes) -> dict[str, t.Any] | None:
    """Machine and Authenticode signature size of a PE image, or None when ``data`` is no PE image."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        return None
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if pe + 24 > len(data) or data[pe:pe + 4] != b"PE\0\0":
        return None
    machine = struct.unpack_from("<H", data, pe + 4)[0]
    optional = pe + 24
    optional_size = struct.unpack_from("<H", data, pe + 20)[0]
    if optional + 2 > len(data):
        return None
    magic = struct.unpack_from("<H", data, optional)[0]
    if magic == _PE32_PLUS:
        count_at, dirs_at = optional + 108, optional + 112
    elif magic == _PE32:
        count_at, dirs_at = optional + 92, optional + 96
    else:
        return None
    signature = 0
    if count_at + 4 <= len(data) and dirs_at - optional <= optional_size:
        count = struct.unpack_from("<I", data, count_at)[0]
        entry = dirs_at + _SECURITY_DIRECTORY * 8
        if count > _SECURITY_DIRECTORY and entry + 8 <= len(data):
            offset, size = struct.unpack_from("<II", data, entry)
            if offset and size and offset + size <= len(data):
                signature = size
    return {"machine": machine, "x86_64": machine == _IMAGE_FILE_MACHINE_AMD64, "signature_bytes": signature}


def check_signed_efi(data: bytes, path: str, what: str, option: str, package: str) -> None:
    """BuildError naming ``option`` unless ``data`` is a signed x86-64 EFI binary."""
    info = pe_info(data)
    if info is None:
        raise BuildError(f"{path} is not an EFI binary (no PE header); it should be the {what} from {package}", option=option)
    if not info["x86_64"]:
        raise BuildError(f"{path} is an EFI binary for machine 0x{info['machine']:04x}, not x86-64; use the {what} from "
                         f"{package} (amd64)", option=option)
    if not info["signature_bytes"]:
        raise BuildError(f"{path} carries no Authenticode signature, so Secure Boot firmware would refuse it; use the "
                         f"signed {what} from {package}", option=option)


# ----------------------------------------------------------------------------
# FAT free space


def fat_free_clusters(read: t.Callable[[int, int], bytes], offset: int, info: dict[str, t.Any]) -> int:
    """Free clusters of the FAT at ``offset`` (``info`` from _fsprobe.probe_fat), counted in its first FAT."""
    bits = info["fat_bits"]
    clusters = info["clusters"]
    start = offset + info["reserved_sectors"] * info["sector_size"]
    entries = clusters + 2
    length = (entries * bits + 7) // 8
    table = read(start, length)
    free = 0
    if bits == 32:
        for (value,) in struct.iter_unpack("<I", table[:entries * 4]):
            if value & 0x0FFFFFFF == 0:
                free += 1
    elif bits == 16:
        free = sum(1 for (value,) in struct.iter_unpack("<H", table[:entries * 2]) if value == 0)
    else:
        for index in range(entries):
            at = index * 3 // 2
            pair = table[at] | (table[at + 1] << 8) if at + 1 < len(table) else table[at]
            value = pair >> 4 if index & 1 else pair & 0x0FFF
            if value == 0:
                free += 1
    # Entries 0 and 1 are reserved (never zero in a valid FAT, but do not count them).
    first_two = 0
    for index in (0, 1):
        if bits == 32:
            value = struct.unpack_from("<I", table, index * 4)[0] & 0x0FFFFFFF
        elif bits == 16:
            value = struct.unpack_from("<H", table, index * 2)[0]
        else:
            at = index * 3 // 2
            pair = table[at] | (table[at + 1] << 8)
            value = pair >> 4 if index & 1 else pair & 0x0FFF
        if value == 0:
            first_two += 1
    return free - first_two


def clusters_for(size: int, cluster_size: int) -> int:
    return -(-size // cluster_size)


# ----------------------------------------------------------------------------
# mtools commands beyond those _mkfs builds (mmd, mcopy into the FAT)


def mdir_argv(program: str, image: str, directory: str, recursive: bool = False) -> list[str]:
    """``mdir [-/] -a -b -i IMAGE ::/DIR``: the paths in (or below) DIR, one a line, hidden ones too.

    mdir 4.0 says "File not found" (exit 1) for a directory with nothing in it,
    the root included: ask for the parent to know whether a directory exists.
    """
    return [program] + (["-/"] if recursive else []) + ["-a", "-b", "-i", image, f"::/{directory}"]


def mread_argv(program: str, image: str, path: str) -> list[str]:
    """``mcopy -n -i IMAGE ::/PATH -``: the file's bytes on stdout, unconverted."""
    return [program, "-n", "-i", image, f"::/{path}", "-"]


def mdel_argv(program: str, image: str, paths: t.Sequence[str]) -> list[str]:
    """``mdel -i IMAGE ::/PATH...``."""
    return [program, "-i", image] + [f"::/{path}" for path in paths]


def parse_mdir(text: str) -> dict[str, str]:
    """The bare listing of ``mdir -b`` as {lower-case path: path as stored}, relative to the root.

    Directories end with ``/`` in the listing; they are returned without it. FAT
    names are case-insensitive, hence the lower-case keys.
    """
    found = {}
    for line in text.splitlines():
        if not line.startswith("::/"):
            continue
        path = line[3:].rstrip("/")
        if path:
            found[path.lower()] = path
    return found
