#!/usr/bin/python
# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: partition_table
short_description: Write an MBR, GPT or hybrid partition table into a disk image file
version_added: 0.1.0
description:
  - Plans the wanted table, compares it with the one on the image and writes it only when it differs.
    Pure Python; no C(sfdisk), loop device or root needed. The result is read identically by C(sfdisk --json),
    passes C(sgdisk -v) and is accepted by C(parted).
  - Identifiers that are not given (disk id, partition GUIDs) derive from O(seed), so the same task gives the same bytes.
  - Refuses to replace a different table whose partitions may hold data unless O(force=true). Adding partitions,
    or rewriting the GPT backup at the new end of a grown image, needs no O(force).
  - Only 512-byte sectors. Extended and logical MBR partitions are not supported (neither written nor read),
    so O(label=msdos) takes at most four primary partitions; use O(label=gpt) for more.
  - The boot code area of sector 0 (bytes 0-439) is never written, so GRUB's boot code survives a rewrite of the table.
author:
  - osimage.builder developers (@osimage)
extends_documentation_fragment:
  - osimage.builder._attributes
  - osimage.builder._attributes.IMAGE
  - osimage.builder._attributes.FORCE
  - osimage.builder._attributes.SEED
attributes:
  check_mode:
    support: full
    details:
      - On an image that does not exist yet, check mode reports that the table would be written.
  diff_mode:
    support: full
    details:
      - The diff shows the partition table before and after as readable text.
  idempotent:
    support: full
options:
  label:
    description:
      - V(msdos) is a classic MBR (at most 4 primary partitions).
      - V(gpt) is a GUID partition table with a protective MBR.
      - V(hybrid) is a GPT plus an MBR that mirrors up to three of its partitions, for firmware or tools that only read the MBR.
    type: str
    choices: [msdos, gpt, hybrid]
    required: true
  disk_id:
    description:
      - The disk identifier. For V(msdos) a 32-bit number (V(0x1a2b3c4d)); for V(gpt) and V(hybrid) a GUID.
      - Derived from O(seed) when not given.
    type: str
  alignment:
    description:
      - Partitions without an explicit O(partitions[].start) begin at the next multiple of this after the previous partition.
    type: raw
    default: 1MiB
  partitions:
    description:
      - The partitions, in order; the first is partition 1.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description:
          - GPT partition name (at most 36 characters). MBR partitions have no names.
          - Later tasks (M(osimage.builder.filesystem), M(osimage.builder.grub_bios_install)) can refer to a partition by name.
        type: str
      type:
        description:
          - An alias, V(linux), V(esp), V(bios_grub), V(swap), V(linux-root-x86-64), V(xbootldr) or V(lvm),
            a type GUID (GPT), or an MBR type byte in hex such as V(83) or V(0xef) (msdos).
        type: str
        default: linux
      size:
        description:
          - Size in bytes or with a unit (V(256MiB), V(1GiB)), or a percentage of the disk (V(50%)).
          - Leave it out on the last partition to fill the rest of the disk.
        type: raw
      start:
        description:
          - Where the partition starts (bytes or with a unit). By default it starts at the first multiple of O(alignment) after the previous partition.
        type: raw
      bootable:
        description:
          - MBR active flag (0x80); on GPT the legacy BIOS bootable attribute (bit 2).
        type: bool
        default: false
      uuid:
        description:
          - GPT unique partition GUID. Derived from O(seed) when not given.
        type: str
      attributes:
        description:
          - GPT attribute bits, as a list of bit numbers (V([0, 63])) or an integer.
        type: raw
      hybrid:
        description:
          - With O(label=hybrid), mirror this partition in the MBR. When no partition sets it, the first three
            that are not V(bios_grub) are mirrored.
        type: bool
      mbr_type:
        description:
          - With O(label=hybrid), the MBR type byte of the mirrored entry; by default the one that matches O(partitions[].type).
        type: str
seealso:
  - module: osimage.builder.disk_image
  - name: UEFI specification, GUID Partition Table
    description: The on-disk format written for O(label=gpt).
    link: https://uefi.org/specs/UEFI/2.10/05_GUID_Partition_Table_Format.html
"""

EXAMPLES = r"""
---
- name: GPT for BIOS and UEFI boot
  osimage.builder.partition_table:
    image: /var/tmp/build/disk.raw
    label: gpt
    partitions:
      - {name: bios, type: bios_grub, size: 1MiB}
      - {name: esp, type: esp, size: 256MiB}
      - {name: root, type: linux-root-x86-64}
  register: table

- name: Show where the root partition starts
  ansible.builtin.debug:
    msg: "root starts at byte {{ table.partitions[2].start }}"

- name: Classic MBR with a bootable root and a fixed disk id
  osimage.builder.partition_table:
    image: /var/tmp/build/disk.raw
    label: msdos
    disk_id: "0x1a2b3c4d"
    partitions:
      - {type: linux, bootable: true, size: 1GiB}
      - {type: swap, size: 256MiB}
      - {type: linux}

- name: Hybrid MBR mirroring the ESP and root
  osimage.builder.partition_table:
    image: /var/tmp/build/disk.raw
    label: hybrid
    partitions:
      - {name: bios, type: bios_grub, size: 1MiB}
      - {name: esp, type: esp, size: 256MiB, hybrid: true}
      - {name: root, type: linux, hybrid: true, bootable: true}
"""

RETURN = r"""
---
label:
  description: The table type.
  returned: success
  type: str
  sample: gpt
disk_id:
  description: Disk identifier (msdos hex number or GPT disk GUID), as sfdisk prints it.
  returned: success
  type: str
  sample: 8D1A62BF-7A3C-5E1B-9B44-5D8E1C6D2F10
sector_size:
  description: Logical sector size in bytes (always 512).
  returned: success
  type: int
  sample: 512
partitions:
  description: The partitions as written (or as they would be written in check mode).
  returned: success
  type: list
  elements: dict
  contains:
    number:
      description: Partition number, from 1.
      type: int
      sample: 3
    name:
      description: GPT name; empty for msdos.
      type: str
      sample: root
    type:
      description: Type GUID (GPT) or hex type byte (msdos), as sfdisk prints it.
      type: str
      sample: 4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709
    start:
      description: Offset of the partition in bytes.
      type: int
      sample: 269484032
    size:
      description: Size of the partition in bytes.
      type: int
      sample: 1877983232
    start_sector:
      description: First sector of the partition.
      type: int
      sample: 526336
    sectors:
      description: Number of sectors.
      type: int
      sample: 3667936
    uuid:
      description: GPT unique partition GUID, or the sfdisk-style C(<disk id>-<NN>) for msdos.
      type: str
      sample: 3B5C2E1A-0F4D-5A8B-8E2C-7F1D9A6B4C3E
    bootable:
      description: Whether the MBR active flag or the GPT legacy BIOS bootable bit is set.
      type: bool
      sample: false
    attributes:
      description: GPT attribute bits as an integer.
      type: int
      sample: 0
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.osimage.builder.plugins.module_utils._adapter import exit_with, failing_cleanly
from ansible_collections.osimage.builder.plugins.module_utils._partition_table import ensure_partition_table


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "image": {"type": "path", "required": True},
            "label": {"type": "str", "required": True, "choices": ["msdos", "gpt", "hybrid"]},
            "disk_id": {"type": "str"},
            "alignment": {"type": "raw", "default": "1MiB"},
            "partitions": {
                "type": "list", "elements": "dict", "default": [],
                "options": {
                    "name": {"type": "str"},
                    "type": {"type": "str", "default": "linux"},
                    "size": {"type": "raw"},
                    "start": {"type": "raw"},
                    "bootable": {"type": "bool", "default": False},
                    "uuid": {"type": "str"},
                    "attributes": {"type": "raw"},
                    "hybrid": {"type": "bool"},
                    "mbr_type": {"type": "str"},
                },
            },
            "seed": {"type": "str", "default": "osimage.builder"},
            "force": {"type": "bool", "default": False},
            "allow_block_device": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    p = module.params
    with failing_cleanly(module):
        result = ensure_partition_table(
            p["image"], p["label"], p["partitions"], disk_id=p["disk_id"], alignment=p["alignment"], seed=p["seed"],
            force=p["force"], allow_block_device=p["allow_block_device"], check_mode=module.check_mode)
    exit_with(module, result)


if __name__ == "__main__":
    main()
