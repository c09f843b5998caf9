#!/usr/bin/python
# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: grub_bios_install
short_description: Make a disk image BIOS-bootable with GRUB, without grub-install
version_added: 0.1.0
description:
  - Builds C(core.img) with C(grub-mkimage) and writes it, and GRUB's C(boot.img) merged into sector 0, into an image
    file, byte for byte as C(grub-install --target=i386-pc --no-rs-codes) would on a real disk. No loop device,
    mount or root is needed.
  - On an V(msdos) table C(core.img) goes into the gap between the MBR and the first partition; on V(gpt) and
    V(hybrid) tables into the BIOS boot partition (type V(bios_grub)).
  - Sector 0 keeps its BPB (bytes 0x03-0x59), disk signature and partition table (0x1B8-0x1FD).
  - The modules and C(grub.cfg) must already be in the boot partition's filesystem, from the same O(grub_dir)
    (M(osimage.builder.grub_stage) puts them into the tree, M(osimage.builder.filesystem) makes the filesystem).
  - Idempotent by comparing the bytes it would write with the bytes on the image; C(grub-mkimage) output is deterministic.
author:
  - osimage.builder developers (@osimage)
extends_documentation_fragment:
  - osimage.builder._attributes
  - osimage.builder._attributes.IMAGE
attributes:
  check_mode:
    support: full
    details:
      - Builds C(core.img) in a temporary directory to compare it; writes nothing into the image.
  diff_mode:
    support: full
    details:
      - The diff describes the boot code in sector 0 and what the embedding area holds, before and after.
  idempotent:
    support: full
options:
  boot_partition:
    description:
      - Number or GPT name of the partition whose filesystem holds O(prefix) (C(/boot/grub)).
    type: str
    required: true
  grub_dir:
    description:
      - GRUB's i386-pc directory with C(boot.img) and the modules.
    type: path
    default: /usr/lib/grub/i386-pc
  prefix:
    description:
      - GRUB's directory inside the boot partition's filesystem. Use V(/grub) when the partition is a separate C(/boot).
    type: str
    default: /boot/grub
  modules:
    description:
      - Extra modules to put into C(core.img), before the filesystem, partition map and C(biosdisk) modules that are
        always there (the order C(grub-install --modules) gives).
    type: list
    elements: str
    default: []
  mkimage:
    description:
      - The C(grub-mkimage) program. By default C(grub-mkimage), or C(grub2-mkimage) where that is what exists.
    type: path
  search_by_uuid:
    description:
      - Embed a C(load.cfg) that finds the boot filesystem by its UUID (C(search.fs_uuid)), as C(grub-install) does when
        C(/boot) is on another disk. By default the prefix names the partition, C((,msdos1)/boot/grub), as
        C(grub-install) does for a single disk.
      - Survives renumbering of partitions; needs a few more sectors (module C(search_fs_uuid)).
    type: bool
    default: false
seealso:
  - module: osimage.builder.grub_stage
  - module: osimage.builder.filesystem
  - name: GRUB manual, BIOS installation
    description: Why GPT disks need a BIOS boot partition.
    link: https://www.gnu.org/software/grub/manual/grub/html_node/BIOS-installation.html
"""

EXAMPLES = r"""
---
- name: Install GRUB into an MBR image whose first partition holds /boot/grub
  osimage.builder.grub_bios_install:
    image: /var/tmp/build/disk.raw
    boot_partition: 1

- name: Install GRUB into a GPT image (core.img goes into the bios_grub partition)
  osimage.builder.grub_bios_install:
    image: /var/tmp/build/disk.raw
    boot_partition: root
    search_by_uuid: true
"""

RETURN = r"""
---
boot_partition:
  description: Number of the partition GRUB reads C(/boot/grub) from.
  returned: success
  type: int
  sample: 1
fstype:
  description: Filesystem found on the boot partition.
  returned: success
  type: str
  sample: ext4
fs_uuid:
  description: UUID of that filesystem.
  returned: success
  type: str
  sample: 0f0e0d0c-0b0a-5908-8706-050403020100
prefix:
  description: The prefix compiled into C(core.img).
  returned: success
  type: str
  sample: (,msdos1)/boot/grub
modules:
  description: The modules in C(core.img), in order.
  returned: success
  type: list
  elements: str
  sample: [ext2, part_msdos, biosdisk]
load_cfg:
  description: The embedded C(load.cfg), when O(search_by_uuid=true).
  returned: success
  type: str
  sample: null
core_lba:
  description: Sector where C(core.img) starts.
  returned: success
  type: int
  sample: 1
core_sectors:
  description: Sectors C(core.img) occupies.
  returned: success
  type: int
  sample: 53
embedding_area:
  description: The sectors GRUB may use for C(core.img) (MBR gap or BIOS boot partition).
  returned: success
  type: dict
  sample: {start_sector: 1, sectors: 2047}
core_sha256:
  description: SHA-256 of C(core.img) as written (blocklist patched, padded to whole sectors).
  returned: success
  type: str
  sample: 2c4f0b7e1d7a9c0b1c5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.osimage.builder.plugins.module_utils._adapter import exit_with, failing_cleanly
from ansible_collections.osimage.builder.plugins.module_utils._grub_bios_install import install_grub_bios


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "image": {"type": "path", "required": True},
            "boot_partition": {"type": "str", "required": True},
            "grub_dir": {"type": "path", "default": "/usr/lib/grub/i386-pc"},
            "prefix": {"type": "str", "default": "/boot/grub"},
            "modules": {"type": "list", "elements": "str", "default": []},
            "mkimage": {"type": "path"},
            "search_by_uuid": {"type": "bool", "default": False},
            "allow_block_device": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    p = module.params
    with failing_cleanly(module):
        result = install_grub_bios(p["image"], p["boot_partition"], grub_dir=p["grub_dir"], prefix=p["prefix"],
                                   modules=p["modules"], mkimage=p["mkimage"], search_by_uuid=p["search_by_uuid"],
                                   allow_block_device=p["allow_block_device"], check_mode=module.check_mode)
    exit_with(module, result)


if __name__ == "__main__":
    main()
