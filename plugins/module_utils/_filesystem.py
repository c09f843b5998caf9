# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What the filesystem module does: format one partition of an image and fill it from a tree.

The filesystem is built in a temporary sparse file of exactly the partition's size
beside the image (``mke2fs -d``, or ``mkfs.fat`` + ``mcopy``), then copied into the
partition's byte range extent by extent, so the image stays sparse and a failed
build never touches it. What was built is recorded beside the image (see _state)
so a rerun with the same inputs is a no-op and a partition changed behind the
module's back is noticed.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import typing as t
from dataclasses import dataclass

from ansible_collections.osimage.builder.plugins.module_utils import _mkfs
from ansible_collections.osimage.builder.plugins.module_utils._commands import find_tool, run_tool
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._fsprobe import (
    EXT4_FEATURE_INCOMPAT_64BIT, EXT4_FEATURE_RO_COMPAT_GDT_CSUM, EXT4_FEATURE_RO_COMPAT_METADATA_CSUM,
    EXT2_FEATURE_INCOMPAT_META_BG, EXT2_FEATURE_RO_COMPAT_SPARSE_SUPER, describe, probe, probe_ext, probe_fat,
)
from ansible_collections.osimage.builder.plugins.module_utils._image import Image, image_kind
from ansible_collections.osimage.builder.plugins.module_utils._partition_table import find_partition, read_table
from ansible_collections.osimage.builder.plugins.module_utils._sizes import SECTOR_SIZE, format_size
from ansible_collections.osimage.builder.plugins.module_utils._state import (
    DEFAULT_SEED, StateFile, Tree, TreeEntry, data_extents, derive_uuid, fingerprint, input_digest, state_path, walk_tree,
)

# Bump when the way a filesystem is built changes, so records of older builds no longer match.
BUILD_FORMAT = 1
FSTYPES = _mkfs.FSTYPES
_CHUNK = 4 * 1024 * 1024

_EXT4_FEATURE_INCOMPAT_EXTENTS = 0x0040
_EXT2_FEATURE_COMPAT_DIR_INDEX = 0x0020
_EXT4_FEATURE_COMPAT_SPARSE_SUPER2 = 0x0200
_EXT4_BG_INODE_UNINIT = 0x0001


# ----------------------------------------------------------------------------
# Host tools


@dataclass(frozen=True)
class Tools:
    mkfs: str
    mkfs_version: tuple[int, ...]
    mcopy: str | None = None
    mmd: str | None = None
    mtools_version: tuple[int, ...] = ()
    config_digest: str = ""

    def identity(self) -> dict[str, t.Any]:
        return {
            "mkfs": os.path.basename(self.mkfs),
            "mkfs_version": ".".join(map(str, self.mkfs_version)),
            "mtools_version": ".".join(map(str, self.mtools_version)),
            "config": self.config_digest,
        }


def _which(names: t.Sequence[str], package: str) -> str:
    return find_tool(names, "fstype", package)


def _banner(argv: list[str]) -> str:
    try:
        done = run_tool(argv, env=dict(os.environ, LC_ALL="C"), merge_stderr=True)
    except OSError:
        return ""
    return done.stdout.decode("utf-8", "replace")


def find_tools(fstype: str) -> Tools:
    """The programs that build ``fstype`` on this host, and what identifies their output."""
    if fstype in _mkfs.EXT_TYPES:
        mke2fs = _which(["mke2fs", "mkfs.ext4"], "e2fsprogs")
        version = _mkfs.parse_version(_banner([mke2fs, "-V"]), "mke2fs")
        config = os.environ.get("MKE2FS_CONFIG") or "/etc/mke2fs.conf"
        try:
            with open(config, "rb") as handle:
                config_digest = "sha256:" + hashlib.sha256(handle.read()).hexdigest()
        except OSError:
            config_digest = "none"
        return Tools(mkfs=mke2fs, mkfs_version=version, config_digest=config_digest)
    mkfs = _which(["mkfs.fat", "mkfs.vfat"], "dosfstools")
    banner = _banner([mkfs, "--help"])
    version = _mkfs.parse_version(banner, "mkfs.fat") or _mkfs.parse_version(banner, "mkfs.vfat")
    mcopy = _which(["mcopy"], "mtools")
    mmd = _which(["mmd"], "mtools")
    return Tools(mkfs=mkfs, mkfs_version=version, mcopy=mcopy, mmd=mmd,
                 mtools_version=_mkfs.parse_version(_banner([mcopy, "--version"]), "mtools"))


def _run(argv: list[t.Any], env: dict[str, str], what: str) -> subprocess.CompletedProcess:
    try:
        return run_tool(argv, env=env)
    except OSError as exc:
        raise BuildError(f"{what} could not be started: {exc.strerror}", option="fstype")


def _output(done: subprocess.CompletedProcess) -> str:
    text = (done.stderr or b"").decode("utf-8", "replace").strip() or (done.stdout or b"").decode("utf-8", "replace").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-6:]) if lines else f"exit status {done.returncode}"


# ----------------------------------------------------------------------------
# Space estimates


def _ceil(value: int, unit: int) -> int:
    return -(-value // unit)


def _align4(value: int) -> int:
    return (value + 3) & ~3


def _file_bytes(entry: TreeEntry) -> int:
    """Bytes a file needs on the new filesystem: its size, or what is allocated when it is sparse."""
    allocated = entry.blocks * 512
    return allocated if allocated < entry.size else entry.size


def _indirect_blocks(blocks: int, per_block: int) -> int:
    """Mapping blocks of an ext2/ext3 file (12 direct, then single, double and triple indirect)."""
    rest = blocks - 12
    if rest <= 0:
        return 0
    extra = 1
    rest -= per_block
    if rest <= 0:
        return extra
    double = min(rest, per_block * per_block)
    extra += 1 + _ceil(double, per_block)
    rest -= double
    if rest <= 0:
        return extra
    return extra + 1 + _ceil(rest, per_block * per_block) + _ceil(rest, per_block)


def _children(tree: Tree) -> dict[bytes, list[TreeEntry]]:
    children: dict[bytes, list[TreeEntry]] = {}
    for entry in tree.entries:
        if entry.path:
            parent = entry.path.rsplit(b"/", 1)[0] if b"/" in entry.path else b""
            children.setdefault(parent, []).append(entry)
    return children


def ext_needs(tree: Tree, info: dict[str, t.Any]) -> tuple[int, int]:
    """About how many blocks and inodes ``mke2fs -d`` needs for ``tree`` on a filesystem like ``info``.

    ``info`` is the superblock of the same filesystem made empty (so the journal, the
    root directory and lost+found are already accounted for in its free counts).
    """
    block = info["block_size"]
    extents = bool(info["feature_incompat"] & _EXT4_FEATURE_INCOMPAT_EXTENTS)
    csum = bool(info["feature_ro_compat"] & EXT4_FEATURE_RO_COMPAT_METADATA_CSUM)
    in_inode_xattr = max(info["inode_size"] - 128 - 32 - 4, 0)
    blocks = inodes = 0
    seen: set[tuple[int, int]] = set()
    for entry in tree.entries:
        if not entry.path:
            continue
        if entry.kind != "dir" and entry.nlink > 1:
            if entry.inode in seen:
                continue
            seen.add(entry.inode)
        inodes += 1
        if entry.kind == "file":
            data = _ceil(_file_bytes(entry), block)
            if extents:
                runs = _ceil(data, 32768) + _ceil(data, info["blocks_per_group"])
                blocks += data + (_ceil(runs, (block - 12) // 12) if runs > 4 else 0)
            else:
                blocks += data + _indirect_blocks(data, block // 4)
        elif entry.kind == "symlink" and len(entry.target) >= 60:
            blocks += 1
        if entry.xattrs:
            size = 4 + sum(16 + _align4(len(name)) + _align4(len(value)) for name, value in entry.xattrs)
            if size > in_inode_xattr:
                blocks += _ceil(size + 32, block)
    per_block = block - (12 if csum else 0)
    for parent, entries in _children(tree).items():
        used = 24 + sum(_align4(8 + len(entry.name)) for entry in entries)
        count = _ceil(used, per_block)
        if count > 1:
            count += 1 + _ceil(count, max((block - 32) // 8, 1))  # htree index blocks
            if not extents:
                count += _indirect_blocks(count, block // 4)
        blocks += count - (1 if parent == b"" else 0)  # the root directory has its block already
    return blocks, inodes


def _lfn_slots(name: bytes) -> int:
    units = len(name.decode("utf-8", "replace").encode("utf-16-le")) // 2
    return _ceil(units, 13)


def fat_needs(tree: Tree, info: dict[str, t.Any]) -> tuple[int, int]:
    """About how many clusters ``tree`` needs on the FAT ``info``, and how many root entries (FAT12/16)."""
    cluster = info["cluster_size"]
    clusters = 0
    for entry in tree.entries:
        if entry.kind == "file":
            clusters += _ceil(entry.size, cluster)
    root_entries = 0
    for parent, entries in _children(tree).items():
        slots = sum(1 + _lfn_slots(entry.name) for entry in entries)
        if parent == b"":
            root_entries = slots + 1  # and the volume label
            if info["fat_bits"] == 32:
                clusters += max(_ceil(root_entries * 32, cluster) - 1, 0)
        else:
            clusters += _ceil((slots + 2) * 32, cluster)
    return clusters, root_entries


def _too_big(source: str, need: int, free: int, part_number: int, fstype: str, hint: str = "") -> BuildError:
    return BuildError(
        f"the tree in {source} needs about {format_size(need)} ({need} bytes) but the {fstype} filesystem on partition "
        f"{part_number} has {format_size(free)} ({free} bytes) free; make the partition bigger or the tree smaller{hint}",
        option="source", needed=need, available=free)


def _check_fits(ctx: "_Context", info: dict[str, t.Any]) -> None:
    tree = ctx.tree
    if tree is None:
        return
    if ctx.fstype == "vfat":
        need, root_entries = fat_needs(tree, info)
        free = info["clusters"] - (1 if info["fat_bits"] == 32 else 0)
        if info["fat_bits"] != 32 and root_entries > info["root_entries"]:
            raise BuildError(f"the top directory of {ctx.source} needs about {root_entries} directory entries but the root "
                             f"directory of a FAT{info['fat_bits']} holds {info['root_entries']}; put the files into "
                             "subdirectories, or make the partition big enough for FAT32", option="source")
        if need > free:
            raise _too_big(ctx.source, need * info["cluster_size"], free * info["cluster_size"], ctx.part.number, ctx.fstype)
        return
    blocks, inodes = ext_needs(tree, info)
    if blocks > info["free_blocks"]:
        raise _too_big(ctx.source, blocks * info["block_size"], info["free_blocks"] * info["block_size"], ctx.part.number,
                       ctx.fstype)
    if inodes > info["free_inodes"]:
        raise BuildError(f"the tree in {ctx.source} has {inodes} files, directories and links but the {ctx.fstype} "
                         f"filesystem on partition {ctx.part.number} has {info['free_inodes']} free inodes; make the "
                         "partition bigger or ask mke2fs for more inodes in mkfs_options (e.g. ['-N', '200000'] or "
                         "['-i', '8192'])", option="source", needed_inodes=inodes, available_inodes=info["free_inodes"])


# ----------------------------------------------------------------------------
# FAT: what a FAT can hold

_FAT_BAD_CHARS = set('"*/:<>?\\|')


def check_fat_tree(tree: Tree) -> None:
    """Fail naming the first entry a FAT cannot hold (symlinks, devices, bad names, 4 GiB files)."""
    for entry in tree.entries:
        if not entry.path:
            continue
        where = f"{os.path.join(tree.root, entry.display())}"
        if entry.kind not in ("file", "dir"):
            raise BuildError(f"{where} is a {entry.kind}; FAT holds only regular files and directories. Remove it from "
                             "the tree, or use an ext filesystem", option="source")
        try:
            name = entry.name.decode("utf-8")
        except UnicodeDecodeError:
            raise BuildError(f"{where}: the name is not valid UTF-8, so it cannot become a FAT long name", option="source")
        bad = sorted({char for char in name if char in _FAT_BAD_CHARS or ord(char) < 0x20 or ord(char) == 0x7F})
        if bad:
            raise BuildError(f"{where}: FAT names cannot contain {''.join(bad)!r}", option="source")
        if name.endswith((".", " ")):
            raise BuildError(f"{where}: FAT names cannot end with a dot or a space", option="source")
        if len(name.encode("utf-16-le")) // 2 > 255:
            raise BuildError(f"{where}: the name is longer than the 255 characters of a FAT long name", option="source")
        if entry.kind == "file" and entry.size > 0xFFFFFFFF:
            raise BuildError(f"{where} is {format_size(entry.size)}; a file on FAT holds at most 4 GiB - 1 byte",
                             option="source")
    for parent, entries in _children(tree).items():
        seen: dict[str, TreeEntry] = {}
        for entry in entries:
            key = entry.name.decode("utf-8").upper()
            if key in seen:
                raise BuildError(f"{os.path.join(tree.root, seen[key].display())} and {entry.display()} differ only in case; "
                                 "FAT names are case-insensitive", option="source")
            seen[key] = entry


def _check_readable(tree: Tree) -> None:
    unreadable = [entry.display() for entry in tree.entries if not entry.readable]
    if unreadable:
        shown = ", ".join(unreadable[:5]) + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
        raise BuildError(f"{len(unreadable)} entries of {tree.root} cannot be read by uid {os.getuid()}: {shown}. Run the task "
                         "as a user who can read the whole tree (e.g. become: true)", option="source")


# ----------------------------------------------------------------------------
# ext: pin the times a build cannot control

_CRC32C_TABLE: list[int] = []


def _crc32c_raw(crc: int, data: bytes) -> int:
    """CRC32C (Castagnoli) without pre/post inversion, as ``ext2fs_crc32c_le`` computes it."""
    if not _CRC32C_TABLE:
        for byte in range(256):
            value = byte
            for _bit in range(8):
                value = (value >> 1) ^ 0x82F63B78 if value & 1 else value >> 1
            _CRC32C_TABLE.append(value)
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


class _InodeCsumDelta:
    """How an inode checksum changes when bytes of the inode change.

    The checksum is a CRC32C without a final inversion over (inode number, generation,
    inode), so it is affine in the inode bytes: flipping bits ``d`` at position ``p``
    flips the checksum by the CRC of ``d`` followed by the zero bytes that follow
    ``p``. That needs neither the checksum seed nor the inode number, and costs a
    table lookup per changed byte instead of a CRC over the whole inode.
    """

    def __init__(self, inode_size: int) -> None:
        self.inode_size = inode_size
        self.tables: dict[int, list[int]] = {}

    def table(self, pos: int) -> list[int]:
        tail = self.inode_size - pos - 1
        found = self.tables.get(tail)
        if found is None:
            basis = [_crc32c_raw(0, bytes([1 << bit]) + bytes(tail)) for bit in range(8)]
            found = [0] * 256
            for value in range(1, 256):
                low = value & -value
                found[value] = found[value ^ low] ^ basis[low.bit_length() - 1]
            self.tables[tail] = found
        return found

    def delta(self, old: bytes | bytearray, new: bytes | bytearray, positions: t.Iterable[int] | None = None) -> int:
        """The checksum flip for ``old`` -> ``new``; only ``positions`` are compared when given."""
        flip = 0
        for pos in range(len(old)) if positions is None else positions:
            if old[pos] != new[pos]:
                flip ^= self.table(pos)[old[pos] ^ new[pos]]
        return flip


def _group_has_super(group: int, info: dict[str, t.Any]) -> bool:
    if group == 0:
        return True
    if info["feature_compat"] & _EXT4_FEATURE_COMPAT_SPARSE_SUPER2:
        return group in info["backup_bgs"]
    if group <= 1 or not info["feature_ro_compat"] & EXT2_FEATURE_RO_COMPAT_SPARSE_SUPER:
        return True
    if not group & 1:
        return False
    for base in (3, 5, 7):
        power = base
        while power < group:
            power *= base
        if power == group:
            return True
    return False


def _descriptor_offset(group: int, info: dict[str, t.Any]) -> int:
    block = info["block_size"]
    per_block = block // info["desc_size"]
    index = group // per_block
    if info["feature_incompat"] & EXT2_FEATURE_INCOMPAT_META_BG and index >= info["first_meta_bg"]:
        first = index * per_block
        location = info["first_data_block"] + first * info["blocks_per_group"] + (1 if _group_has_super(first, info) else 0)
    else:
        location = info["first_data_block"] + 1 + index
    return location * block + (group % per_block) * info["desc_size"]


# i_atime, i_ctime, i_ctime_extra, i_atime_extra: the only bytes _pin_inode changes.
_PINNED_BYTES = tuple(range(8, 16)) + tuple(range(0x84, 0x88)) + tuple(range(0x8C, 0x90))


def _pin_inode(table: bytearray, at: int, inode_size: int, csum: _InodeCsumDelta | None) -> bool:
    """Set atime and ctime (and their extra fields) to mtime; fix the checksum. True when it changed."""
    old = bytes(table[at:at + inode_size])
    new = bytearray(old)
    mtime = old[16:20]
    new[8:12] = mtime
    new[12:16] = mtime
    extra = struct.unpack_from("<H", old, 0x80)[0] if inode_size > 128 else 0
    mtime_extra = old[0x88:0x8C] if extra >= 12 else b"\0\0\0\0"
    if extra >= 8:
        new[0x84:0x88] = mtime_extra
    if extra >= 16:
        new[0x8C:0x90] = mtime_extra
    if new == old:
        return False
    if csum is not None:
        flip = csum.delta(old, new, _PINNED_BYTES if inode_size > 0x90 else range(8, 16))
        stored = struct.unpack_from("<H", old, 0x7C)[0]
        has_hi = inode_size > 128 and extra >= 4
        if has_hi:
            stored |= struct.unpack_from("<H", old, 0x82)[0] << 16
        else:
            flip &= 0xFFFF
        stored ^= flip
        struct.pack_into("<H", new, 0x7C, stored & 0xFFFF)
        if has_hi:
            struct.pack_into("<H", new, 0x82, stored >> 16)
    table[at:at + inode_size] = new
    return True


def pin_ext_times(fd: int) -> int:
    """Make every inode's atime and ctime equal to its mtime, in the ext filesystem in ``fd``.

    ``mke2fs -d`` copies atime and ctime from the source tree. Both belong to the
    build host, not to the tree: reading the tree (the previous build did) moves
    atime under relatime, and any copy of the tree gets a new ctime. mtime is the
    tree's own data and is kept. Returns the number of inodes changed.
    """
    def read(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    info = probe_ext(read, 0)
    if info is None:
        raise BuildError("mke2fs left no ext superblock in the temporary file", option="fstype")
    block = info["block_size"]
    per_group = info["inodes_per_group"]
    inode_size = info["inode_size"]
    groups = _ceil(info["blocks"] - info["first_data_block"], info["blocks_per_group"])
    ro_compat = info["feature_ro_compat"]
    csum = _InodeCsumDelta(inode_size) if ro_compat & EXT4_FEATURE_RO_COMPAT_METADATA_CSUM else None
    has_unused = bool(ro_compat & (EXT4_FEATURE_RO_COMPAT_GDT_CSUM | EXT4_FEATURE_RO_COMPAT_METADATA_CSUM))
    wide = info["feature_incompat"] & EXT4_FEATURE_INCOMPAT_64BIT and info["desc_size"] >= 64
    changed = 0
    for group in range(groups):
        desc = read(_descriptor_offset(group, info), info["desc_size"])
        bitmap_block = struct.unpack_from("<I", desc, 0x04)[0]
        table_block = struct.unpack_from("<I", desc, 0x08)[0]
        free = struct.unpack_from("<H", desc, 0x0E)[0]
        flags = struct.unpack_from("<H", desc, 0x12)[0]
        unused = struct.unpack_from("<H", desc, 0x1C)[0]
        if wide:
            bitmap_block |= struct.unpack_from("<I", desc, 0x24)[0] << 32
            table_block |= struct.unpack_from("<I", desc, 0x28)[0] << 32
            free |= struct.unpack_from("<H", desc, 0x2E)[0] << 16
            unused |= struct.unpack_from("<H", desc, 0x32)[0] << 16
        if flags & _EXT4_BG_INODE_UNINIT or free >= per_group:
            continue
        used = per_group - unused if has_unused else per_group
        if used <= 0:
            continue
        bitmap = read(bitmap_block * block, _ceil(per_group, 8))
        table = bytearray(read(table_block * block, used * inode_size))
        dirty = False
        for index in range(used):
            if not bitmap[index >> 3] & (1 << (index & 7)):
                continue
            if group * per_group + index + 1 < info["first_inode"]:
                continue
            if _pin_inode(table, index * inode_size, inode_size, csum):
                dirty = True
                changed += 1
        if dirty:
            os.pwrite(fd, bytes(table), table_block * block)
    return changed


# ----------------------------------------------------------------------------
# Copying the built filesystem into the partition

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a byte range of a regular file (it then reads as zeros). False when unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fallocate = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    if fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    return False


def _zero_range(fd: int, offset: int, length: int) -> None:
    """Write zeros over the allocated parts of a range (where punching holes is not supported)."""
    zeros = bytes(_CHUNK)
    for start, end in list(data_extents(fd, offset, offset + length)):
        pos = start
        while pos < end:
            count = min(_CHUNK, end - pos)
            os.pwrite(fd, zeros[:count], pos)
            pos += count


def _copy_range(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
    copy_file_range = getattr(os, "copy_file_range", None)
    while length > 0 and copy_file_range is not None:
        try:
            done = copy_file_range(src, dst, min(length, 1 << 30), src_offset, dst_offset)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM,
                             errno.EBADF):
                break
            raise
        if done <= 0:
            break
        src_offset += done
        dst_offset += done
        length -= done
    while length > 0:
        data = os.pread(src, min(length, _CHUNK), src_offset)
        if not data:
            data = bytes(min(length, _CHUNK))
        view = memoryview(data)
        while view:
            written = os.pwrite(dst, view, dst_offset)
            view = view[written:]
            dst_offset += written
        src_offset += len(data)
        length -= len(data)


def check_room(image: Image, tmp_fd: int, offset: int, size: int) -> None:
    """Refuse before the partition is punched when the image's filesystem cannot hold the new one."""
    if image.is_block:
        return
    held = sum(end - start for start, end in data_extents(image.fd, offset, offset + size))
    needed = os.fstat(tmp_fd).st_blocks * 512 - held
    stats = os.fstatvfs(image.fd)
    free = stats.f_bavail * stats.f_frsize
    if needed > free:
        raise BuildError(f"the build host's filesystem holding {image.path} has {format_size(free)} free, but the new "
                         f"filesystem needs {format_size(needed)} more there; free some space", option="image",
                         free=free, needed=needed)


def install(image: Image, tmp_fd: int, offset: int, size: int) -> None:
    """Put the filesystem in ``tmp_fd`` into ``image`` at ``offset``, keeping a regular image sparse.

    On a regular file the partition range is first turned into a hole, then only the
    data extents of the temporary file are copied. A block device gets every byte.
    """
    if image.is_block:
        pos = 0
        while pos < size:
            count = min(_CHUNK, size - pos)
            data = os.pread(tmp_fd, count, pos)
            data += bytes(count - len(data))
            image.write(offset + pos, data)
            pos += count
    else:
        if not _punch_hole(image.fd, offset, size):
            _zero_range(image.fd, offset, size)
        for start, end in data_extents(tmp_fd, 0, size):
            _copy_range(tmp_fd, image.fd, start, offset + start, end - start)
    os.fsync(image.fd)


# ----------------------------------------------------------------------------
# Building


@dataclass
class _Context:
    image: str
    fstype: str
    source: str | None
    tree: Tree | None
    label: str
    uuid: str
    hash_seed: str
    options: _mkfs.MkfsOptions
    tools: Tools
    epoch: int
    part: t.Any
    root_owner: tuple[int, int]


def _temp_prefix(image: str) -> str:
    return f".{os.path.basename(image)}.filesystem-"


def _remove_stale_temps(image: str) -> None:
    """Temporary files of builds that were killed: only a lock holder creates them, and we hold the lock."""
    directory = os.path.dirname(os.path.abspath(image))
    # The record is saved through a temp file too (a kill in that instant leaves it behind).
    patterns = [glob.escape(_temp_prefix(image)) + "*.tmp", glob.escape(f".{os.path.basename(image)}.osimage-state.json.") + "*.tmp"]
    for path in (found for pattern in patterns for found in glob.glob(os.path.join(glob.escape(directory), pattern))):
        try:
            os.unlink(path)
        except OSError:
            pass


def _make_temp(directory: str, prefix: str, size: int) -> tuple[int, str]:
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd, path


def _mke2fs(ctx: _Context, target: str, with_tree: bool) -> None:
    argv = _mkfs.mke2fs_argv(ctx.tools.mkfs, ctx.fstype, target, ctx.uuid, ctx.hash_seed, ctx.label, ctx.root_owner,
                             ctx.source if with_tree else None, ctx.options, ctx.tools.mkfs_version)
    done = _run(argv, _mkfs.mke2fs_env(os.environ, ctx.epoch), "mke2fs")
    if done.returncode == 0:
        return
    text = _output(done)
    lowered = text.lower()
    if "no space left on device" in lowered:
        # mke2fs writes the temporary file beside the image: the build host is full, not the partition.
        raise BuildError(f"the build host's filesystem holding {os.path.dirname(os.path.abspath(ctx.image))} ran out of space "
                         f"while mke2fs built the {ctx.fstype} filesystem there (a temporary file of up to the partition's "
                         f"size); free space there. mke2fs said: {text}", option="image")
    if with_tree and any(word in lowered for word in ("could not allocate", "no free space")):
        raise BuildError(f"the tree in {ctx.source} does not fit into the {ctx.fstype} filesystem on partition "
                         f"{ctx.part.number} ({format_size(ctx.part.sectors * SECTOR_SIZE)}); make the partition bigger "
                         f"or the tree smaller. mke2fs said: {text}", option="source")
    if with_tree and "populating" in lowered:
        raise BuildError(f"mke2fs could not copy the tree in {ctx.source}: {text}", option="source")
    raise BuildError(f"mke2fs failed: {text}", option="mkfs_options" if ctx.options.args or ctx.options.extended else "fstype")


def _mkfs_fat(ctx: _Context, target: str) -> dict[str, t.Any]:
    size = ctx.part.sectors * SECTOR_SIZE
    geometry = _mkfs.fat_geometry(size)
    argv = _mkfs.mkfs_fat_argv(ctx.tools.mkfs, target, ctx.uuid, ctx.label, ctx.part.start_sector, geometry, ctx.options,
                               ctx.tools.mkfs_version)
    env = dict(os.environ, LC_ALL="C", TZ="UTC", SOURCE_DATE_EPOCH=str(max(ctx.epoch, 1)))
    done = _run(argv, env, "mkfs.fat")
    if done.returncode != 0:
        raise BuildError(f"mkfs.fat failed: {_output(done)}", option="mkfs_options" if ctx.options.args else "fstype")
    with open(target, "rb") as handle:
        info = probe_fat(lambda offset, length: os.pread(handle.fileno(), length, offset), 0)
    if info is None:
        raise BuildError("mkfs.fat left no FAT boot sector in the temporary file", option="fstype")
    return info


def _fill_fat(ctx: _Context, target: str, home: str) -> None:
    tree = ctx.tree
    if tree is None:
        return
    env = _mkfs.mtools_env(os.environ, ctx.epoch, home)
    base = os.fsencode(os.path.abspath(tree.root))
    directories = [entry.path for entry in tree.entries if entry.kind == "dir" and entry.path]
    files: dict[bytes, list[bytes]] = {}
    for entry in tree.entries:
        if entry.kind == "file":
            parent = entry.path.rsplit(b"/", 1)[0] if b"/" in entry.path else b""
            files.setdefault(parent, []).append(base + b"/" + entry.path)
    commands = _mkfs.mmd_argv(ctx.tools.mmd, target, directories)
    for directory in [b""] + directories:
        if directory in files:
            commands += _mkfs.mcopy_argv(ctx.tools.mcopy, target, files[directory], directory)
    for argv in commands:
        done = _run(argv, env, "mtools")
        if done.returncode != 0:
            text = _output(done)
            if "disk full" in text.lower() or "no free" in text.lower():
                raise BuildError(f"the tree in {ctx.source} does not fit into the FAT filesystem on partition "
                                 f"{ctx.part.number} ({format_size(ctx.part.sectors * SECTOR_SIZE)}); make the partition "
                                 f"bigger or the tree smaller. mtools said: {text}", option="source")
            raise BuildError(f"{os.path.basename(str(argv[0]))} could not copy the tree in {ctx.source}: {text}", option="source")


def _build(ctx: _Context, directory: str, check_only: bool) -> tuple[int, str] | None:
    """Make the filesystem in a temporary file in ``directory``; return (fd, path), or None when ``check_only``.

    First the empty filesystem, whose free counts say whether the tree fits; then
    (unless only checking) the filled one. The file is removed on any failure; on
    success the caller removes it.
    """
    size = ctx.part.sectors * SECTOR_SIZE
    fd, path = _make_temp(directory, _temp_prefix(ctx.image), size)
    keep = False
    try:
        if ctx.fstype == "vfat":
            info = _mkfs_fat(ctx, path)
            _check_fits(ctx, info)
            if not check_only:
                home = tempfile.mkdtemp(prefix=".osimage-mtools-", dir=directory)
                try:
                    _fill_fat(ctx, path, home)
                finally:
                    shutil.rmtree(home, ignore_errors=True)
        else:
            if ctx.tree is not None:
                _mke2fs(ctx, path, with_tree=False)
                info = probe_ext(lambda offset, length: os.pread(fd, length, offset), 0)
                if info is None:
                    raise BuildError("mke2fs left no ext superblock in the temporary file", option="fstype")
                _check_fits(ctx, info)
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
            if not check_only:
                _mke2fs(ctx, path, with_tree=ctx.tree is not None)
                pin_ext_times(fd)
        if check_only:
            return None
        os.fsync(fd)
        keep = True
        return fd, path
    finally:
        if not keep:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass


# ----------------------------------------------------------------------------
# The module


def _only_zeros(image: Image, offset: int, size: int) -> bool:
    """Whether the allocated parts of a range hold nothing but zeros (a preallocated image, a fresh disk).

    Only asked when the partition has no record and no filesystem is recognised; it
    stops at the first byte that is not zero, so data is found quickly.
    """
    extents = [(offset, offset + size)] if image.is_block else list(data_extents(image.fd, offset, offset + size))
    for start, end in extents:
        pos = start
        while pos < end:
            chunk = image.read(pos, min(_CHUNK, end - pos))
            if chunk.count(0) != len(chunk):
                return False
            pos += len(chunk)
    return True


def _epoch(tree: Tree | None) -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value not in (None, ""):
        try:
            return max(int(str(value).strip()), 0)
        except ValueError:
            raise BuildError(f"the environment variable SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds",
                             option="source")
    return tree.newest_mtime if tree is not None else 0


def _summary(fstype: str, uuid: str, label: str, size: int, tree_digest: str | None) -> str:
    tree = f"tree {tree_digest.split(':')[-1][:16]}" if tree_digest else "empty (no source)"
    return f"{fstype}, UUID {uuid}, label {label!r}, {format_size(size)}, {tree}\n"


def _result(changed: bool, built: bool, msg: str, part: t.Any, fstype: str, uuid: str, label: str,
            before: str, after: str, header: str) -> dict[str, t.Any]:
    return {
        "changed": changed,
        "built": built,
        "msg": msg,
        "partition": part.number if part is not None else None,
        "offset": part.start_sector * SECTOR_SIZE if part is not None else None,
        "size": part.sectors * SECTOR_SIZE if part is not None else None,
        "fstype": fstype,
        "uuid": uuid,
        "label": label,
        "diff": {"before": before, "after": after, "before_header": header, "after_header": header},
    }


def ensure_filesystem(image: str, partition: object, fstype: str, source: str | None = None, label: str | None = None,
                      uuid: str | None = None, mkfs_options: list[str] | None = None, seed: str = DEFAULT_SEED,
                      force: bool = False, allow_block_device: bool = False, check_mode: bool = False) -> dict[str, t.Any]:
    """Make partition ``partition`` of ``image`` hold a ``fstype`` filesystem filled from ``source``; return the module result."""
    if fstype not in FSTYPES:
        raise BuildError(f"{fstype!r} is not a supported filesystem type; use one of {', '.join(FSTYPES)}", option="fstype")
    if not isinstance(seed, str) or not seed:
        raise BuildError(f"{seed!r} is not a seed; give a non-empty string", option="seed")
    if partition is None or str(partition).strip() == "":
        raise BuildError("give the partition number or GPT name", option="partition")
    label = _mkfs.check_label(fstype, label)
    given_uuid = _mkfs.check_uuid(fstype, uuid)
    options = _mkfs.check_mkfs_options(fstype, mkfs_options)
    if check_mode and (image_kind(image, "image", allow_block_device) is None or (source and not os.path.lexists(source))):
        # A check run of a whole playbook: the tasks that make the image and the tree did not run either.
        return _result(True, False, f"{image} or {source} does not exist yet; the {fstype} filesystem would be built once they do",
                       None, fstype, given_uuid or "", label, "(no image)\n", f"{fstype} on partition {partition}\n", image)

    tree = walk_tree(source, "source") if source else None
    if tree is not None and fstype == "vfat":
        check_fat_tree(tree)
    epoch = _epoch(tree)
    tools = find_tools(fstype)

    with Image(image, writable=not check_mode, allow_block_device=allow_block_device) as img:
        if not check_mode:
            img.lock()
        try:
            table = read_table(img)
        except BuildError:
            if check_mode:
                return _result(True, False, f"{image} has no partition table yet; the {fstype} filesystem would be built "
                               "once it has one", None, fstype, given_uuid or "", label, "(no partition table)\n",
                               f"{fstype} on partition {partition}\n", image)
            raise
        part = find_partition(table, partition, "partition")
        offset = part.start_sector * SECTOR_SIZE
        size = part.sectors * SECTOR_SIZE
        if offset + size > img.size:
            raise BuildError(f"partition {part.number} ends at byte {offset + size} but {image} has only {img.size} bytes; "
                             "grow the image (disk_image size) or fix the partition table", option="partition")
        identity = part.uuid.lower() if part.uuid else f"sector-{part.start_sector}"
        if fstype == "vfat":
            fs_uuid = given_uuid or _mkfs.fat_volume_id(derive_uuid(seed, "filesystem", identity))
            hash_seed = ""
        else:
            fs_uuid = given_uuid or str(derive_uuid(seed, "filesystem", identity))
            hash_seed = str(derive_uuid(seed, "filesystem", identity, "hash_seed"))
        root_owner = (tree.entries[0].uid, tree.entries[0].gid) if tree is not None else (0, 0)
        digest = input_digest({
            "format": BUILD_FORMAT, "fstype": fstype, "label": label, "uuid": fs_uuid, "hash_seed": hash_seed,
            "mkfs_options": list(mkfs_options or []), "seed": seed, "start_sector": part.start_sector,
            "sectors": part.sectors, "tree": tree.digest if tree is not None else None, "epoch": epoch,
            "tools": tools.identity(), "root_owner": list(root_owner),
        })
        ctx = _Context(image=image, fstype=fstype, source=source, tree=tree, label=label, uuid=fs_uuid, hash_seed=hash_seed,
                       options=options, tools=tools, epoch=epoch, part=part, root_owner=root_owner)
        header = f"{image} partition {part.number} ({format_size(size)} at byte {offset})"
        after = _summary(fstype, fs_uuid, label, size, tree.digest if tree is not None else None)

        state = StateFile(state_path(image, img.is_block))
        record = state.get(part.start_sector)
        if record is not None and record.get("sectors") != part.sectors:
            record = None
        has_data = img.has_data(offset, size)
        current = fingerprint(img, offset, size) if has_data else None
        ours = record is not None and current is not None and record.get("fingerprint") == current
        # An install this module started and never finished (killed, host disk full) left
        # only its own half-written bytes there: rebuilding it needs no force.
        interrupted = record is not None and bool(record.get("installing"))
        if ours and record.get("input_digest") == digest:
            return _result(False, False, f"partition {part.number} already holds this {fstype} filesystem", part,
                           record.get("fstype", fstype), record.get("uuid", fs_uuid), record.get("label", label),
                           after, after, header)
        if interrupted:
            before = "(a build of this module that was interrupted while it was copied in)\n"
        elif ours:
            before = _summary(record.get("fstype", "?"), record.get("uuid", "?"), record.get("label", ""), size,
                              record.get("tree"))
        elif has_data and _only_zeros(img, offset, size):
            before = "(partition allocated but all zeros)\n"
        elif has_data:
            found = probe(img.read, offset)
            why = ("it changed since this module built it (mounted, or written with other tools)" if record is not None
                   else "this module did not build it")
            before = f"{describe(found)} ({why})\n"
            if not force:
                brief = {key: value for key, value in (found or {}).items() if key in ("fstype", "uuid", "label", "size")}
                raise BuildError(f"partition {part.number} of {image} holds data ({describe(found)}) and {why}; building "
                                 f"the {fstype} filesystem would destroy it. Set force=true to replace it.",
                                 option="partition", found=brief)
        else:
            before = "(empty partition)\n"

        if tree is not None:
            _check_readable(tree)
        if check_mode:
            _build(ctx, tempfile.gettempdir(), check_only=True)
            return _result(True, False, f"the {fstype} filesystem on partition {part.number} would be built", part, fstype,
                           fs_uuid, label, before, after, header)

        _remove_stale_temps(image)
        built = _build(ctx, os.path.dirname(os.path.abspath(image)), check_only=False)
        if built is None:  # pragma: no cover - only check_only returns None
            raise BuildError("internal error: the build made nothing")
        tmp_fd, tmp_path = built
        try:
            check_room(img, tmp_fd, offset, size)
            state.drop_overlapping(part.start_sector, part.sectors)
            state.put(part.start_sector, {"installing": True, "sectors": part.sectors, "partition": part.number})
            state.save()
            try:
                install(img, tmp_fd, offset, size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                # The record says "installing", so the next run rebuilds this partition without force.
                raise BuildError(f"the build host's filesystem holding {image} filled up while the {fstype} filesystem was "
                                 "copied into the image; free space there and run again", option="image")
        finally:
            os.close(tmp_fd)
            try:
                os.unlink(tmp_path)
            except OSError:
                pass
        state.put(part.start_sector, {
            "input_digest": digest, "fingerprint": fingerprint(img, offset, size), "fstype": fstype, "uuid": fs_uuid,
            "label": label, "size": size, "sectors": part.sectors, "partition": part.number,
            "tree": tree.digest if tree is not None else None,
        })
        state.save()
    return _result(True, True, f"built the {fstype} filesystem on partition {part.number}", part, fstype, fs_uuid, label,
                   before, after, header)
