# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What the image_convert module does: a raw image converted with qemu-img, atomically,
reproducibly and only when something changed.

* The output is written by ``qemu-img convert`` into a private temporary directory beside
  ``dest`` under dest's own file name (a VMDK's descriptor names its own file, so a random
  temporary name would end up inside the image), fsynced, then renamed over ``dest``. An
  interrupted run leaves the old ``dest`` (or none) and a temporary directory that the
  next run removes.
* qemu-img fills some header fields with random numbers or the clock (VMDK CID, VDI UUIDs,
  VHD UUID and timestamp, VHDX GUIDs and sequence numbers). They are rewritten with values
  derived from ``seed`` and a digest of the rest of the output (so changed contents get new
  identifiers, as the formats expect), the VHD timestamp with SOURCE_DATE_EPOCH or src's
  modification time, and every checksum over them is recomputed.
* What the output was made from is recorded in dest's state file (see _state): the
  identity of src (size, times, inode; for a block device a sha256 of its contents), the
  conversion settings, the qemu-img version, and the identity of dest right after it was
  written. A rerun compares metadata only and runs no process.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import struct
import tempfile
import typing as t
import uuid as uuidlib
from contextlib import contextmanager

from ansible_collections.osimage.builder.plugins.module_utils import _qemu_img as qi
from ansible_collections.osimage.builder.plugins.module_utils._commands import find_tool, run
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._image import image_kind
from ansible_collections.osimage.builder.plugins.module_utils._sizes import format_size
from ansible_collections.osimage.builder.plugins.module_utils._state import (
    DEFAULT_SEED, STATE_SUFFIX, StateFile, data_extents, derive_uuid, input_digest, state_path,
)

RECORD_KEY = "image_convert"
RECORD_VERSION = 1
# Bump when the bytes written for the same inputs change, so older records no longer match.
BUILD_FORMAT = 1
TEMP_MARK = ".osimage-convert-"
LOCK_SUFFIX = ".osimage-convert.lock"
_MKDTEMP_CHARS = "[a-z0-9_]{8}"
_CHUNK = 4 * 1024 * 1024
_DIGEST_BLOCK = 64 * 1024
_ZEROS = bytes(_DIGEST_BLOCK)
VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z, where VHD timestamps count from
ID_FORMATS = ("vmdk", "vdi", "vpc", "vhdx")


# ----------------------------------------------------------------------------
# CRC-32C (Castagnoli), which VHDX uses; not in the standard library.

def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _bit in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _with_field(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


# ----------------------------------------------------------------------------
# Identifiers qemu-img makes random


class Volatile:
    """The random fields of one output file and how to rewrite them.

    ``ranges`` are the ``(offset, length)`` byte ranges that differ from run to run
    (left out of the content digest); ``patches(ident, timestamp)`` gives the
    ``(offset, bytes)`` writes that make them deterministic, checksums included.
    ``ident(name, original)`` returns the derived 16-byte value for a field.
    ``canonical`` is fed to the content digest in place of what ``ranges`` hide, when
    the random field has a variable length (the VMDK CID) and moves the bytes after it.
    """

    def __init__(self, fmt: str, ranges: list[tuple[int, int]],
                 patches: t.Callable[[t.Callable[[str, bytes], uuidlib.UUID], int], list[tuple[int, bytes]]],
                 fields: list[str], canonical: bytes = b"") -> None:
        self.fmt = fmt
        self.canonical = canonical
        self.ranges = ranges
        self.patches = patches
        self.fields = fields


Reader = t.Callable[[int, int], bytes]


def _vmdk_volatile(read: Reader, size: int) -> Volatile | None:
    head = read(0, 512)
    if head[:4] != b"KDMV":
        return None
    desc_sector, desc_sectors = struct.unpack_from("<QQ", head, 28)
    if not desc_sector or not 0 < desc_sectors <= 2048:
        return None
    area = read(desc_sector * 512, desc_sectors * 512)
    # qemu writes "CID=%x": 1 to 8 hex digits, so the text after it moves with the value.
    match = re.search(rb"^CID=([0-9a-f]{1,8})$", area, re.M)
    if not match:
        return None
    offset = desc_sector * 512 + match.start(1)
    text_end = area.find(b"\0")
    text_end = len(area) if text_end < 0 else text_end
    canonical = area[:match.start(1)] + area[match.end(1):text_end]

    def patches(ident: t.Callable[[str, bytes], uuidlib.UUID], timestamp: int) -> list[tuple[int, bytes]]:
        cid = ident("vmdk-cid", b"").int & 0xFFFFFFFF
        if cid >= 0xFFFFFFFE:  # 0xffffffff means "no parent" in parentCID
            cid = 0x0BADC1D0
        text = area[:match.start(1)] + b"%x" % cid + area[match.end(1):text_end]
        if len(text) > len(area):
            return []
        return [(desc_sector * 512, text + bytes(len(area) - len(text)))]

    return Volatile("vmdk", [(offset, len(area) - match.start(1))], patches, ["CID"], canonical)


_VDI_SIGNATURE = 0xBEDA107F


def _vdi_volatile(read: Reader, size: int) -> Volatile | None:
    head = read(0, 0x1C8)
    if len(head) < 0x1C8 or struct.unpack_from("<I", head, 0x40)[0] != _VDI_SIGNATURE:
        return None
    # (offset, derivation name): uuid_image and uuid_last_snap; uuid_link and uuid_parent stay zero.
    fields = [(offset, name) for offset, name in ((0x188, "vdi-image-uuid"), (0x198, "vdi-last-snapshot-uuid"))
              if head[offset:offset + 16] != bytes(16)]

    def patches(ident: t.Callable[[str, bytes], uuidlib.UUID], timestamp: int) -> list[tuple[int, bytes]]:
        # VDI stores UUIDs with the first three fields little-endian, like Microsoft GUIDs.
        return [(offset, ident(name, b"").bytes_le) for offset, name in fields]

    labels = {"vdi-image-uuid": "uuid_image", "vdi-last-snapshot-uuid": "uuid_last_snap"}
    return Volatile("vdi", [(offset, 16) for offset, name in fields], patches, [labels[name] for offset, name in fields])


def vpc_checksum(footer: bytes) -> int:
    """The VHD footer checksum: one's complement of the byte sum, checksum field counted as zero."""
    return ~sum(footer[:64] + footer[68:]) & 0xFFFFFFFF


def _vpc_volatile(read: Reader, size: int) -> Volatile | None:
    offsets = []
    if size >= 512 and read(size - 512, 8) == b"conectix":
        offsets.append(size - 512)
    if read(0, 8) == b"conectix" and 0 not in offsets:
        offsets.append(0)  # a dynamic VHD keeps a copy of the footer at the start
    footers = {offset: read(offset, 512) for offset in offsets}
    if not footers or any(struct.unpack_from(">I", footer, 64)[0] != vpc_checksum(footer) for footer in footers.values()):
        return None
    ranges = []
    for offset in offsets:
        ranges += [(offset + 24, 4), (offset + 64, 4), (offset + 68, 16)]

    def patches(ident: t.Callable[[str, bytes], uuidlib.UUID], timestamp: int) -> list[tuple[int, bytes]]:
        disk_id = ident("vpc-uuid", b"").bytes
        stamp = min(max(timestamp - VHD_EPOCH, 0), 0xFFFFFFFF)
        writes = []
        for offset, footer in sorted(footers.items()):
            new = _with_field(_with_field(footer, 24, struct.pack(">I", stamp)), 68, disk_id)
            new = _with_field(new, 64, struct.pack(">I", vpc_checksum(new)))
            writes.append((offset, new))
        return writes

    return Volatile("vpc", ranges, patches, ["timestamp", "uuid"])


_VHDX_HEADERS = (64 * 1024, 128 * 1024)
_VHDX_REGION_TABLE = 192 * 1024
_VHDX_METADATA_REGION = uuidlib.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
_VHDX_PAGE83 = uuidlib.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746").bytes_le
_LOG_SECTOR = 4096


def _vhdx_checked(block: bytes, signature: bytes) -> bool:
    return block[:4] == signature and struct.unpack_from("<I", block, 4)[0] == crc32c(_with_field(block, 4, bytes(4)))


def _vhdx_volatile(read: Reader, size: int) -> Volatile | None:  # pylint: disable=too-many-locals
    if read(0, 8) != b"vhdxfile":
        return None
    headers = {offset: read(offset, 4096) for offset in _VHDX_HEADERS}
    if not all(_vhdx_checked(block, b"head") for block in headers.values()):
        return None
    if any(block[48:64] != bytes(16) for block in headers.values()):
        return None  # a log that still needs replaying: leave the image as qemu-img wrote it
    log_length, log_offset = struct.unpack_from("<IQ", headers[_VHDX_HEADERS[0]], 68)
    ranges: list[tuple[int, int]] = []
    for offset in _VHDX_HEADERS:
        ranges += [(offset + 4, 4), (offset + 8, 8), (offset + 16, 32)]

    # Log entries left from the conversion (the log is empty: their LogGuid no longer
    # matches the header's zero LogGuid, but they keep the random GUID they were written with).
    entries: dict[int, tuple[bytes, bool]] = {}
    pos = log_offset
    end = log_offset + log_length
    while log_length and pos + 64 <= end:
        if read(pos, 4) == b"loge":
            length = struct.unpack_from("<I", read(pos + 8, 4))[0]
            if length and length % _LOG_SECTOR == 0 and pos + length <= end:
                entry = read(pos, length)
                valid = _vhdx_checked(entry, b"loge")
                entries[pos] = (entry, valid)
                ranges += [(pos + 4, 4), (pos + 32, 16)]
                if valid:
                    pos += length
                    continue
            else:
                head = read(pos, _LOG_SECTOR)
                entries[pos] = (head, False)
                ranges += [(pos + 4, 4), (pos + 32, 16)]
        pos += _LOG_SECTOR

    regions = read(_VHDX_REGION_TABLE, 64 * 1024)
    if not _vhdx_checked(regions, b"regi"):
        return None
    page83 = None
    for index in range(struct.unpack_from("<I", regions, 8)[0]):
        guid = regions[16 + 32 * index:32 + 32 * index]
        region_offset = struct.unpack_from("<Q", regions, 32 + 32 * index)[0]
        if guid != _VHDX_METADATA_REGION:
            continue
        table = read(region_offset, 64 * 1024)
        if table[:8] != b"metadata":
            return None
        for item in range(struct.unpack_from("<H", table, 10)[0]):
            base = 32 + 32 * item
            if table[base:base + 16] == _VHDX_PAGE83:
                item_offset, item_length = struct.unpack_from("<II", table, base + 16)
                if item_length == 16:
                    page83 = region_offset + item_offset
    if page83 is not None:
        ranges.append((page83, 16))
    sequences = [struct.unpack_from("<Q", block, 8)[0] for block in headers.values()]

    def patches(ident: t.Callable[[str, bytes], uuidlib.UUID], timestamp: int) -> list[tuple[int, bytes]]:
        writes = []
        base = ident("vhdx-sequence", b"").int & 0xFFFFFFFF
        for offset, block in sorted(headers.items()):
            sequence = struct.unpack_from("<Q", block, 8)[0] - min(sequences) + base
            new = _with_field(block, 8, struct.pack("<Q", sequence))
            new = _with_field(new, 16, ident("vhdx-file-write-guid", block[16:32]).bytes_le)
            new = _with_field(new, 32, ident("vhdx-data-write-guid", block[32:48]).bytes_le)
            new = _with_field(new, 4, struct.pack("<I", crc32c(_with_field(new, 4, bytes(4)))))
            writes.append((offset, new))
        for offset, (entry, valid) in sorted(entries.items()):
            new = _with_field(entry, 32, ident("vhdx-log-guid", entry[32:48]).bytes_le)
            checksum = crc32c(_with_field(new, 4, bytes(4)))
            if not valid:
                checksum ^= 0xFFFFFFFF  # stays invalid, as it was
            new = _with_field(new, 4, struct.pack("<I", checksum))
            writes.append((offset, new[:48]))
        if page83 is not None:
            writes.append((page83, ident("vhdx-page83", b"").bytes_le))
        return writes

    fields = ["header sequence numbers", "FileWriteGuid", "DataWriteGuid", "log entry GUIDs"]
    return Volatile("vhdx", ranges, patches, fields + (["Page83Data"] if page83 is not None else []))


_VOLATILE = {"vmdk": _vmdk_volatile, "vdi": _vdi_volatile, "vpc": _vpc_volatile, "vhdx": _vhdx_volatile}


def find_volatile(fmt: str, read: Reader, size: int) -> Volatile | None:
    """The random fields qemu-img wrote into an image of ``fmt`` (None: none, or not recognised)."""
    finder = _VOLATILE.get(fmt)
    return finder(read, size) if finder else None


def content_digest(fd: int, size: int, ranges: t.Sequence[tuple[int, int]] = (), canonical: bytes = b"") -> str:
    """sha256 over the non-zero 64 KiB blocks of a file (with their offsets), ``ranges`` read as zeros.

    Holes and zero blocks count alike, so the digest depends on the bytes only, not on
    how the filesystem allocated them; a multi-GiB sparse image costs its data only.
    """
    blanks: dict[int, list[tuple[int, int]]] = {}
    for offset, length in ranges:
        pos = offset
        while pos < offset + length:
            block = pos // _DIGEST_BLOCK
            stop = min(offset + length, (block + 1) * _DIGEST_BLOCK)
            blanks.setdefault(block, []).append((pos - block * _DIGEST_BLOCK, stop - pos))
            pos = stop
    digest = hashlib.sha256(b"osimage.builder image content v1\0" + struct.pack("<QQ", size, len(canonical)) + canonical)
    done = 0
    for start, end in data_extents(fd, 0, size):
        first = max(start // _DIGEST_BLOCK, done)
        last = -(-end // _DIGEST_BLOCK)
        for block in range(first, last):
            data = os.pread(fd, _DIGEST_BLOCK, block * _DIGEST_BLOCK)
            for offset, length in blanks.get(block, ()):
                data = data[:offset] + bytes(length) + data[offset + length:]
            if data != _ZEROS[:len(data)]:
                digest.update(struct.pack("<Q", block) + data)
        done = max(done, last)
    return digest.hexdigest()


def make_deterministic(path: str, fmt: str, seed: str, timestamp: int) -> list[str]:
    """Rewrite the random fields of the image at ``path``; return the names of the fields rewritten."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size

        def read(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        volatile = find_volatile(fmt, read, size)
        if volatile is None:
            return []
        digest = content_digest(fd, size, volatile.ranges, volatile.canonical)
        seen: dict[tuple[str, bytes], uuidlib.UUID] = {}
        counters: dict[str, int] = {}

        def ident(name: str, original: bytes) -> uuidlib.UUID:
            # The same random value in two places gets the same derived value, and different ones differ.
            key = (name, original)
            if key not in seen:
                number = counters.get(name, 0)
                counters[name] = number + 1
                seen[key] = derive_uuid(seed, "image_convert", fmt, digest, name, str(number))
            return seen[key]

        writes = volatile.patches(ident, timestamp)
        for offset, data in writes:
            written = os.pwrite(fd, data, offset)
            if written != len(data):
                raise BuildError(f"{path}: short write while rewriting the image header", option="dest")
        return volatile.fields if writes else []
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------
# What the output is made from, and whether it is up to date


def file_identity(st: os.stat_result) -> dict[str, int]:
    """Metadata that changes whenever a regular file's contents change (ctime cannot be set back)."""
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def dest_identity(st: os.stat_result) -> dict[str, int]:
    """The output right after it was written. Not ctime: chmod or chown of dest is no reason to convert again."""
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _device_identity(path: str, st: os.stat_result) -> dict[str, t.Any]:
    """A block device's metadata says nothing about its contents: hash them (one read of the device)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return {"rdev": st.st_rdev, "size": size, "sha256": digest.hexdigest()}


def decide(record: dict[str, t.Any] | None, inputs: str, parts: dict[str, t.Any], dest_now: dict[str, int] | None,
           force: bool) -> tuple[str, str]:
    """``("keep"|"convert"|"foreign", reason)`` from the record, the wanted inputs and dest as it is now."""
    if dest_now is None:
        return "convert", "dest does not exist"
    if record is None:
        if force:
            return "convert", "dest was not made by this module; replaced because force=true"
        return "foreign", "dest exists but was not made by this module (no record of it in its state file)"
    if record.get("dest") != dest_now:
        return "convert", "dest was changed or replaced after it was written"
    if force:
        return "convert", "force=true"
    if record.get("inputs") != inputs:
        return "convert", _what_changed(record.get("parts") or {}, parts)
    return "keep", "up to date"


def _what_changed(old: dict[str, t.Any], new: dict[str, t.Any]) -> str:
    names = {"src": "src changed", "src_path": "src is another file", "settings": "the conversion settings changed",
             "qemu_img": "qemu-img was upgraded or replaced", "build": "this module now writes images differently"}
    changed = [text for key, text in names.items() if old.get(key) != new.get(key)]
    return "; ".join(changed) or "the inputs changed"


def record_parts(src: str, src_id: dict[str, t.Any], fmt: str, compress: bool, compression_type: str,
                 pairs: t.Sequence[tuple[str, str]], seed: str, qemu_version: str, timestamp: int | None) -> dict[str, t.Any]:
    """Everything the bytes of the output depend on (and nothing they do not)."""
    settings: dict[str, t.Any] = {
        "format": fmt,
        "compress": bool(compress),
        "compression_type": qi.effective_compression_type(fmt, compress, compression_type),
        "options": [f"{key}={value}" for key, value in pairs],
    }
    if fmt in ID_FORMATS:
        settings["seed"] = seed
    if fmt == "vpc":
        settings["timestamp"] = timestamp
    return {"build": BUILD_FORMAT, "src_path": src, "src": src_id, "settings": settings, "qemu_img": qemu_version}


def short_digest(identity: dict[str, t.Any]) -> str:
    return input_digest(identity).rsplit(":", maxsplit=1)[-1][:12]


def _summary(settings: dict[str, t.Any] | None, virtual_size: int | None, src: str, src_short: str) -> str:
    if not settings:
        return ""
    fmt = settings["format"]
    if settings.get("compress"):
        fmt += f" (compressed{', ' + settings['compression_type'] if settings.get('compression_type') else ''})"
    lines = [f"format: {fmt}"]
    if virtual_size is not None:
        lines.append(f"virtual size: {format_size(virtual_size)} ({virtual_size} bytes)")
    lines.append(f"source: {src} @ {src_short}")
    lines.append(f"options: {','.join(settings.get('options') or []) or '(none)'}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# The state file, its lock and leftovers of interrupted runs


def read_record(path: str) -> dict[str, t.Any] | None:
    record = StateFile(path).data.get(RECORD_KEY)
    if isinstance(record, dict) and record.get("version") == RECORD_VERSION:
        return record
    return None


def write_record(path: str, record: dict[str, t.Any]) -> None:
    state = StateFile(path)
    state.data[RECORD_KEY] = record
    state.save()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def lock_path(dest: str) -> str:
    directory, base = os.path.split(dest)
    return os.path.join(directory, f".{base}{LOCK_SUFFIX}")


@contextmanager
def locked(dest: str) -> t.Iterator[None]:
    """Hold an exclusive lock for converting to ``dest``, so two runs never write it at once.

    The lock is a file of its own beside dest (``.<name>.osimage-convert.lock``), which is
    never replaced or removed: the state file is replaced by rename when it is saved, so
    it cannot be the lock. The lock goes with the process, also when it is killed.
    """
    fd = os.open(lock_path(dest), os.O_RDWR | os.O_CREAT | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0), 0o644 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def leftovers(dest: str) -> list[str]:
    """Temporary directories of interrupted conversions to ``dest`` (and temp files of its state file)."""
    directory, base = os.path.split(dest)
    ours = re.compile(rf"^\.{re.escape(base)}{re.escape(TEMP_MARK)}{_MKDTEMP_CHARS}$")
    record = re.compile(rf"^\.{re.escape(base + STATE_SUFFIX)}\.{_MKDTEMP_CHARS}\.tmp$")
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(os.path.join(directory, name) for name in names if ours.match(name) or record.match(name))


def remove_leftovers(paths: t.Iterable[str]) -> None:
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY if directory else os.O_RDWR) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if not directory or exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------
# The module


def _source_date_epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value in (None, ""):
        return None
    try:
        return max(int(str(value).strip()), 0)
    except ValueError:
        raise BuildError(f"the environment variable SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds",
                         option="format")


def _check_dest(dest: str, check_mode: bool) -> tuple[dict[str, int] | None, str | None]:
    """dest's identity (None: absent), and a message when its directory does not exist (check mode only)."""
    directory = os.path.dirname(dest)
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise BuildError(f"{dest}: a parent of this path is not a directory", option="dest")
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise BuildError(f"{dest} is a directory; give the path of the image file to write inside it", option="dest")
        if not stat.S_ISREG(st.st_mode):
            raise BuildError(f"{dest} is not a regular file; image_convert writes image files only "
                             "(convert to raw and copy that to a device if you must)", option="dest")
        return dest_identity(st), None
    if not os.path.isdir(directory):
        if check_mode:
            return None, f"{directory} does not exist yet"
        raise BuildError(f"the directory {directory} does not exist; create it first (ansible.builtin.file "
                         "with state=directory)", option="dest")
    return None, None


def _check_src(src: str, allow_block_device: bool, check_mode: bool) -> tuple[str | None, os.stat_result | None]:
    kind = image_kind(src, option="src", allow_block_device=allow_block_device)
    if kind is None:
        if check_mode:
            return None, None
        raise BuildError(f"{src} does not exist; build the raw image first (osimage.builder.disk_image and friends)",
                         option="src")
    if not os.access(src, os.R_OK):
        raise BuildError(f"{src}: permission denied (read access needed)", option="src")
    return kind, os.stat(src)


def _qemu_img_version(qemu_img: str, record: dict[str, t.Any] | None) -> tuple[str, dict[str, t.Any]]:
    """qemu-img's version: from the record while the binary is the same file, else from ``--version``."""
    st = os.stat(qemu_img)
    binary = {"path": qemu_img, "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    known = (record or {}).get("qemu_img_binary")
    if isinstance(known, dict) and {k: v for k, v in known.items() if k != "version"} == binary and known.get("version"):
        return known["version"], dict(binary, version=known["version"])
    version = qi.parse_version(run(qi.version_argv(qemu_img), option="format", what="qemu-img --version"))
    return version, dict(binary, version=version)


def _check_options_supported(qemu_img: str, fmt: str, target: str, pairs: t.Sequence[tuple[str, str]],
                             compression_type: str | None, version: str) -> None:
    wanted = list(pairs) + ([("compression_type", compression_type)] if compression_type == "zstd" else [])
    if not wanted:
        return
    supported = qi.parse_options_help(run(qi.options_help_argv(qemu_img, fmt, target), option="format",
                                          what=f"qemu-img create -f {fmt} -o help"))
    if compression_type == "zstd" and supported and "compression_type" not in supported:
        raise BuildError(f"qemu-img {version} cannot write zstd-compressed qcow2 (QEMU 5.1 or later can); "
                         "use compression_type=zlib", option="compression_type")
    qi.check_supported(list(pairs), supported, fmt)


def _convert(qemu_img: str, src: str, dest: str, request: dict[str, t.Any], kind: str, src_id: dict[str, t.Any],
             version: str, publish: t.Callable[[str, dict[str, t.Any], list[str], list[str]], None]) -> None:
    """Convert into a temporary directory beside dest, then ``publish`` and rename the result over dest.

    ``publish(tmp, info, fields, cmd)`` records the result before the rename: the rename keeps
    the inode, size and mtime, so the record already describes dest. Killed before the
    rename, the record does not match the old dest and the next run converts again; killed
    after it, the next run finds dest up to date.
    """
    fmt, compress, compression_type, pairs = request["fmt"], request["compress"], request["compression_type"], request["pairs"]
    directory, base = os.path.split(dest)
    tmpdir = tempfile.mkdtemp(prefix=f".{base}{TEMP_MARK}", dir=directory)
    try:
        tmp = os.path.join(tmpdir, base)
        _check_options_supported(qemu_img, fmt, tmp, pairs, qi.effective_compression_type(fmt, compress, compression_type),
                                 version)
        argv = qi.convert_argv(qemu_img, src, tmp, fmt, compress, compression_type, pairs)
        try:
            run(argv, option="dest", what="qemu-img convert")
        except BuildError as exc:
            exc.option = qi.blame(exc.message, pairs, compression_type, src)
            raise
        if kind == "file" and file_identity(os.stat(src)) != src_id:
            raise BuildError(f"{src} changed while it was being converted; run the task again once nothing writes to it",
                             option="src")
        fields = make_deterministic(tmp, fmt, request["seed"], request["timestamp"])
        os.chmod(tmp, 0o644 & ~_umask())
        _fsync_path(tmp)
        info = qi.parse_info(run(qi.info_argv(qemu_img, tmp, fmt), option="dest", what="qemu-img info"))
        if info["format"] != fmt:
            raise BuildError(f"qemu-img wrote a {info['format']} image, not {fmt}", option="format")
        publish(tmp, info, fields, [arg if arg != tmp else dest for arg in argv])
        os.replace(tmp, dest)
        _fsync_path(directory or ".", directory=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _before(record: dict[str, t.Any] | None, dest_now: dict[str, int] | None) -> str:
    if dest_now is None:
        return "absent\n"
    if record is None:
        return "present, not made by this module\n"
    parts = record.get("parts") or {}
    return _summary(parts.get("settings"), record.get("virtual_size"), parts.get("src_path", ""), record.get("src_short", ""))


def _kept(result: dict[str, t.Any], record: dict[str, t.Any], dest: str, checksum: bool, msg: str) -> dict[str, t.Any]:
    result.update(virtual_size=record["virtual_size"], actual_size=os.stat(dest).st_blocks * 512, msg=msg)
    if checksum:
        # Recorded when the image was written with checksum=true; else read once now.
        result["sha256"] = record.get("sha256") or sha256_file(dest)
    return result


def _current_dest(dest: str) -> dict[str, int] | None:
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        return None
    return dest_identity(st) if stat.S_ISREG(st.st_mode) else None


def convert_image(src: str, dest: str, fmt: str, compress: bool = False, compression_type: str = "zlib",
                  options: object = None, force: bool = False, allow_block_device: bool = False,
                  checksum: bool = False, seed: str = DEFAULT_SEED,
                  check_mode: bool = False) -> dict[str, t.Any]:
    """Make ``dest`` the conversion of ``src``; return the module result (with ``diff``)."""
    # pylint: disable=too-many-locals
    pairs = qi.normalize_options(options)
    qi.check_request(fmt, compress, compression_type, pairs)
    if not isinstance(seed, str) or not seed:
        raise BuildError("must be a non-empty string", option="seed")
    if dest.endswith(os.sep) or os.path.basename(dest) in ("", ".", ".."):
        raise BuildError(f"{dest} is not a file name; give the path of the image file to write", option="dest")
    src = os.path.abspath(src)
    dest = os.path.abspath(dest)
    if src == dest:
        raise BuildError(f"{dest} is src itself; convert into another file", option="dest")
    dest_now, dest_note = _check_dest(dest, check_mode)
    kind, src_st = _check_src(src, allow_block_device, check_mode)
    if dest_now is not None and src_st is not None and (dest_now["dev"], dest_now["ino"]) == (src_st.st_dev, src_st.st_ino):
        raise BuildError(f"{dest} is the same file as src; convert into another file", option="dest")
    qemu_img = find_tool([qi.QEMU_IMG], "format", qi.QEMU_IMG_PACKAGE)

    state_file = state_path(dest)
    record = read_record(state_file) if dest_note is None else None
    version, binary = _qemu_img_version(qemu_img, record)
    result: dict[str, t.Any] = {"changed": False, "dest": dest, "src": src, "format": fmt}
    before = _before(record, dest_now)

    if src_st is None or dest_note is not None:
        # Check mode on a fresh path: an earlier task would have made src or dest's directory.
        why = f"{src} does not exist yet" if src_st is None else dest_note
        settings = record_parts(src, {}, fmt, compress, compression_type, pairs, seed, version, None)["settings"]
        result.update(changed=True, msg=f"{why}; the conversion to {fmt} would run once it does",
                      diff={"before": before, "after": _summary(settings, None, src, "(not built yet)")})
        return result

    epoch = _source_date_epoch() if fmt == "vpc" else None  # only VHD stores a timestamp
    timestamp = epoch if epoch is not None else int(src_st.st_mtime)
    src_id = _device_identity(src, src_st) if kind == "block" else file_identity(src_st)
    parts = record_parts(src, src_id, fmt, compress, compression_type, pairs, seed, version,
                         timestamp if fmt == "vpc" else None)
    inputs = input_digest(parts)
    src_short = short_digest(src_id)
    action, reason = decide(record, inputs, parts, dest_now, force)
    if action == "foreign":
        raise BuildError(f"{dest} exists and was not written by this module; set force=true to replace it", option="dest")
    if action == "keep":
        result["diff"] = {"before": before, "after": before}
        if leftovers(dest) and not check_mode:
            try:
                with locked(dest):
                    remove_leftovers(leftovers(dest))
            except PermissionError:
                pass  # somebody else's leftovers in a directory this user may not change: not this task's business
        return _kept(result, record, dest, checksum, reason)
    if not os.access(os.path.dirname(dest), os.W_OK | os.X_OK):
        raise BuildError(f"permission denied: cannot create files in {os.path.dirname(dest)}", option="dest")
    if check_mode:
        result.update(changed=True, msg=f"would convert: {reason}",
                      diff={"before": before, "after": _summary(parts["settings"], None, src, src_short)})
        return result

    with locked(dest):
        # Another run may have converted while this one waited for the lock.
        record = read_record(state_file)
        action, reason = decide(record, inputs, parts, _current_dest(dest), force)
        if action == "foreign":
            raise BuildError(f"{dest} exists and was not written by this module; set force=true to replace it",
                             option="dest")
        remove_leftovers(leftovers(dest))
        if action == "keep":
            result["diff"] = {"before": before, "after": before}
            return _kept(result, record, dest, checksum, "up to date (converted by a run that finished first)")
        request = {"fmt": fmt, "compress": compress, "compression_type": compression_type, "pairs": pairs, "seed": seed,
                   "timestamp": timestamp}
        done: dict[str, t.Any] = {}

        def publish(tmp: str, info: dict[str, t.Any], fields: list[str], cmd: list[str]) -> None:
            new_record: dict[str, t.Any] = {
                "version": RECORD_VERSION,
                "inputs": inputs,
                "parts": parts,
                "src_short": src_short,
                "dest": dest_identity(os.stat(tmp)),
                "virtual_size": info["virtual_size"],
                "qemu_img_binary": binary,
                "rewritten_fields": fields,
            }
            if checksum:
                new_record["sha256"] = result["sha256"] = sha256_file(tmp)
            write_record(state_file, new_record)
            done.update(info=info, cmd=cmd, fields=fields)

        _convert(qemu_img, src, dest, request, kind, src_id, version, publish)
        written = os.stat(dest)
        info, cmd = done["info"], done["cmd"]

    if fmt in ID_FORMATS and not done["fields"]:
        result["warnings"] = [f"this qemu-img ({version}) wrote {fmt} headers that image_convert does not recognise, so the "
                              "random identifiers in them were left as they are: two conversions will not be byte-identical"]
    result.update(changed=True, cmd=cmd, virtual_size=info["virtual_size"], actual_size=written.st_blocks * 512,
                  msg=f"converted to {fmt}: {reason}",
                  diff={"before": before, "after": _summary(parts["settings"], info["virtual_size"], src, src_short)})
    return result
