#!/usr/bin/python
# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: grub_efi_install
short_description: Make a disk image UEFI-bootable with GRUB (optionally Secure Boot), without grub-install
version_added: 0.1.0
description:
  - Writes the EFI boot files into the FAT filesystem of the EFI system partition (ESP) of an image file, on the
    removable-media path C(EFI/BOOT/BOOTX64.EFI) that UEFI firmware boots without any NVRAM entry. No loop device,
    mount, C(efibootmgr) or root is needed; the FAT is read and written with mtools at the partition's offset.
  - Without Secure Boot, C(BOOTX64.EFI) is a GRUB image built with C(grub-mkimage -O x86_64-efi) from O(grub_dir),
    with the modules a Linux boot needs built in (see RV(modules)).
  - With O(secure_boot=true), C(BOOTX64.EFI) is the distribution's shim signed by Microsoft and C(grubx64.efi) its
    signed GRUB (plus C(mmx64.efi), MokManager, when it lies beside the shim), taken from O(tree) or from O(shim) and
    O(signed_grub).
  - In both cases a small C(grub.cfg) (in C(EFI/BOOT/), and with Secure Boot also in C(EFI/debian/), the prefix
    Debian's signed GRUB has built in) finds the filesystem holding O(prefix) by its UUID and runs the
    C(grub.cfg) there.
  - The ESP must already hold a FAT filesystem (M(osimage.builder.filesystem) with O(osimage.builder.filesystem#module:fstype=vfat)).
    After writing, the filesystem module's record of the ESP is refreshed, so its next run still reports no change.
  - Idempotent by comparing the bytes of each file on the ESP with the wanted bytes; only files that differ are
    written. Files that belong to the other mode (C(EFI/BOOT/grubx64.efi) and C(EFI/BOOT/mmx64.efi) when Secure Boot
    is turned off, C(EFI/debian/grub.cfg) if this module wrote it) are removed. Nothing else on the ESP is touched.
  - Written files get the timestamp C(SOURCE_DATE_EPOCH) when it is set, else the newest modification time of the
    files they are made from, so two builds from the same inputs are identical.
author:
  - osimage.builder developers (@osimage)
extends_documentation_fragment:
  - osimage.builder._attributes
  - osimage.builder._attributes.IMAGE
attributes:
  check_mode:
    support: full
    details:
      - Builds the GRUB image in a temporary directory and reads the files on the ESP to compare; writes nothing.
  diff_mode:
    support: full
    details:
      - The diff lists each managed file on the ESP with its size and SHA-256, before and after.
  idempotent:
    support: full
options:
  esp_partition:
    description:
      - Number or GPT name of the EFI system partition.
      - It must hold a FAT filesystem.
    type: str
    required: true
  root_uuid:
    description:
      - UUID of the filesystem that holds O(prefix), as C(blkid) shows it (for FAT, C(ABCD-1234)).
      - Exactly one of O(root_uuid) and O(boot_partition) is required.
    type: str
  boot_partition:
    description:
      - Number or GPT name of the partition whose filesystem holds O(prefix); its UUID is read from the image.
      - Exactly one of O(root_uuid) and O(boot_partition) is required.
    type: str
  grub_dir:
    description:
      - GRUB's x86_64-efi directory (C(kernel.img) and the modules) to build C(BOOTX64.EFI) from.
      - Not used with O(secure_boot=true).
    type: path
    default: /usr/lib/grub/x86_64-efi
  prefix:
    description:
      - GRUB's directory on the filesystem O(root_uuid) names. Its C(grub.cfg) is the one that boots the system.
      - Use V(/grub) when that filesystem is a separate C(/boot).
    type: str
    default: /boot/grub
  secure_boot:
    description:
      - Put the signed shim and the signed GRUB on the ESP instead of a self-built GRUB, so the image boots with
        Secure Boot enforced (firmware that trusts Microsoft's UEFI CA, as nearly all PCs and clouds do).
      - Needs O(tree) or both O(shim) and O(signed_grub).
      - The signed GRUB cannot load modules that are not built into it, and under Secure Boot the kernel must be
        signed too (Debian's are).
    type: bool
    default: false
  tree:
    description:
      - Root tree of the system being built, with the packages C(shim-signed) and C(grub-efi-amd64-signed) installed
        (or unpacked with C(dpkg-deb -x)). The shim is read from C(usr/lib/shim/shimx64.efi.signed), GRUB from
        C(usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed), MokManager from C(usr/lib/shim/mmx64.efi.signed)
        when C(shim-helpers-amd64-signed) put it there.
      - Used only with O(secure_boot=true).
    type: path
  shim:
    description:
      - Path of the signed shim, instead of the one in O(tree). MokManager is taken from C(mmx64.efi.signed) beside it
        when that exists.
      - Used only with O(secure_boot=true).
    type: path
  signed_grub:
    description:
      - Path of the signed GRUB EFI image, instead of the one in O(tree).
      - Used only with O(secure_boot=true).
    type: path
  modules:
    description:
      - Extra modules to build into C(BOOTX64.EFI), after the ones that are always there (RV(modules)), for example
        V(btrfs) or V(lvm) when the root filesystem needs them.
      - Not possible with O(secure_boot=true).
    type: list
    elements: str
    default: []
  mkimage:
    description:
      - The C(grub-mkimage) program. By default C(grub-mkimage), or C(grub2-mkimage) where that is what exists.
    type: path
notes:
  - Needs mtools (C(mcopy), C(mmd), C(mdel), C(mdir)) on the build host, and C(grub-mkimage) with GRUB's x86_64-efi
    modules (Debian C(grub-efi-amd64-bin)) unless O(secure_boot=true).
  - No NVRAM boot entry is created; firmware boots the removable path of the disk.
seealso:
  - module: osimage.builder.filesystem
  - module: osimage.builder.grub_bios_install
  - module: osimage.builder.boot_test
  - name: UEFI specification, removable media boot behavior
    description: Where firmware looks for a boot loader when no boot option names one.
    link: https://uefi.org/specs/UEFI/2.10/03_Boot_Manager.html#removable-media-boot-behavior
"""

EXAMPLES = r"""
---
- name: Make a GPT image UEFI-bootable (ESP is partition 1, /boot/grub is on the root partition)
  osimage.builder.grub_efi_install:
    image: /var/tmp/build/disk.raw
    esp_partition: esp
    boot_partition: root

- name: The same for Secure Boot, with the signed shim and GRUB from the tree being built
  osimage.builder.grub_efi_install:
    image: /var/tmp/build/disk.raw
    esp_partition: esp
    root_uuid: 0f0e0d0c-0b0a-4908-8706-050403020100
    secure_boot: true
    tree: /var/tmp/build/tree
"""

RETURN = r"""
---
esp_partition:
  description: Number of the EFI system partition.
  returned: success
  type: int
  sample: 1
esp_uuid:
  description: Volume id of the FAT on the ESP.
  returned: success
  type: str
  sample: 5C1A-2B3D
root_uuid:
  description: The UUID C(grub.cfg) searches for.
  returned: success
  type: str
  sample: 0f0e0d0c-0b0a-4908-8706-050403020100
prefix:
  description: GRUB's directory on that filesystem.
  returned: success
  type: str
  sample: /boot/grub
secure_boot:
  description: Whether the signed shim and GRUB were used.
  returned: success
  type: bool
  sample: false
modules:
  description: The modules built into C(BOOTX64.EFI), in order; empty with Secure Boot.
  returned: success
  type: list
  elements: str
  sample: [part_gpt, part_msdos, fat, ext2, normal, configfile, search, search_fs_uuid, echo, test, linux, gzio, all_video,
           serial, terminal, loadenv, halt, reboot, sleep]
grub_cfg:
  description: The C(grub.cfg) written to the ESP.
  returned: success
  type: str
  sample: "search --no-floppy --fs-uuid --set=root 0f0e0d0c-0b0a-4908-8706-050403020100\nset prefix=($root)/boot/grub\n"
files:
  description: Each file this module keeps on the ESP, with its size, SHA-256 and where it comes from.
  returned: success
  type: dict
  sample:
    EFI/BOOT/BOOTX64.EFI: {size: 724992, sha256: 3f6c0e4d6f2b1a09e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5,
                           source: grub-mkimage -O x86_64-efi -d /usr/lib/grub/x86_64-efi}
    EFI/BOOT/grub.cfg: {size: 220, sha256: 0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9, source: generated}
written:
  description: The files written (or, in check mode, that would be).
  returned: success
  type: list
  elements: str
  sample: [EFI/BOOT/BOOTX64.EFI, EFI/BOOT/grub.cfg]
removed:
  description: Files of the other mode that were removed (or would be).
  returned: success
  type: list
  elements: str
  sample: [EFI/BOOT/grubx64.efi]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.osimage.builder.plugins.module_utils._adapter import exit_with, failing_cleanly
from ansible_collections.osimage.builder.plugins.module_utils._grub_efi_install import install_grub_efi


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "image": {"type": "path", "required": True},
            "esp_partition": {"type": "str", "required": True},
            "root_uuid": {"type": "str"},
            "boot_partition": {"type": "str"},
            "grub_dir": {"type": "path", "default": "/usr/lib/grub/x86_64-efi"},
            "prefix": {"type": "str", "default": "/boot/grub"},
            "secure_boot": {"type": "bool", "default": False},
            "tree": {"type": "path"},
            "shim": {"type": "path"},
            "signed_grub": {"type": "path"},
            "modules": {"type": "list", "elements": "str", "default": []},
            "mkimage": {"type": "path"},
            "allow_block_device": {"type": "bool", "default": False},
        },
        required_one_of=[("root_uuid", "boot_partition")],
        mutually_exclusive=[("root_uuid", "boot_partition")],
        supports_check_mode=True,
    )
    p = module.params
    with failing_cleanly(module):
        result = install_grub_efi(p["image"], p["esp_partition"], root_uuid=p["root_uuid"], boot_partition=p["boot_partition"],
                                  grub_dir=p["grub_dir"], prefix=p["prefix"], secure_boot=p["secure_boot"], tree=p["tree"],
                                  shim=p["shim"], signed_grub=p["signed_grub"], modules=p["modules"], mkimage=p["mkimage"],
                                  allow_block_device=p["allow_block_device"], check_mode=module.check_mode)
    exit_with(module, result)


if __name__ == "__main__":
    main()
