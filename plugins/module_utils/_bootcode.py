# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""GRUB i386-pc boot code: the bytes ``grub-install --target=i386-pc --no-rs-codes`` writes.

Pure functions, bytes in and bytes out: the ``boot.img`` merge into sector 0, the
``core.img`` blocklist patch, the embedding area (MBR gap or GPT ``bios_grub``
partition) and the ``grub-mkimage`` command line, module list, prefix and
``load.cfg`` that grub-install would use. Section numbers (§) refer to
``grub-bios-internals.md`` in the design notes.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import re
import struct
from typing import Iterable, List, Optional, Sequence, Tuple

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError

SECTOR_SIZE = 512

# boot.img / sector 0 (§1.1, §1.2)
BOOT_BPB_START = 0x03  # GRUB_BOOT_MACHINE_BPB_START
BOOT_BPB_END = 0x5A  # GRUB_BOOT_MACHINE_BPB_END (exclusive)
BOOT_KERNEL_SECTOR = 0x5C  # u64 LE: absolute LBA of core.img's first sector
BOOT_DRIVE = 0x64  # 0xFF = use the drive the BIOS passed in DL
BOOT_DRIVE_CHECK = 0x66  # jmp that grub-bios-setup replaces by two NOPs on hard disks (§1.3)
BOOT_WINDOWS_NT_MAGIC = 0x1B8  # disk signature, reserved word, then the partition table
BOOT_PART_END = 0x1FE  # end (exclusive) of the partition table
BOOT_SIGNATURE_OFFSET = 0x1FE
BOOT_SIGNATURE = b"\x55\xaa"
BOOT_DRIVE_VALUE = 0xFF
BOOT_DRIVE_CHECK_NOPS = b"\x90\x90"

# core.img: the diskboot.img blocklist at the end of its first sector (§2.1)
CORE_LIST_START = 0x1F4  # u64 LE: absolute LBA of core.img's second sector
CORE_LIST_LEN = 0x1FC  # u16 LE: sectors after the first one
CORE_LIST_SEGMENT = 0x1FE  # u16 LE: real-mode load segment
CORE_LIST_SIZE = 12  # sizeof(struct grub_pc_bios_boot_blocklist)
CORE_LIST_TERMINATOR = CORE_LIST_START - CORE_LIST_SIZE  # 0x1E8: the entry below must be all zero
CORE_LIST_SEGMENT_VALUE = 0x0820  # GRUB_BOOT_MACHINE_KERNEL_SEG + 0x20
# core.img second sector, startup_raw fields (§2.2)
CORE_NO_RS_LENGTH = SECTOR_SIZE + 0x14  # u16; 0xFFFF means a core.img from another GRUB version

# Limits grub-bios-setup enforces (§4)
MAX_CORE_SECTORS = 888  # (0x78000 - 0x9000) >> 9, setup.c:513-516
MAX_CORE_SIZE = 0xFFFF * SECTOR_SIZE  # setup.c:283-298 "too large"

# GPT BIOS Boot Partition type (§3), sgdisk EF02, parted bios_grub
BIOS_BOOT_GUID = "21686148-6449-6E6F-744E-656564454649"
RECOMMENDED_GAP_SECTORS = 2048  # first partition at 1 MiB, the usual alignment

LABELS = ("msdos", "gpt", "hybrid")

# grub_fs->name that grub-install puts first in the module list (§5.1);
# one GRUB driver serves several Linux filesystem names.
FS_MODULES = {
    "ext2": "ext2", "ext3": "ext2", "ext4": "ext2",
    "vfat": "fat", "fat": "fat", "fat12": "fat", "fat16": "fat", "fat32": "fat", "msdos": "fat",
    "exfat": "exfat",
    "xfs": "xfs",
    "btrfs": "btrfs",
    "f2fs": "f2fs",
    "jfs": "jfs",
    "reiserfs": "reiserfs",
    "nilfs2": "nilfs2",
    "hfsplus": "hfsplus",
    "ntfs": "ntfs",
    "udf": "udf",
    "iso9660": "iso9660",
    "zfs": "zfs",
}

_MODULE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
# grub-probe prints ext/xfs/btrfs UUIDs as lowercase hex with dashes and FAT
# serials as XXXX-XXXX; anything outside this set would need quoting in load.cfg.
_FS_UUID_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z-]*$")
_GAP_FIX = "partition the image with the first partition at sector 2048 (partition_table alignment 1MiB)"
_BIOS_GRUB_FIX = "add a BIOS boot partition before the others in partition_table, e.g. {name: bios, type: bios_grub, size: 1MiB}"


def _u16(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<H", data, offset)[0])


def _u64(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<Q", data, offset)[0])


def _check_lba(core_lba: int) -> None:
    # LBA 0 is sector 0 itself; a caller passing it has a bug, not a bad option.
    if isinstance(core_lba, bool) or not isinstance(core_lba, int) or core_lba < 1:
        raise ValueError(f"core_lba must be an integer >= 1, got {core_lba!r}")


def merge_boot_sector(boot_img: bytes, disk_sector0: bytes, core_lba: int) -> bytes:
    """Return the 512-byte sector 0 grub-bios-setup writes (§1.2).

    ``boot_img`` is ``<grub_dir>/boot.img``; ``disk_sector0`` is the image's
    current sector 0, whose BPB and disk signature + partition table survive.
    """
    _check_lba(core_lba)
    if len(boot_img) != SECTOR_SIZE or boot_img[BOOT_SIGNATURE_OFFSET:] != BOOT_SIGNATURE:
        problem = f"is {len(boot_img)} bytes" if len(boot_img) != SECTOR_SIZE else "does not end in 55 AA"
        raise BuildError(
            f"boot.img {problem}, but GRUB's i386-pc boot.img is one 512-byte sector ending in 55 AA;"
            " point grub_dir at an i386-pc directory such as /usr/lib/grub/i386-pc",
            option="grub_dir",
        )
    if len(disk_sector0) != SECTOR_SIZE:
        raise BuildError(f"sector 0 of the image is {len(disk_sector0)} bytes, expected {SECTOR_SIZE}; is the image truncated?", option="image")
    new = bytearray(boot_img)
    # A FAT/NTFS BPB may live here on superfloppies; setup.c:385-388 keeps it.
    new[BOOT_BPB_START:BOOT_BPB_END] = disk_sector0[BOOT_BPB_START:BOOT_BPB_END]
    # boot.img carries floppy-probe code at 0x1BE; the disk's table must win (setup.c:416-421).
    new[BOOT_WINDOWS_NT_MAGIC:BOOT_PART_END] = disk_sector0[BOOT_WINDOWS_NT_MAGIC:BOOT_PART_END]
    # write_rootdev(), setup.c:100-125
    struct.pack_into("<Q", new, BOOT_KERNEL_SECTOR, core_lba)
    new[BOOT_DRIVE] = BOOT_DRIVE_VALUE
    # Hard-disk workaround for BIOSes passing DL=0x00/0x01 (setup.c:390-398, §1.3).
    new[BOOT_DRIVE_CHECK:BOOT_DRIVE_CHECK + 2] = BOOT_DRIVE_CHECK_NOPS
    return bytes(new)


def core_sectors(core_img: bytes) -> int:
    """Sectors core.img occupies on disk; grub-mkimage does not pad it (§2)."""
    return (len(core_img) + SECTOR_SIZE - 1) // SECTOR_SIZE


def _check_core_size(core_len: int) -> None:
    if core_len < 2 * SECTOR_SIZE:
        # setup.c rejects < 512; we also need the second sector for the version check (§2.2).
        raise BuildError(f"core.img is {core_len} bytes, too small to be a grub-mkimage i386-pc image", option="grub_dir")
    if core_len > MAX_CORE_SIZE:
        raise BuildError(f"core.img is {core_len} bytes, over GRUB's limit of {MAX_CORE_SIZE} bytes; remove modules", option="modules")


def patch_core(core_img: bytes, core_lba: int) -> bytes:
    """Return core.img as grub-bios-setup writes it at ``core_lba`` with --no-rs-codes.

    The blocklist becomes one entry (core_lba + 1, sectors - 1, 0x820) with a
    zero terminator below it (§2.3, setup.c:566-578); for LBA 1 that is what
    grub-mkimage already wrote. The result is padded with zeros to whole
    sectors: setup.c reallocs core.img to nsec sectors and memsets the tail
    to 0 before writing every sector in full, so the last sector's tail on
    disk is zeros whatever was there before (§7.2 compares those bytes too).
    """
    _check_lba(core_lba)
    _check_core_size(len(core_img))
    nsec = core_sectors(core_img)
    start = _u64(core_img, CORE_LIST_START)
    length = _u16(core_img, CORE_LIST_LEN)
    segment = _u16(core_img, CORE_LIST_SEGMENT)
    if segment != CORE_LIST_SEGMENT_VALUE:
        raise BuildError(
            f"core.img blocklist segment is {segment:#06x}, expected {CORE_LIST_SEGMENT_VALUE:#06x}: not an i386-pc core.img (§2.1);"
            " build it with grub-mkimage -O i386-pc from grub_dir",
            option="grub_dir",
        )
    if length != nsec - 1:
        raise BuildError(
            f"core.img blocklist says {length} sectors follow the first but the file has {nsec - 1}:"
            " the file is truncated, padded or not straight from grub-mkimage",
            option="grub_dir",
        )
    if start < 2:
        raise BuildError(f"core.img blocklist start is {start}, expected an LBA >= 2 (§2.1)", option="grub_dir")
    if core_img[CORE_LIST_TERMINATOR:CORE_LIST_START] != bytes(CORE_LIST_SIZE):
        # setup.c:554-564 "no terminator in the core image"; diskboot would read garbage entries.
        raise BuildError("core.img has no zero blocklist terminator at 0x1E8 (§2.1): not a grub-mkimage i386-pc image", option="grub_dir")
    if _u16(core_img, CORE_NO_RS_LENGTH) == 0xFFFF:
        raise BuildError("core.img version mismatch (no_reed_solomon_length is 0xFFFF, setup.c:619-626)", option="grub_dir")
    out = bytearray(core_img)
    struct.pack_into("<QHH", out, CORE_LIST_START, core_lba + 1, nsec - 1, CORE_LIST_SEGMENT_VALUE)
    out.extend(bytes(nsec * SECTOR_SIZE - len(core_img)))
    return bytes(out)


def _is_empty_msdos_type(value: object) -> bool:
    text = str(value).strip().lower()
    if text.startswith("0x"):
        text = text[2:]
    try:
        return int(text, 16) == 0
    except ValueError:
        return False


def embedding_area(table_label: str, partitions: Sequence[dict]) -> Tuple[int, int]:
    """Return (first LBA, sectors) where core.img may go, as GRUB's embed() finds it.

    msdos: LBA 1 up to the lowest start of any used entry (msdos.c:236-410, §4).
    gpt and hybrid: the first BIOS Boot Partition, the whole of it (gpt.c:143-216, §3);
    GRUB treats a hybrid MBR as GPT because of its 0xEE entry.
    ``partitions`` are dicts with ``number``, ``type``, ``start_sector`` and ``sectors``.
    """
    if table_label not in LABELS:
        raise BuildError(f"partition table label {table_label!r} is not one of {', '.join(LABELS)}", option="image")
    if table_label == "msdos":
        used = [p for p in partitions if int(p.get("sectors") or 0) > 0 and not _is_empty_msdos_type(p.get("type", ""))]
        if not used:
            raise BuildError("the msdos partition table has no partitions, so there is no post-MBR gap to bound", option="image")
        first = min(used, key=lambda p: int(p["start_sector"]))
        end = int(first["start_sector"])
        if end <= 1:
            raise BuildError(
                f"partition {first.get('number')} starts at sector {end}, leaving no post-MBR gap for core.img; {_GAP_FIX}",
                option="image",
                first_partition_start=end,
            )
        return (1, end - 1)
    for part in sorted(partitions, key=lambda p: int(p.get("number") or 0)):
        if str(part.get("type", "")).strip().upper() == BIOS_BOOT_GUID:
            sectors = int(part["sectors"])
            if sectors <= 0:
                break
            return (int(part["start_sector"]), sectors)
    raise BuildError(
        f"this {table_label} partition table has no BIOS boot partition (type {BIOS_BOOT_GUID}), so core.img has nowhere to go; {_BIOS_GRUB_FIX}",
        option="image",
    )


def check_fits(core_img_len: int, area: Tuple[int, int]) -> None:
    """Raise BuildError unless core.img fits ``area`` and GRUB's 888-sector cap (§4)."""
    _check_core_size(core_img_len)
    needed = (core_img_len + SECTOR_SIZE - 1) // SECTOR_SIZE
    first_lba, available = area
    if needed > MAX_CORE_SECTORS:
        raise BuildError(
            f"core.img needs {needed} sectors ({core_img_len} bytes) but GRUB loads at most {MAX_CORE_SECTORS} sectors"
            f" ({MAX_CORE_SECTORS * SECTOR_SIZE} bytes) below 0x78000; embed fewer modules (load the rest from the prefix with insmod)",
            option="modules",
            core_sectors=needed,
            area_sectors=available,
        )
    if needed > available:
        if first_lba == 1:
            fix = f"move the first partition to sector {RECOMMENDED_GAP_SECTORS} (partition_table alignment 1MiB) or embed fewer modules"
        else:
            fix = "make the bios_grub partition larger (1MiB is the usual size) or embed fewer modules"
        raise BuildError(
            f"core.img needs {needed} sectors ({core_img_len} bytes) but the embedding area at LBA {first_lba} has only"
            f" {available} sectors ({available * SECTOR_SIZE} bytes); {fix}",
            option="image",
            core_sectors=needed,
            area_sectors=available,
        )


def normalize_prefix(prefix: str) -> str:
    """Return ``prefix`` as grub-install computes it: absolute, no empty or trailing components."""
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise BuildError(f"{prefix!r} is not an absolute path inside the boot filesystem, e.g. /boot/grub or /grub", option="prefix")
    if any(ord(c) < 0x20 or c == "\x7f" for c in prefix):
        raise BuildError(f"{prefix!r} contains control characters", option="prefix")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise BuildError(f"{prefix!r} contains '.' or '..'; write the plain path, e.g. /boot/grub", option="prefix")
    return "/" + "/".join(parts)


def _partmap(label: str) -> str:
    if label not in LABELS:
        raise BuildError(f"partition table label {label!r} is not one of {', '.join(LABELS)}", option="image")
    # GRUB's msdos iterator gives up on any 0xEE entry ("dummy mbr", msdos.c:146-150), so hybrid is GPT to it (§3).
    return "msdos" if label == "msdos" else "gpt"


def grub_prefix(label: str, boot_partition_number: int, prefix: str = "/boot/grub", search_by_uuid: bool = False) -> str:
    """Return the ``--prefix`` grub-install gives grub-mkimage (§5.1).

    Without a search config grub-install hard-codes only the partition,
    ``(,msdos1)/boot/grub``; the drive is filled in at boot from the BIOS boot
    drive. With the ``search.fs_uuid`` load.cfg the prefix is the bare path and
    load.cfg sets ``($root)`` (grub-install.c: prefix_drive stays NULL).
    """
    path = normalize_prefix(prefix)
    partmap = _partmap(label)
    if search_by_uuid:
        return path
    if isinstance(boot_partition_number, bool) or not isinstance(boot_partition_number, int) or boot_partition_number < 1:
        raise BuildError(f"{boot_partition_number!r} is not a partition number (1 or more)", option="boot_partition")
    return f"(,{partmap}{boot_partition_number}){path}"


def fs_module(fstype: str) -> str:
    """Return the GRUB filesystem module that reads ``fstype`` (grub_fs->name)."""
    key = str(fstype).strip().lower()
    if key not in FS_MODULES:
        raise BuildError(
            f"GRUB has no core.img filesystem driver for {fstype!r} on the boot partition; use one of {', '.join(sorted(FS_MODULES))}",
            option="boot_partition",
        )
    return FS_MODULES[key]


def _check_modules(modules: Iterable[str]) -> List[str]:
    result = []
    for name in modules:
        if not isinstance(name, str) or not _MODULE_RE.match(name):
            raise BuildError(f"{name!r} is not a GRUB module name (like part_gpt, lvm, search_fs_uuid)", option="modules")
        result.append(name)
    return result


def core_modules(label: str, fstype: str, extra: Sequence[str] = (), search_by_uuid: bool = False) -> List[str]:
    """Return core.img's modules in grub-install's order (§5.1).

    grub-install fills its module list from ``--modules`` while parsing options
    (grub-install-common.c handle_install_list) and only then appends the
    filesystem, the partition map, ``biosdisk`` and, with a load.cfg search,
    ``search_fs_uuid``; so the user's extra modules come first. The order
    changes core.img's bytes (§5.4), which is why it is kept exactly.
    """
    partmap = "part_" + _partmap(label)
    modules = _check_modules(extra)
    modules.extend([fs_module(fstype), partmap, "biosdisk"])
    if search_by_uuid:
        modules.append("search_fs_uuid")
    return modules


def load_cfg(fs_uuid: str, prefix: str = "/boot/grub", hints: Sequence[str] = ()) -> str:
    """Return the load.cfg grub-install writes for a ``search.fs_uuid`` core (§5.1).

    Text as printed by grub-install.c: ``"search.fs_uuid %s root "``, then each
    hint followed by a space, a newline, then ``"set prefix=($root)'%s'\\n"``
    with ``'`` in the path escaped as ``'\\''`` (grub-install.c escape()).
    grub-install's hints name host-side BIOS drives (``hd0,msdos1``) guessed
    from device.map; an image builder cannot know them, so none by default.
    """
    if not isinstance(fs_uuid, str) or not _FS_UUID_RE.match(fs_uuid):
        raise BuildError(f"{fs_uuid!r} is not a filesystem UUID GRUB can search for", option="boot_partition")
    path = normalize_prefix(prefix)
    for hint in hints:
        if not isinstance(hint, str) or not hint or any(c.isspace() or c in "'\"\\;" for c in hint):
            # Hints come from our own code, never from a module option.
            raise ValueError(f"{hint!r} is not a GRUB device hint like hd0,msdos1")
    hint_text = "".join(f"{hint} " for hint in hints)
    escaped = path.replace("'", "'\\''")
    return f"search.fs_uuid {fs_uuid} root {hint_text}\nset prefix=($root)'{escaped}'\n"


def mkimage_argv(mkimage: str, grub_dir: str, output: str, prefix: str, modules: Sequence[str], config: Optional[str] = None) -> List[str]:
    """Return the grub-mkimage argv that yields grub-install's core.img.

    grub-install does not exec grub-mkimage; it calls the same library code and
    logs an equivalent command (§7.2 step 5): ``--directory --prefix --output
    --format 'i386-pc' --compression 'auto' [--config] 'mod'...``. Debian's also
    shows ``--dtb ''`` and ``--sbat ''``, which mean "none" there but would name
    an empty file on a real command line, so they are left out. ``--compression
    auto`` is grub-mkimage's default too (LZMA on i386-pc); it is spelled out so
    a differently configured build cannot pick another compressor.
    """
    mods = _check_modules(modules)
    if not mods:
        raise BuildError("core.img needs at least the filesystem, partition map and disk modules", option="modules")
    argv = [
        mkimage,
        "--directory", grub_dir,
        "--prefix", prefix,
        "--output", output,
        "--format", "i386-pc",
        "--compression", "auto",
    ]
    if config is not None:
        argv.extend(["--config", config])
    argv.extend(mods)
    return argv


def install_writes(boot_img: bytes, core_img: bytes, disk_sector0: bytes, area: Tuple[int, int]) -> List[Tuple[int, bytes]]:
    """Return the (byte offset, data) writes grub-bios-setup does for --no-rs-codes.

    core.img comes first and sector 0 last, the order of setup.c:644-648 and
    859-862: until sector 0 is written the disk still boots whatever it booted
    before, so an interrupted run never points boot.img at half a core.
    """
    check_fits(len(core_img), area)
    core_lba = area[0]
    core = patch_core(core_img, core_lba)
    sector0 = merge_boot_sector(boot_img, disk_sector0, core_lba)
    return [(core_lba * SECTOR_SIZE, core), (0, sector0)]
