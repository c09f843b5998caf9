# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What the benchmark scripts share: finding tools, sizes, and running this checkout as a collection."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024
# mke2fs, losetup and friends live in sbin, which an ordinary PATH may lack.
SEARCH = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin"


def tool(name: str) -> str:
    found = shutil.which(name, path=SEARCH)
    if not found:
        sys.exit(f"{name} is not installed")
    return found


def parse_size(text: str) -> int:
    for unit, factor in (("KiB", 1024), ("MiB", MiB), ("GiB", 1024 * MiB), ("TiB", 1024 ** 4)):
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * factor)
    return int(text)


def collections_path(workdir: str) -> str:
    """A directory with ansible_collections/osimage/builder -> this checkout (a symlink is enough for Ansible)."""
    root = os.path.join(workdir, "collections")
    link = os.path.join(root, "ansible_collections", "osimage", "builder")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.realpath(link) != REPO:
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(REPO, link)
    return root


def ansible_playbook() -> str:
    """$ANSIBLE_PLAYBOOK, the one beside this Python (a venv), or the one on PATH."""
    if os.environ.get("ANSIBLE_PLAYBOOK"):
        return os.environ["ANSIBLE_PLAYBOOK"]
    beside = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
    return beside if os.path.exists(beside) else tool("ansible-playbook")


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run ``argv``; raise with the end of its stderr when it fails."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    done = subprocess.run(argv, check=False, **kwargs)
    if done.returncode != 0:
        err = (done.stderr or b"").decode(errors="replace")[-2000:] if isinstance(done.stderr, bytes) else done.stderr
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {err}")
    return done
