# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Idempotency bookkeeping: derived identifiers, the manifest digest of a directory
tree, the cheap fingerprint of a partition, and the build record kept beside an image.

A module that wrote something into an image records what it was built from
(``input_digest``) and what the bytes looked like right after (``fingerprint``).
A rerun is a no-op when both still match; when the fingerprint no longer
matches, somebody changed the partition behind the module's back.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import struct
import typing as t
import uuid as uuidlib
from dataclasses import dataclass, field

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._image import SEEK_DATA, SEEK_HOLE, Image, atomic_output

# The same namespace as _partition.NAMESPACE (a unit test checks it): changing it
# changes every derived identifier of every build.
NAMESPACE = uuidlib.uuid5(uuidlib.NAMESPACE_URL, "https://osimage.builder/")
DEFAULT_SEED = "osimage.builder"

STATE_SUFFIX = ".osimage-state.json"
STATE_VERSION = 1
FINGERPRINT_HEAD = 4 * 1024 * 1024

_KINDS = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
    stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
}


def derive_uuid(seed: str, *parts: str) -> uuidlib.UUID:
    """UUIDv5 of ``seed/part/part...`` in the collection's namespace (as _partition derives GUIDs)."""
    return uuidlib.uuid5(NAMESPACE, "/".join((seed,) + tuple(str(part) for part in parts)))


# ----------------------------------------------------------------------------
# Tree manifest


@dataclass(frozen=True)
class TreeEntry:
    """One entry of a source tree, from ``lstat`` (never followed)."""

    path: bytes  # relative, b"" for the top directory
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    blocks: int  # st_blocks (512-byte units)
    mtime_ns: int
    ctime_ns: int
    nlink: int
    inode: tuple[int, int]  # (st_dev, st_ino): hard links share it
    rdev: int = 0
    target: bytes = b""
    xattrs: tuple[tuple[str, bytes], ...] = ()
    readable: bool = True

    @property
    def name(self) -> bytes:
        return self.path.rsplit(b"/", 1)[-1]

    def display(self) -> str:
        return os.fsdecode(self.path) or "."


@dataclass
class Tree:
    """A walked source tree: its entries in canonical order and their digest."""

    root: str
    entries: list[TreeEntry] = field(default_factory=list)
    digest: str = ""

    @property
    def newest_mtime(self) -> int:
        """The newest mtime in the tree, in whole seconds (0 for none)."""
        return max((entry.mtime_ns // 1_000_000_000 for entry in self.entries), default=0)

    @property
    def data_bytes(self) -> int:
        seen = set()
        total = 0
        for entry in self.entries:
            if entry.kind == "file" and entry.inode not in seen:
                seen.add(entry.inode)
                total += entry.size
        return total

    def summary(self) -> str:
        files = sum(1 for entry in self.entries if entry.kind == "file")
        dirs = sum(1 for entry in self.entries if entry.kind == "dir")
        return f"{files} files, {dirs} directories, {len(self.entries)} entries, {self.data_bytes} bytes of file data"


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    listxattr = getattr(os, "listxattr", None)
    getxattr = getattr(os, "getxattr", None)
    if listxattr is None or getxattr is None:  # pragma: no cover - not Linux
        return ()
    try:
        names = listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EPERM, errno.EACCES):
            return ()
        raise
    values = []
    for name in sorted(names):
        try:
            values.append((name, getxattr(path, name, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
                continue
            raise
    return tuple(values)


def _feed(digest: t.Any, *fields: object) -> None:
    """Feed fields unambiguously: each one tagged and length-prefixed."""
    for value in fields:
        if isinstance(value, bytes):
            digest.update(b"b" + struct.pack("<Q", len(value)) + value)
        elif isinstance(value, str):
            data = value.encode("utf-8", "surrogateescape")
            digest.update(b"s" + struct.pack("<Q", len(data)) + data)
        elif isinstance(value, bool):
            digest.update(b"t" if value else b"f")
        elif isinstance(value, int):
            data = str(value).encode()
            digest.update(b"i" + struct.pack("<Q", len(data)) + data)
        else:
            raise TypeError(f"cannot feed {type(value).__name__}")


def walk_tree(source: str, option: str = "source") -> Tree:
    """Walk ``source`` (sorted by name bytes, symlinks not followed) and digest its metadata.

    File contents are not read: the digest covers, for every entry, its relative path,
    type, mode, owner, size, mtime and ctime (nanoseconds), symlink target, device
    number and extended attributes. ctime changes whenever content or metadata is
    changed through the kernel, even when mtime is put back, so a rerun over an
    unchanged multi-GB tree costs one ``lstat`` (and ``listxattr``) per entry.
    """
    try:
        top = os.stat(source)
    except FileNotFoundError:
        raise BuildError(f"{source} does not exist; give the directory to fill the filesystem from", option=option)
    except OSError as exc:
        raise BuildError(f"{source}: {exc.strerror}", option=option)
    if not stat.S_ISDIR(top.st_mode):
        raise BuildError(f"{source} is not a directory; give the directory to fill the filesystem from", option=option)
    tree = Tree(root=source)
    digest = hashlib.sha256(b"osimage.builder tree manifest v1\0")
    base = os.fsencode(source)
    pending: list[bytes] = [b""]
    while pending:
        rel = pending.pop()
        full = os.path.join(base, rel) if rel else base
        try:
            st = os.lstat(full) if rel else top
        except OSError as exc:
            raise BuildError(f"{os.fsdecode(full)}: {exc.strerror}", option=option)
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "unknown")
        target = b""
        if kind == "symlink":
            target = os.readlink(full)
        readable = True
        if kind == "file":
            readable = os.access(full, os.R_OK)
        elif kind == "dir":
            readable = os.access(full, os.R_OK | os.X_OK)
        try:
            xattrs = _xattrs(os.fsdecode(full))
        except OSError as exc:
            raise BuildError(f"{os.fsdecode(full)}: cannot read extended attributes: {exc.strerror}", option=option)
        entry = TreeEntry(
            path=rel, kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
            size=st.st_size if kind in ("file", "symlink") else 0, blocks=st.st_blocks,
            mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, nlink=st.st_nlink, inode=(st.st_dev, st.st_ino),
            rdev=st.st_rdev if kind in ("char", "block") else 0, target=target, xattrs=xattrs, readable=readable,
        )
        tree.entries.append(entry)
        _feed(digest, b"E", entry.path, entry.kind, entry.mode, entry.uid, entry.gid, entry.size, entry.mtime_ns,
              entry.ctime_ns, entry.target, entry.rdev, len(entry.xattrs))
        for name, value in entry.xattrs:
            _feed(digest, name, value)
        if kind == "dir":
            if not readable:
                continue
            try:
                names = sorted(os.listdir(full))
            except OSError as exc:
                raise BuildError(f"{os.fsdecode(full)}: {exc.strerror}", option=option)
            # Depth first in name order: push in reverse so the smallest name is walked next.
            for name in reversed(names):
                pending.append(rel + b"/" + name if rel else name)
    # Hard links: which entries share an inode is part of the tree's shape.
    first_path: dict[tuple[int, int], bytes] = {}
    for entry in tree.entries:
        if entry.kind != "dir" and entry.nlink > 1:
            if entry.inode in first_path:
                _feed(digest, b"L", entry.path, first_path[entry.inode])
            else:
                first_path[entry.inode] = entry.path
    tree.digest = "sha256:" + digest.hexdigest()
    return tree


def input_digest(parts: dict[str, t.Any]) -> str:
    """sha256 over a canonical JSON rendering of ``parts`` (the inputs of one build)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------
# Partition fingerprint


def data_extents(fd: int, start: int, end: int) -> t.Iterator[tuple[int, int]]:
    """The allocated ``(start, end)`` byte ranges of ``fd`` within ``[start, end)``.

    Where SEEK_DATA is not supported the whole range counts as data.
    """
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                yield pos, end
                return
            raise
        if data >= end:
            return
        try:
            hole = os.lseek(fd, data, SEEK_HOLE)
        except OSError:
            hole = end
        yield data, min(hole, end)
        pos = hole


def fingerprint(image: Image, offset: int, length: int, head: int = FINGERPRINT_HEAD) -> str:
    """A cheap digest that notices changes made to a partition through its filesystem.

    Covers the allocated-extent map of the range (a file written or deleted changes
    it on a sparse image), and the first ``head`` bytes, which hold the superblock
    (mount count, write time, free counts), the group descriptors or the FATs. It
    never reads the whole partition; a change that rewrites data blocks in place
    without touching either can go unnoticed.
    """
    digest = hashlib.sha256(b"osimage.builder partition fingerprint v1\0")
    digest.update(struct.pack("<QQ", offset, length))
    if not image.is_block:
        for start, end in data_extents(image.fd, offset, offset + length):
            digest.update(struct.pack("<QQ", start - offset, end - offset))
    digest.update(b"head")
    remaining = min(head, length)
    pos = offset
    while remaining > 0:
        chunk = image.read(pos, min(remaining, 1024 * 1024))
        digest.update(chunk)
        pos += len(chunk)
        remaining -= len(chunk)
    return "sha256:" + digest.hexdigest()


# ----------------------------------------------------------------------------
# The record kept beside the image


def state_path(image_path: str, is_block: bool = False) -> str:
    """Where the build record of ``image_path`` lives.

    Beside a regular image (``disk.raw.osimage-state.json``). Nothing may be written
    beside a device node, so a block device's record lives in the user's state
    directory, named after the device path.
    """
    if not is_block:
        return os.path.abspath(image_path) + STATE_SUFFIX
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    name = os.path.abspath(image_path).strip("/").replace("/", "_")
    return os.path.join(base, "osimage.builder", name + STATE_SUFFIX)


class StateFile:
    """The build records of one image, keyed by partition start sector.

    Callers hold the image lock while they read, change and save it, so two tasks
    building different partitions of one image never lose each other's record.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, t.Any] = {"version": STATE_VERSION, "partitions": {}}
        try:
            with open(path, encoding="utf-8") as handle:
                loaded = json.load(handle)
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            # An unreadable record is no record: the data it described is then treated as foreign.
            return
        if isinstance(loaded, dict) and loaded.get("version") == STATE_VERSION and isinstance(loaded.get("partitions"), dict):
            self.data = loaded

    def get(self, start_sector: int) -> dict[str, t.Any] | None:
        record = self.data["partitions"].get(str(start_sector))
        return record if isinstance(record, dict) else None

    def put(self, start_sector: int, record: dict[str, t.Any]) -> None:
        self.data["partitions"][str(start_sector)] = record

    def drop_overlapping(self, start_sector: int, sectors: int) -> None:
        """Forget records of other partitions that overlapped this range (their data is gone)."""
        end = start_sector + sectors
        for key, record in list(self.data["partitions"].items()):
            if key == str(start_sector) or not isinstance(record, dict):
                continue
            other_start = int(key)
            other_end = other_start + int(record.get("sectors", 0) or 0)
            if other_start < end and start_sector < other_end:
                del self.data["partitions"][key]

    def save(self) -> None:
        directory = os.path.dirname(self.path)
        if directory and not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        with atomic_output(self.path) as tmp:
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(self.data, handle, sort_keys=True, indent=1)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())


def refresh_fingerprint(image: Image, start_sector: int, sectors: int, sector_size: int = 512) -> bool:
    """Re-record the fingerprint of a filesystem that another module changed on purpose.

    For modules such as grub_efi_install that write files into a filesystem the
    filesystem module built: call this (holding the image lock) after writing, so
    the next run of the filesystem task still recognises the partition as its own.
    Returns False when there is no record to refresh.
    """
    state = StateFile(state_path(image.path, image.is_block))
    record = state.get(start_sector)
    if record is None or record.get("sectors") != sectors:
        return False
    record["fingerprint"] = fingerprint(image, start_sector * sector_size, sectors * sector_size)
    state.put(start_sector, record)
    state.save()
    return True
