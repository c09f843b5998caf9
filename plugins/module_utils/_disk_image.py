# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What the disk_image module does: a sparse image file of a given size, or none.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import os
import typing as t

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._image import Image, create_sparse, image_kind, resize
from ansible_collections.osimage.builder.plugins.module_utils._sizes import SECTOR_SIZE, format_size, parse_size


def _state_of(path: str, kind: str | None, allow_block_device: bool) -> dict[str, t.Any]:
    if kind is None:
        return {"path": path, "state": "absent"}
    with Image(path, option="path", allow_block_device=allow_block_device) as image:
        return {"path": path, "state": "present", "size": image.size, "allocated": image.allocated,
                "block_device": image.is_block}


def _describe(state: dict[str, t.Any]) -> str:
    if state["state"] == "absent":
        return f"{state['path']}: absent\n"
    kind = "block device" if state.get("block_device") else "sparse image"
    return f"{state['path']}: {kind}, {format_size(state['size'])} ({state['size']} bytes)\n"


def ensure_disk_image(path: str, size: object, state: str, force: bool = False,
                      allow_block_device: bool = False, check_mode: bool = False) -> dict[str, t.Any]:
    """Make ``path`` match ``state``/``size``; return the module result (without ``diff`` headers)."""
    wanted_size = None
    if size is not None:
        wanted_size = parse_size(size, "size")
        if wanted_size == 0 or wanted_size % SECTOR_SIZE:
            raise BuildError(f"{size!r} is not a positive whole number of {SECTOR_SIZE}-byte sectors; "
                             "round it, e.g. 2GiB or 1500MB", option="size")
    kind = image_kind(path, option="path", allow_block_device=allow_block_device)
    before = _state_of(path, kind, allow_block_device)
    after = dict(before)
    action = None

    if state == "absent":
        if kind == "block":
            raise BuildError(f"{path} is a block device; state=absent removes image files, never device nodes", option="path")
        if kind is not None:
            action = "remove"
            after = {"path": path, "state": "absent"}
    elif kind is None:
        if wanted_size is None:
            raise BuildError(f"{path} does not exist; give size to create it", option="size")
        action = "create"
        after = {"path": path, "state": "present", "size": wanted_size, "allocated": 0, "block_device": False}
    elif wanted_size is not None and wanted_size != before["size"]:
        if kind == "block":
            raise BuildError(f"{path} is a block device of {before['size']} bytes; it cannot be resized to {wanted_size}. "
                             "Leave size unset for block devices, or set it to the device size", option="size")
        if wanted_size < before["size"] and not force:
            raise BuildError(f"{path} is {format_size(before['size'])}; shrinking it to {format_size(wanted_size)} would cut off "
                             "data at its end. Set force=true to shrink anyway", option="size")
        action = "grow" if wanted_size > before["size"] else "shrink"
        after = dict(before, size=wanted_size)

    if action and not check_mode:
        if action == "remove":
            os.unlink(path)
        elif action == "create":
            create_sparse(path, wanted_size)
        else:
            resize(path, wanted_size)
        after = _state_of(path, image_kind(path, "path", allow_block_device), allow_block_device)

    result: dict[str, t.Any] = {
        "changed": action is not None,
        "path": path,
        "diff": {"before": _describe(before), "after": _describe(after)},
    }
    if action:
        result["action"] = action
    if after["state"] == "present":
        result["size"] = after["size"]
        result["allocated"] = after["allocated"]
    return result
