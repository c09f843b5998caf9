# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Let a plain ``pytest`` import ``ansible_collections.osimage.builder`` from a checkout.

Inside a real ``ansible_collections/osimage/builder`` tree the directory above
``ansible_collections`` goes on ``sys.path``; anywhere else a symlink tree under
the temp dir stands in for it (a symlink is enough for Python imports, unlike
for ansible-test).
"""

from __future__ import annotations

import os
import sys
import tempfile

NAMESPACE, NAME = "osimage", "builder"
HERE = os.path.dirname(os.path.abspath(__file__))


def _collections_root() -> str:
    parts = HERE.split(os.sep)
    if parts[-3:] == ["ansible_collections", NAMESPACE, NAME]:
        return os.sep.join(parts[:-3])
    root = os.path.join(tempfile.gettempdir(), f"pytest-collections-{NAMESPACE}-{NAME}-{os.getuid()}")
    link = os.path.join(root, "ansible_collections", NAMESPACE, NAME)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.realpath(link) != HERE:
        tmp_link = f"{link}.{os.getpid()}"
        os.symlink(HERE, tmp_link)
        os.replace(tmp_link, link)
    return root


COLLECTIONS_ROOT = _collections_root()
if COLLECTIONS_ROOT not in sys.path:
    sys.path.insert(0, COLLECTIONS_ROOT)
os.environ.setdefault("ANSIBLE_COLLECTIONS_PATH", COLLECTIONS_ROOT)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "needs_root_loop: compares with real grub-install on a loop device (root only)")
