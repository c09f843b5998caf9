# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import os
import subprocess

import pytest

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._grub_stage import grubenv_block, stage_grub_files

GRUB_DIR = "/usr/lib/grub/i386-pc"


def _grub_files(suffixes=(".mod", ".lst")):
    return sorted(name for name in os.listdir(GRUB_DIR) if name.endswith(suffixes))


def test_grubenv_matches_grub_editenv(tmp_path):
    path = tmp_path / "grubenv"
    subprocess.run(["grub-editenv", str(path), "create"], check=True)
    assert grubenv_block() == path.read_bytes()
    subprocess.run(["grub-editenv", str(path), "set", "saved_entry=0"], check=True)
    assert grubenv_block({"saved_entry": "0"}) == path.read_bytes()


def test_grubenv_overflow_names_the_option():
    with pytest.raises(BuildError) as exc:
        grubenv_block({"x": "y" * 1024})
    assert exc.value.option == "grubenv"


def test_stage_copies_modules_lists_font_and_grubenv(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    planned = stage_grub_files(str(tree), check_mode=True)
    assert planned["changed"] and not (tree / "boot").exists()
    staged = stage_grub_files(str(tree))
    platform = tree / "boot/grub/i386-pc"
    assert sorted(os.listdir(platform)) == _grub_files()
    assert (platform / "normal.mod").read_bytes() == open(os.path.join(GRUB_DIR, "normal.mod"), "rb").read()
    assert (platform / "normal.mod").stat().st_mtime_ns == os.stat(os.path.join(GRUB_DIR, "normal.mod")).st_mtime_ns
    assert (tree / "boot/grub/fonts/unicode.pf2").stat().st_size == os.path.getsize("/usr/share/grub/unicode.pf2")
    assert (tree / "boot/grub/grubenv").read_bytes() == grubenv_block()
    assert len(staged["copied"]) == len(_grub_files()) + 2
    assert "boot/grub/i386-pc/normal.mod: missing" in staged["diff"]["before"]
    again = stage_grub_files(str(tree))
    assert not again["changed"] and again["copied"] == [] and again["removed"] == []
    assert not stage_grub_files(str(tree), check_mode=True)["changed"]


def test_stage_repairs_and_removes_stale_but_keeps_grubenv(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    stage_grub_files(str(tree))
    platform = tree / "boot/grub/i386-pc"
    (platform / "normal.mod").write_bytes(b"from another GRUB build")
    (platform / "stale.mod").write_bytes(b"old")
    (tree / "boot/grub/grubenv").write_bytes(grubenv_block({"saved_entry": "1"}))
    result = stage_grub_files(str(tree))
    assert result["copied"] == ["boot/grub/i386-pc/normal.mod"]
    assert result["removed"] == ["boot/grub/i386-pc/stale.mod"]
    assert not (platform / "stale.mod").exists()
    assert (tree / "boot/grub/grubenv").read_bytes() == grubenv_block({"saved_entry": "1"})


def test_stage_without_font_or_grubenv_into_grub2_dir(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    stage_grub_files(str(tree), boot_dir="boot/grub2", font=None, grubenv=False)
    assert sorted(os.listdir(tree / "boot/grub2")) == ["i386-pc"]


@pytest.mark.parametrize("kwargs, option", [
    ({"grub_dir": "/nonexistent"}, "grub_dir"),
    ({"font": "/nonexistent.pf2"}, "font"),
    ({"boot_dir": "/boot/grub"}, "boot_dir"),
    ({"boot_dir": "../escape"}, "boot_dir"),
])
def test_stage_errors_name_the_option_and_write_nothing(tmp_path, kwargs, option):
    tree = tmp_path / "tree"
    tree.mkdir()
    with pytest.raises(BuildError) as exc:
        stage_grub_files(str(tree), **kwargs)
    assert exc.value.option == option
    assert os.listdir(tree) == []


def test_stage_refuses_a_missing_tree(tmp_path):
    with pytest.raises(BuildError) as exc:
        stage_grub_files(str(tmp_path / "missing"))
    assert exc.value.option == "tree"


def test_check_mode_on_a_tree_not_made_yet(tmp_path):
    result = stage_grub_files(str(tmp_path / "later"), check_mode=True)
    assert result["changed"] and "does not exist yet" in result["msg"]
    assert not (tmp_path / "later").exists()
