# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Identify the filesystem at an offset of an image from its superblock, like ``blkid -p``.

Pure: the caller passes ``read(offset, length) -> bytes``. Knows ext2/3/4 and FAT12/16/32.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import struct
import typing as t
import uuid as uuidlib

Reader = t.Callable[[int, int], bytes]

EXT_SUPERBLOCK_OFFSET = 1024
EXT_MAGIC = 0xEF53

# Feature bits (lib/ext2fs/ext2_fs.h).
EXT3_FEATURE_COMPAT_HAS_JOURNAL = 0x0004
EXT2_FEATURE_INCOMPAT_FILETYPE = 0x0002
EXT3_FEATURE_INCOMPAT_RECOVER = 0x0004
EXT3_FEATURE_INCOMPAT_JOURNAL_DEV = 0x0008
EXT2_FEATURE_INCOMPAT_META_BG = 0x0010
EXT4_FEATURE_INCOMPAT_64BIT = 0x0080
EXT2_FEATURE_RO_COMPAT_SPARSE_SUPER = 0x0001
EXT2_FEATURE_RO_COMPAT_LARGE_FILE = 0x0002
EXT2_FEATURE_RO_COMPAT_BTREE_DIR = 0x0004
EXT4_FEATURE_RO_COMPAT_GDT_CSUM = 0x0010
EXT4_FEATURE_RO_COMPAT_METADATA_CSUM = 0x0400

# What ext3 understands; anything beyond makes it ext4 (blkid's rule).
_EXT3_RO_COMPAT = EXT2_FEATURE_RO_COMPAT_SPARSE_SUPER | EXT2_FEATURE_RO_COMPAT_LARGE_FILE | EXT2_FEATURE_RO_COMPAT_BTREE_DIR
_EXT3_INCOMPAT = EXT2_FEATURE_INCOMPAT_FILETYPE | EXT3_FEATURE_INCOMPAT_RECOVER | EXT2_FEATURE_INCOMPAT_META_BG

FAT12_MAX_CLUSTERS = 4084
FAT16_MAX_CLUSTERS = 65524


def _u16(data: bytes, at: int) -> int:
    return struct.unpack_from("<H", data, at)[0]


def _u32(data: bytes, at: int) -> int:
    return struct.unpack_from("<I", data, at)[0]


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def probe_ext(read: Reader, offset: int) -> dict[str, t.Any] | None:
    """ext2/3/4 superblock fields, or None when there is no ext superblock."""
    sb = read(offset + EXT_SUPERBLOCK_OFFSET, 1024)
    if len(sb) < 1024 or _u16(sb, 0x38) != EXT_MAGIC:
        return None
    log_block = _u32(sb, 0x18)
    if log_block > 6:
        return None
    block_size = 1024 << log_block
    inodes_per_group = _u32(sb, 0x28)
    blocks_per_group = _u32(sb, 0x20)
    if not inodes_per_group or not blocks_per_group:
        return None
    compat, incompat, ro_compat = _u32(sb, 0x5C), _u32(sb, 0x60), _u32(sb, 0x64)
    is_64bit = bool(incompat & EXT4_FEATURE_INCOMPAT_64BIT)
    blocks = _u32(sb, 0x04) | ((_u32(sb, 0x150) << 32) if is_64bit else 0)
    free_blocks = _u32(sb, 0x0C) | ((_u32(sb, 0x158) << 32) if is_64bit else 0)
    reserved_blocks = _u32(sb, 0x08) | ((_u32(sb, 0x154) << 32) if is_64bit else 0)
    rev_level = _u32(sb, 0x4C)
    if incompat & EXT3_FEATURE_INCOMPAT_JOURNAL_DEV:
        fstype = "jbd"
    elif ro_compat & ~_EXT3_RO_COMPAT or incompat & ~_EXT3_INCOMPAT:
        fstype = "ext4"
    elif compat & EXT3_FEATURE_COMPAT_HAS_JOURNAL:
        fstype = "ext3"
    else:
        fstype = "ext2"
    return {
        "fstype": fstype,
        "uuid": str(uuidlib.UUID(bytes=sb[0x68:0x78])),
        "label": _text(sb[0x78:0x88]),
        "block_size": block_size,
        "blocks": blocks,
        "free_blocks": free_blocks,
        "reserved_blocks": reserved_blocks,
        "inodes": _u32(sb, 0x00),
        "free_inodes": _u32(sb, 0x10),
        "inode_size": _u16(sb, 0x58) if rev_level >= 1 else 128,
        "first_inode": _u32(sb, 0x54) if rev_level >= 1 else 11,
        "first_data_block": _u32(sb, 0x14),
        "blocks_per_group": blocks_per_group,
        "inodes_per_group": inodes_per_group,
        "desc_size": (_u16(sb, 0xFE) or 32) if is_64bit else 32,
        "first_meta_bg": _u32(sb, 0x104),
        "backup_bgs": (_u32(sb, 0x24C), _u32(sb, 0x250)),
        "feature_compat": compat,
        "feature_incompat": incompat,
        "feature_ro_compat": ro_compat,
        "mount_count": _u16(sb, 0x34),
        "mount_time": _u32(sb, 0x2C),
        "write_time": _u32(sb, 0x30),
        "mkfs_time": _u32(sb, 0x108),
        "hash_seed": str(uuidlib.UUID(bytes=sb[0xEC:0xFC])),
        "size": blocks * block_size,
        "free": free_blocks * block_size,
    }


def _fat_label_from_root(read: Reader, offset: int, root_offset: int, root_bytes: int) -> str | None:
    """The volume label entry of the root directory (blkid prefers it to the boot sector's copy)."""
    data = read(offset + root_offset, root_bytes)
    for pos in range(0, len(data) - 31, 32):
        entry = data[pos:pos + 32]
        first = entry[0]
        if first == 0x00:
            break
        if first == 0xE5:
            continue
        attr = entry[11]
        if attr & 0x3F == 0x0F:  # long file name slot
            continue
        if attr & 0x08 and not attr & 0x10:
            raw = entry[:11]
            if first == 0x05:
                raw = b"\xe5" + raw[1:]
            return raw.decode("cp850", "replace").rstrip(" ")
    return None


def probe_fat(read: Reader, offset: int) -> dict[str, t.Any] | None:
    """FAT12/16/32 boot sector fields, or None when the sector is no FAT boot sector."""
    bs = read(offset, 512)
    if len(bs) < 512 or bs[0] not in (0xEB, 0xE9):
        return None
    sector_size = _u16(bs, 11)
    per_cluster = bs[13]
    reserved = _u16(bs, 14)
    fats = bs[16]
    root_entries = _u16(bs, 17)
    total = _u16(bs, 19) or _u32(bs, 32)
    media = bs[21]
    fat_sectors = _u16(bs, 22) or _u32(bs, 36)
    if sector_size not in (512, 1024, 2048, 4096) or per_cluster == 0 or per_cluster & (per_cluster - 1):
        return None
    if reserved == 0 or fats not in (1, 2, 3, 4) or not total or not fat_sectors or media not in (0xF0,) + tuple(range(0xF8, 0x100)):
        return None
    is_fat32_layout = _u16(bs, 22) == 0
    root_sectors = (root_entries * 32 + sector_size - 1) // sector_size
    first_data = reserved + fats * fat_sectors + root_sectors
    if first_data >= total:
        return None
    clusters = (total - first_data) // per_cluster
    if is_fat32_layout:
        fat_bits = 32
        ext = 0x40
    else:
        fat_bits = 12 if clusters <= FAT12_MAX_CLUSTERS else 16
        ext = 0x24
    serial = None
    bpb_label = None
    if bs[ext + 2] in (0x28, 0x29):
        serial = _u32(bs, ext + 3)
        if bs[ext + 2] == 0x29:
            bpb_label = bs[ext + 7:ext + 18].decode("cp850", "replace").rstrip(" ")
    cluster_bytes = per_cluster * sector_size
    if is_fat32_layout:
        root_cluster = _u32(bs, 44)
        root_offset = (first_data + (root_cluster - 2) * per_cluster) * sector_size if root_cluster >= 2 else None
        root_bytes = cluster_bytes
    else:
        root_offset = (reserved + fats * fat_sectors) * sector_size
        root_bytes = root_sectors * sector_size
    label = _fat_label_from_root(read, offset, root_offset, root_bytes) if root_offset is not None and root_bytes else None
    if label is None:
        label = "" if bpb_label in (None, "NO NAME") else bpb_label
    return {
        "fstype": "vfat",
        "uuid": f"{serial >> 16:04X}-{serial & 0xFFFF:04X}" if serial is not None else "",
        "label": label,
        "fat_bits": fat_bits,
        "sector_size": sector_size,
        "sectors_per_cluster": per_cluster,
        "cluster_size": cluster_bytes,
        "clusters": clusters,
        "reserved_sectors": reserved,
        "fats": fats,
        "fat_sectors": fat_sectors,
        "root_entries": root_entries,
        "hidden_sectors": _u32(bs, 28),
        "size": total * sector_size,
        "free": (clusters - (1 if is_fat32_layout else 0)) * cluster_bytes,
    }


def probe(read: Reader, offset: int) -> dict[str, t.Any] | None:
    """What filesystem starts at ``offset``: a dict with at least fstype, uuid and label, or None.

    ``fstype`` is ``ext2``, ``ext3``, ``ext4`` (or ``jbd`` for an external journal) or ``vfat``;
    ``uuid`` is spelled as blkid spells it (lower-case UUID for ext, ``ABCD-1234`` for FAT).
    ``size`` and ``free`` are in bytes (``free`` is exact only for a freshly made FAT).
    """
    found = probe_ext(read, offset)
    if found is None:
        found = probe_fat(read, offset)
    return found


def describe(found: dict[str, t.Any] | None) -> str:
    """One line for messages and diffs."""
    if not found:
        return "no filesystem this module recognises"
    text = found["fstype"]
    if found.get("fat_bits"):
        text += f" (FAT{found['fat_bits']})"
    if found.get("uuid"):
        text += f", UUID {found['uuid']}"
    if found.get("label"):
        text += f", label {found['label']!r}"
    return text
