# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What the partition_table module does: make the table on an image match a wanted one.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import typing as t

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._image import Image, image_kind
from ansible_collections.osimage.builder.plugins.module_utils._partition import (
    SECTOR_SIZE, Partition, PartitionTable, clear_writes, parse, plan_table, serialize,
)
from ansible_collections.osimage.builder.plugins.module_utils._sizes import format_size

NO_TABLE = "(no partition table)\n"
# LBA 1-33 hold a GPT's header and entries; on an MBR disk the same sectors are
# the start of the post-MBR gap where GRUB embeds core.img.
GPT_PRIMARY_BYTES = 34 * SECTOR_SIZE


def _data_at_risk(image: Image, current: PartitionTable, wanted: PartitionTable) -> list[str]:
    """Describe what writing ``wanted`` over ``current`` would change where data may live.

    A partition kept exactly as it is, or a new one, risks nothing; a changed,
    moved or dropped partition does if any of its sectors is allocated.
    """
    unchanged = set(wanted.partitions) if wanted.label == current.label else set()
    risks = []
    for part in current.partitions:
        if part in unchanged:
            continue
        if image.has_data(part.start_sector * SECTOR_SIZE, part.sectors * SECTOR_SIZE):
            risks.append(f"partition {part.number} (sectors {part.start_sector}-{part.start_sector + part.sectors - 1}) "
                         "holds data and would be changed, moved or dropped")
    if current.label == "msdos" and wanted.label != "msdos" and image.has_data(SECTOR_SIZE, GPT_PRIMARY_BYTES - SECTOR_SIZE):
        risks.append("sectors 1-33 (the MBR gap, e.g. GRUB's core.img) hold data and the GPT header would overwrite them")
    return risks


def _clean(partitions: list[dict[str, t.Any]] | None) -> list[dict[str, t.Any]]:
    # Ansible fills every unset suboption with None; the planner treats a key
    # that is present as given.
    return [{key: value for key, value in (part or {}).items() if value is not None} for part in partitions or []]


def ensure_partition_table(image: str, label: str, partitions: list[dict[str, t.Any]] | None, disk_id: str | None = None,
                           alignment: object = "1MiB", seed: str = "osimage.builder", force: bool = False,
                           allow_block_device: bool = False, check_mode: bool = False) -> dict[str, t.Any]:
    """Write the wanted table unless the image already holds it; return the module result."""
    partitions = _clean(partitions)
    if image_kind(image, "image", allow_block_device) is None and check_mode:
        return {
            "changed": True,
            "msg": f"{image} does not exist yet; the table would be written once it is created",
            "label": label,
            "partitions": [],
            "diff": {"before": NO_TABLE, "after": f"(a {label} table on {image}, once the image exists)\n"},
        }
    with Image(image, writable=not check_mode, allow_block_device=allow_block_device) as img:
        if not check_mode:
            img.lock()
        size = img.size
        wanted = plan_table(label, size, partitions, alignment=alignment, disk_id=disk_id, seed=seed)
        try:
            current = parse(img.read, size)
        except BuildError as exc:
            if not force:
                raise BuildError(f"the image holds a partition table this module cannot read ({exc.message}); "
                                 "set force=true to replace it", option="image")
            current = None
        writes = clear_writes(current, size, wanted) + serialize(wanted)
        changed = img.differs(writes)
        if changed and current is not None and current.partitions and not force:
            risks = _data_at_risk(img, current, wanted)
            if risks:
                raise BuildError(
                    f"{image} already has a different {current.label} table; writing the wanted one could destroy data: "
                    + "; ".join(risks) + ". Set force=true to replace it, or make the task match the table on disk.",
                    option="partitions", current=current.as_dict())
        if changed and not check_mode:
            img.write_all(writes)
    result = wanted.as_dict()
    result.update({
        "changed": changed,
        "diff": {
            "before": current.describe() if current else NO_TABLE,
            "after": wanted.describe(),
            "before_header": f"{image} ({format_size(size)})",
            "after_header": f"{image} ({format_size(size)})",
        },
    })
    return result


def read_table(image: Image, option: str = "image") -> PartitionTable:
    """The partition table on ``image``; raise when there is none."""
    table = parse(image.read, image.size)
    if table is None:
        raise BuildError(f"{image.path} has no partition table; write one first with osimage.builder.partition_table",
                         option=option)
    return table


def find_partition(table: PartitionTable, ref: object, option: str) -> Partition:
    """The partition ``ref`` names: its number (1, "1") or its GPT name ("root")."""
    text = str(ref).strip()
    for part in table.partitions:
        if text.isdigit() and part.number == int(text):
            return part
    for part in table.partitions:
        if part.name and part.name == text:
            return part
    known = ", ".join(f"{p.number}" + (f" ({p.name})" if p.name else "") for p in table.partitions) or "none"
    raise BuildError(f"there is no partition {text!r} on the image; its partitions are: {known}", option=option)
