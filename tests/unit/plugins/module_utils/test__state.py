# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import json
import os
import time

import pytest

from ansible_collections.osimage.builder.plugins.module_utils import _partition
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._image import Image, create_sparse
from ansible_collections.osimage.builder.plugins.module_utils._state import (
    NAMESPACE, StateFile, data_extents, derive_uuid, fingerprint, input_digest, refresh_fingerprint, state_path, walk_tree,
)

MiB = 1024 * 1024


def test_namespace_matches_partition_guids():
    assert NAMESPACE == _partition.NAMESPACE
    assert derive_uuid("seed", "partition", "1") == _partition._derived_uuid("seed", "partition/1")
    assert derive_uuid("a", "b") != derive_uuid("a", "c") != derive_uuid("b", "b")


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "file").write_bytes(b"hello")
    (root / "dir" / "sub" / "deep").write_bytes(b"x" * 5000)
    os.symlink("file", root / "link")
    os.link(root / "file", root / "hard")
    for path in (root / "file", root / "dir" / "sub" / "deep"):
        os.utime(path, ns=(1_600_000_000_000_000_000, 1_700_000_000_000_000_000))
    return root


def _digest(root):
    return walk_tree(str(root)).digest


def test_walk_order_and_entries(tree):
    walked = walk_tree(str(tree))
    assert [entry.path for entry in walked.entries] == [b"", b"dir", b"dir/sub", b"dir/sub/deep", b"file", b"hard", b"link"]
    kinds = {entry.path: entry.kind for entry in walked.entries}
    assert kinds[b"link"] == "symlink" and kinds[b"dir"] == "dir" and kinds[b"file"] == "file"
    link = [entry for entry in walked.entries if entry.path == b"link"][0]
    assert link.target == b"file"
    assert walked.digest.startswith("sha256:")
    assert walked.data_bytes == 5005  # the hard link counts once
    assert walked.newest_mtime >= 1_700_000_000


def test_digest_stable_when_nothing_changes_even_after_reading(tree):
    first = _digest(tree)
    (tree / "file").read_bytes()  # moves atime, which is not part of the manifest
    time.sleep(0.01)
    assert _digest(tree) == first


@pytest.mark.parametrize("change", ["mode", "mtime", "size", "xattr", "symlink", "rename", "new", "hardlink", "owner"])
def test_digest_changes(tree, change):
    before = _digest(tree)
    target = tree / "dir" / "sub" / "deep"
    if change == "mode":
        os.chmod(target, 0o600)
    elif change == "mtime":
        os.utime(target, ns=(1_600_000_000_000_000_000, 1_700_000_000_000_000_001))
    elif change == "size":
        stat = os.stat(target)
        with open(target, "ab") as handle:
            handle.write(b"y")
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: ctime and size still tell
    elif change == "xattr":
        try:
            os.setxattr(target, "user.test", b"value")
        except OSError:
            pytest.fail("the temp directory has no user xattrs; set TMPDIR to a filesystem that has them")
    elif change == "symlink":
        os.unlink(tree / "link")
        os.symlink("dir", tree / "link")
    elif change == "rename":
        os.rename(target, tree / "dir" / "sub" / "peed")
    elif change == "new":
        (tree / "dir" / "empty").mkdir()
    elif change == "hardlink":
        os.unlink(tree / "hard")
        os.link(tree / "dir" / "sub" / "deep", tree / "hard")
    elif change == "owner":
        if os.getuid() != 0:
            pytest.skip("chown needs root")
        os.chown(target, 1234, 1234)
    assert _digest(tree) != before


def test_same_content_in_another_tree_differs_only_by_times(tmp_path, tree):
    # ctime belongs to the copy: the digest of a copy differs (a rebuild, never a wrong no-op).
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy, symlinks=True)
    assert _digest(copy) != _digest(tree)


def test_walk_errors(tmp_path):
    with pytest.raises(BuildError) as exc:
        walk_tree(str(tmp_path / "missing"))
    assert exc.value.option == "source"
    (tmp_path / "plain").write_bytes(b"")
    with pytest.raises(BuildError, match="not a directory"):
        walk_tree(str(tmp_path / "plain"))


def test_input_digest_is_canonical():
    assert input_digest({"a": 1, "b": [1, 2]}) == input_digest({"b": [1, 2], "a": 1})
    assert input_digest({"a": 1}) != input_digest({"a": 2})


def _image(tmp_path, size=16 * MiB):
    path = str(tmp_path / "disk.raw")
    create_sparse(path, size)
    return path


def test_fingerprint_notices_a_byte_in_the_first_mib(tmp_path):
    path = _image(tmp_path)
    with Image(path, writable=True) as img:
        img.write(MiB, b"filesystem")
        before = fingerprint(img, MiB, 8 * MiB)
        assert fingerprint(img, MiB, 8 * MiB) == before
        img.write(MiB + 700 * 1024, b"!")
        assert fingerprint(img, MiB, 8 * MiB) != before


def test_fingerprint_notices_new_extents_beyond_the_head(tmp_path):
    path = _image(tmp_path, 32 * MiB)
    with Image(path, writable=True) as img:
        before = fingerprint(img, MiB, 24 * MiB, head=MiB)
        img.write(20 * MiB, b"data written through the filesystem")
        assert fingerprint(img, MiB, 24 * MiB, head=MiB) != before
        # Outside the partition: not its business.
        after = fingerprint(img, MiB, 24 * MiB, head=MiB)
        img.write(30 * MiB, b"other partition")
        assert fingerprint(img, MiB, 24 * MiB, head=MiB) == after


def test_data_extents(tmp_path):
    path = _image(tmp_path, 16 * MiB)
    with Image(path, writable=True) as img:
        img.write(4 * MiB, b"x" * 4096)
        extents = list(data_extents(img.fd, 0, 16 * MiB))
        assert len(extents) == 1 and extents[0][0] <= 4 * MiB < extents[0][1]
        assert list(data_extents(img.fd, 8 * MiB, 16 * MiB)) == []
        assert list(data_extents(img.fd, 4 * MiB + 1, 4 * MiB + 2)) == [(4 * MiB + 1, 4 * MiB + 2)]


def test_state_file_round_trip_and_corruption(tmp_path):
    path = _image(tmp_path)
    where = state_path(path)
    assert where == path + ".osimage-state.json"
    state = StateFile(where)
    assert state.get(2048) is None
    state.put(2048, {"fingerprint": "f", "sectors": 100})
    state.put(4096, {"fingerprint": "g", "sectors": 100})
    state.save()
    assert json.load(open(where))["partitions"]["2048"]["fingerprint"] == "f"
    again = StateFile(where)
    assert again.get(2048)["fingerprint"] == "f"
    again.drop_overlapping(2000, 200)  # overlaps 2048 (itself kept? no: other key) and not 4096
    assert again.get(2048) is None and again.get(4096) is not None
    with open(where, "w") as handle:
        handle.write("{not json")
    assert StateFile(where).get(4096) is None
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_state_path_of_a_block_device(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert state_path("/dev/sdb", is_block=True) == str(tmp_path / "osimage.builder" / "dev_sdb.osimage-state.json")


def test_refresh_fingerprint(tmp_path):
    path = _image(tmp_path)
    with Image(path, writable=True) as img:
        assert not refresh_fingerprint(img, 2048, 4096)
        state = StateFile(state_path(path))
        state.put(2048, {"fingerprint": fingerprint(img, 2048 * 512, 4096 * 512), "sectors": 4096})
        state.save()
        img.write(2048 * 512, b"grub_efi_install wrote here")
        assert StateFile(state_path(path)).get(2048)["fingerprint"] != fingerprint(img, 2048 * 512, 4096 * 512)
        assert refresh_fingerprint(img, 2048, 4096)
        assert StateFile(state_path(path)).get(2048)["fingerprint"] == fingerprint(img, 2048 * 512, 4096 * 512)
