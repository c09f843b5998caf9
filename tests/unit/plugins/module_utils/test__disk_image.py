# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import os

import pytest

from ansible_collections.osimage.builder.plugins.module_utils._disk_image import ensure_disk_image
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError

MiB = 1024 * 1024


def test_check_mode_then_create_then_idempotent(tmp_path):
    path = str(tmp_path / "disk.raw")
    planned = ensure_disk_image(path, "64MiB", "present", check_mode=True)
    assert planned["changed"] and planned["action"] == "create" and planned["size"] == 64 * MiB
    assert not os.path.exists(path)
    created = ensure_disk_image(path, "64MiB", "present")
    assert created["changed"] and os.path.getsize(path) == 64 * MiB
    assert created["allocated"] == 0
    assert "absent" in created["diff"]["before"] and "64 MiB" in created["diff"]["after"]
    again = ensure_disk_image(path, 64 * MiB, "present")
    assert not again["changed"]
    assert not ensure_disk_image(path, None, "present")["changed"]


def test_grow_keeps_data_and_shrink_needs_force(tmp_path):
    path = str(tmp_path / "disk.raw")
    ensure_disk_image(path, "1MiB", "present")
    with open(path, "r+b") as handle:
        handle.write(b"keep")
    assert ensure_disk_image(path, "2MiB", "present")["action"] == "grow"
    with open(path, "rb") as handle:
        assert handle.read(4) == b"keep"
    with pytest.raises(BuildError, match="force=true") as exc:
        ensure_disk_image(path, "1MiB", "present")
    assert exc.value.option == "size"
    assert os.path.getsize(path) == 2 * MiB
    assert ensure_disk_image(path, "1MiB", "present", force=True)["action"] == "shrink"
    assert os.path.getsize(path) == MiB


@pytest.mark.parametrize("size", ["1000", "big", "0", 511, True])
def test_bad_sizes(tmp_path, size):
    path = str(tmp_path / "disk.raw")
    with pytest.raises(BuildError) as exc:
        ensure_disk_image(path, size, "present")
    assert exc.value.option == "size"
    assert not os.path.exists(path)


def test_missing_size_to_create(tmp_path):
    with pytest.raises(BuildError, match="give size") as exc:
        ensure_disk_image(str(tmp_path / "disk.raw"), None, "present")
    assert exc.value.option == "size"


def test_absent(tmp_path):
    path = str(tmp_path / "disk.raw")
    assert not ensure_disk_image(path, None, "absent")["changed"]
    ensure_disk_image(path, "1MiB", "present")
    assert ensure_disk_image(path, None, "absent", check_mode=True)["changed"]
    assert os.path.exists(path)
    assert ensure_disk_image(path, None, "absent")["changed"]
    assert not os.path.exists(path)


def test_directory_is_refused(tmp_path):
    with pytest.raises(BuildError, match="directory") as exc:
        ensure_disk_image(str(tmp_path), "1MiB", "present")
    assert exc.value.option == "path"
