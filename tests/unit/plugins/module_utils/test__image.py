# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import os

import pytest

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._image import (
    Image, atomic_output, create_sparse, image_kind, resize,
)

MiB = 1024 * 1024


def test_create_sparse_allocates_nothing_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "disk.raw"
    create_sparse(str(path), 64 * MiB)
    assert path.stat().st_size == 64 * MiB
    assert path.stat().st_blocks == 0
    assert os.listdir(tmp_path) == ["disk.raw"]


def test_resize_grows_sparse(tmp_path):
    path = tmp_path / "disk.raw"
    create_sparse(str(path), MiB)
    resize(str(path), 8 * MiB)
    assert path.stat().st_size == 8 * MiB
    assert path.stat().st_blocks == 0


def test_positional_io_and_differs(tmp_path):
    path = tmp_path / "disk.raw"
    create_sparse(str(path), MiB)
    with Image(str(path), writable=True) as image:
        assert not image.differs([(512, b"\0" * 16)])
        assert image.differs([(512, b"x")])
        image.write_all([(512, b"hello"), (MiB - 2, b"\x55\xaa")])
        assert image.read(512, 5) == b"hello"
        assert image.read(MiB - 2, 4) == b"\x55\xaa\0\0"  # past the end reads zeros
        assert not image.differs([(512, b"hello")])
        assert image.size == MiB


def test_has_data_uses_holes(tmp_path):
    path = tmp_path / "disk.raw"
    create_sparse(str(path), 16 * MiB)
    with Image(str(path), writable=True) as image:
        assert not image.has_data(0, 16 * MiB)
        image.write_all([(8 * MiB, b"data")])
        assert image.has_data(0, 16 * MiB)
        assert image.has_data(8 * MiB, 4096)
        assert not image.has_data(0, 4 * MiB)
        assert not image.has_data(12 * MiB, 4 * MiB)


def test_refuses_directory(tmp_path):
    with pytest.raises(BuildError, match="is a directory") as exc:
        Image(str(tmp_path))
    assert exc.value.option == "image"
    with pytest.raises(BuildError, match="is a directory"):
        image_kind(str(tmp_path), option="path")


def test_refuses_missing(tmp_path):
    with pytest.raises(BuildError, match="does not exist"):
        Image(str(tmp_path / "nope.raw"))
    assert image_kind(str(tmp_path / "nope.raw")) is None


def test_refuses_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BuildError, match="neither a regular file nor a block device"):
        Image(str(fifo))


def test_refuses_char_device_even_through_a_symlink(tmp_path):
    link = tmp_path / "disk.raw"
    link.symlink_to("/dev/null")
    with pytest.raises(BuildError, match="neither a regular file"):
        Image(str(link), writable=True)


def _block_device():
    for name in sorted(os.listdir("/dev")):
        path = os.path.join("/dev", name)
        if name.startswith("loop") and name[4:].isdigit() and os.path.exists(path):
            return path
    return None


def test_refuses_block_device_unless_allowed():
    device = _block_device()
    if device is None:
        pytest.fail("no /dev/loopN node on this machine; the test needs one (modprobe loop)")
    with pytest.raises(BuildError, match="allow_block_device=true"):
        image_kind(device)
    assert image_kind(device, allow_block_device=True) == "block"


def test_atomic_output_renames_on_success_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "out.qcow2"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(str(target)) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.qcow2"]
    with atomic_output(str(target)) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(b"new")
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.qcow2"]
