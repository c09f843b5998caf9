# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What the grub_bios_install module does: build core.img and write it and
boot.img into an image as ``grub-install --target=i386-pc --no-rs-codes`` would.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import typing as t

from ansible_collections.osimage.builder.plugins.module_utils._bootcode import (
    BOOT_KERNEL_SECTOR, SECTOR_SIZE, core_modules, embedding_area, grub_prefix, install_writes, load_cfg, mkimage_argv,
)
from ansible_collections.osimage.builder.plugins.module_utils._commands import find_tool, run
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._fsprobe import probe
from ansible_collections.osimage.builder.plugins.module_utils._image import Image, image_kind
from ansible_collections.osimage.builder.plugins.module_utils._partition_table import find_partition, read_table

# boot.img's code between the BPB and the disk signature (grub-bios-internals.md §1.1):
# if it matches, sector 0 already holds GRUB's boot code.
_BOOT_CODE = slice(0x65, 0x1B8)


def _read_boot_img(grub_dir: str) -> bytes:
    path = os.path.join(grub_dir, "boot.img")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise BuildError(f"{grub_dir} has no boot.img; install grub-pc-bin (Debian) or grub2-pc-modules (Fedora), "
                         "or point grub_dir at GRUB's i386-pc directory", option="grub_dir")
    return data


def _build_core(mkimage: str, grub_dir: str, prefix: str, modules: list[str], config: str | None) -> bytes:
    with tempfile.TemporaryDirectory(prefix="osimage-core-") as tmp:
        output = os.path.join(tmp, "core.img")
        config_path = None
        if config is not None:
            config_path = os.path.join(tmp, "load.cfg")
            with open(config_path, "w") as handle:
                handle.write(config)
        run(mkimage_argv(mkimage, grub_dir, output, prefix, modules, config_path), option="modules", what="grub-mkimage")
        with open(output, "rb") as handle:
            return handle.read()


def _describe_boot_code(sector0: bytes, boot_img: bytes) -> str:
    if not sector0[:0x1B8].strip(b"\0"):
        return "sector 0: no boot code"
    if sector0[_BOOT_CODE] == boot_img[_BOOT_CODE]:
        pointer = int.from_bytes(sector0[BOOT_KERNEL_SECTOR:BOOT_KERNEL_SECTOR + 8], "little")
        return f"sector 0: GRUB boot.img, core.img at LBA {pointer}"
    return "sector 0: other boot code"


def _describe_area(core_lba: int, on_disk: bytes, core: bytes) -> str:
    if on_disk == core:
        return f"LBA {core_lba}: this core.img"
    if not on_disk.strip(b"\0"):
        return f"LBA {core_lba}: empty"
    return f"LBA {core_lba}: other data"


def install_grub_bios(image: str, boot_partition: object, grub_dir: str = "/usr/lib/grub/i386-pc", prefix: str = "/boot/grub",
                      modules: t.Sequence[str] = (), mkimage: str | None = None, search_by_uuid: bool = False,
                      allow_block_device: bool = False, check_mode: bool = False) -> dict[str, t.Any]:
    """Write GRUB's BIOS boot code into ``image``; return the module result."""
    boot_img = _read_boot_img(grub_dir)
    mkimage_path = find_tool([mkimage] if mkimage else ["grub-mkimage", "grub2-mkimage"], "mkimage",
                             "grub-common (Debian) or grub2-tools (Fedora)")
    if check_mode and image_kind(image, "image", allow_block_device) is None:
        return {"changed": True, "msg": f"{image} does not exist yet; GRUB would be installed once it is created",
                "diff": {"before": "", "after": f"GRUB boot code on {image}\n"}}
    with Image(image, writable=not check_mode, allow_block_device=allow_block_device) as img:
        if not check_mode:
            img.lock()
        table = read_table(img)
        part = find_partition(table, boot_partition, "boot_partition")
        found = probe(img.read, part.start_sector * SECTOR_SIZE)
        if not found:
            raise BuildError(f"partition {part.number} holds no filesystem GRUB could read /boot/grub from; "
                             "create it first with osimage.builder.filesystem", option="boot_partition")
        area = embedding_area(table.label, [
            {"number": p.number, "type": p.type, "start_sector": p.start_sector, "sectors": p.sectors} for p in table.partitions])
        core_prefix = grub_prefix(table.label, part.number, prefix, search_by_uuid)
        mods = core_modules(table.label, found["fstype"], list(modules), search_by_uuid)
        config = load_cfg(found["uuid"], prefix) if search_by_uuid else None
        core = _build_core(mkimage_path, grub_dir, core_prefix, mods, config)
        writes = install_writes(boot_img, core, img.read(0, SECTOR_SIZE), area)
        core_offset, patched_core = writes[0]
        before = (f"{_describe_boot_code(img.read(0, SECTOR_SIZE), boot_img)}\n"
                  f"{_describe_area(area[0], img.read(core_offset, len(patched_core)), patched_core)}\n")
        changed = img.differs(writes)
        if changed and not check_mode:
            img.write_all(writes)
    return {
        "changed": changed,
        "boot_partition": part.number,
        "fstype": found["fstype"],
        "fs_uuid": found["uuid"],
        "prefix": core_prefix,
        "modules": mods,
        "load_cfg": config,
        "core_lba": area[0],
        "core_sectors": -(-len(patched_core) // SECTOR_SIZE),
        "embedding_area": {"start_sector": area[0], "sectors": area[1]},
        "core_sha256": hashlib.sha256(patched_core).hexdigest(),
        "diff": {
            "before": before,
            "after": f"sector 0: GRUB boot.img, core.img at LBA {area[0]}\n{_describe_area(area[0], patched_core, patched_core)}\n"
                     f"prefix {core_prefix}\nmodules {' '.join(mods)}\n",
        },
    }
