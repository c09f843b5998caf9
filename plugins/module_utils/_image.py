# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Safe access to image files: regular files only unless asked, sparse creation,
positional I/O, allocation queries and atomic replacement.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import tempfile
import typing as t
from contextlib import contextmanager

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
_BLKGETSIZE64 = 0x80081272


def _refuse_kind(path: str, mode: int, option: str, allow_block_device: bool) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISBLK(mode):
        if allow_block_device:
            return
        raise BuildError(
            f"{path} is a block device; this collection writes regular image files only. "
            "Set allow_block_device=true if you really mean to write to the device.",
            option=option,
        )
    if stat.S_ISDIR(mode):
        raise BuildError(f"{path} is a directory; give the path of an image file inside it", option=option)
    raise BuildError(f"{path} is neither a regular file nor a block device", option=option)


def image_kind(path: str, option: str = "image", allow_block_device: bool = False) -> str | None:
    """Return ``"file"``, ``"block"`` or None (missing); raise for anything else.

    Symlinks are followed: what matters is what would be written.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise BuildError(f"{path}: a parent of this path is not a directory", option=option)
    _refuse_kind(path, st.st_mode, option, allow_block_device)
    return "block" if stat.S_ISBLK(st.st_mode) else "file"


class Image:
    """An open image (regular file, or block device when allowed).

    The type is checked on the open descriptor, so a path swapped for a device
    between check and open is still refused.
    """

    def __init__(self, path: str, writable: bool = False, option: str = "image",
                 allow_block_device: bool = False) -> None:
        self.path = path
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOCTTY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise BuildError(f"{path} does not exist; create it first with osimage.builder.disk_image", option=option)
        except IsADirectoryError:
            raise BuildError(f"{path} is a directory; give the path of an image file inside it", option=option)
        except PermissionError:
            raise BuildError(f"{path}: permission denied ({'read-write' if writable else 'read'} access needed)", option=option)
        try:
            st = os.fstat(self.fd)
            _refuse_kind(path, st.st_mode, option, allow_block_device)
            # O_NONBLOCK only protected the open itself (a FIFO would block).
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except BaseException:
            os.close(self.fd)
            raise
        self.is_block = stat.S_ISBLK(st.st_mode)

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def lock(self) -> None:
        """Take an exclusive advisory lock so two builds never write one image at once."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    @property
    def size(self) -> int:
        if self.is_block:
            buf = fcntl.ioctl(self.fd, _BLKGETSIZE64, b"\0" * 8)
            return struct.unpack("<Q", buf)[0]
        return os.fstat(self.fd).st_size

    @property
    def allocated(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def read(self, offset: int, length: int) -> bytes:
        """Read exactly ``length`` bytes; past the end of the image reads zeros."""
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += b"\0" * (length - len(data))
        return data

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written

    def write_all(self, writes: t.Iterable[tuple[int, bytes]]) -> None:
        for offset, data in writes:
            self.write(offset, data)
        os.fsync(self.fd)

    def differs(self, writes: t.Iterable[tuple[int, bytes]]) -> bool:
        """True when applying ``writes`` would change any byte of the image."""
        return any(self.read(offset, len(data)) != data for offset, data in writes)

    def has_data(self, offset: int, length: int) -> bool:
        """Whether any byte in the range is allocated (may hold data).

        Uses SEEK_DATA so a sparse multi-GiB image is answered without reading it;
        block devices and filesystems without SEEK_DATA answer True (assume data).
        """
        if length <= 0:
            return False
        if self.is_block:
            return True
        try:
            found = os.lseek(self.fd, offset, SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                return False
            return True
        return found < offset + length


def create_sparse(path: str, size: int) -> None:
    """Create a sparse file of ``size`` bytes, appearing under ``path`` only when complete."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        _unlink_quietly(tmp)
        raise


def resize(path: str, size: int) -> None:
    """Grow or shrink a regular image file in place; growing stays sparse."""
    fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str) -> t.Iterator[str]:
    """Yield a temp path beside ``path``; on success rename it over ``path``.

    An interrupted build leaves the old file (or none) under the final name,
    never a half-written one; the temp file is removed on failure.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
