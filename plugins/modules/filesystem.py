#!/usr/bin/python
# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: filesystem
short_description: Make an ext2, ext3, ext4 or FAT filesystem in a partition of a disk image and fill it from a directory
version_added: 0.1.0
description:
  - Formats one partition of a disk image and copies a directory tree into it, without loop devices, mounts or root.
    ext filesystems are made with C(mke2fs -d); FAT with C(mkfs.fat) and filled with C(mcopy) from mtools.
  - The filesystem is built in a temporary sparse file of the partition's size beside the image, then copied into the
    partition. The image stays sparse, and when the build fails (for example because the tree does not fit) the image
    is left exactly as it was.
  - Whether the tree fits is estimated before anything is built, and a tree that is too big fails with the space it needs
    and the space the partition has.
  - Idempotent through a record kept beside the image (C(<image>.osimage-state.json)) of the inputs of the last build
    (a digest of the tree's metadata, the options, the partition geometry and the tool versions) and a fingerprint of the
    partition right after it (its allocated extents and first 4 MiB). A rerun with unchanged inputs reads no file contents
    and only a few MiB of the image. A filesystem that was changed after it was built (mounted, or written with
    C(debugfs) or C(mcopy)), or one this module did not build, is only replaced with O(force=true).
  - Deterministic. The filesystem UUID (FAT volume id) and the ext directory hash seed derive from O(seed); timestamps come
    from the environment variable E(SOURCE_DATE_EPOCH) when it is set, else from the newest modification time in the tree,
    never from the clock. The same tree gives the same bytes, also a second later or from a copy of the tree.
  - Files keep their modification times. Access and change times inside an ext filesystem are set to each file's
    modification time, because the build host's values would make every build different.
  - ext keeps owners, modes, symlinks, hard links, device nodes, FIFOs, sockets and extended attributes. The root
    directory of the filesystem is owned by the owner of O(source) and has mode 0755.
  - Run unprivileged, the module reads the tree as that user, so every file must be readable by it, and the owners in the
    filesystem are those of the files (usually that user). Build a tree with other owners as root.
  - FAT holds only directories and regular files of less than 4 GiB. Symlinks, device nodes, FIFOs, sockets, names FAT
    cannot store and names that differ only in case make the task fail, naming the path. Hard links become copies.
    Owners, modes and extended attributes are not kept.
author:
  - osimage.builder developers (@osimage)
requirements:
  - e2fsprogs 1.43 or later (C(mke2fs)) for ext filesystems; 1.47 or later avoids writing zeros over the inode tables.
  - dosfstools (C(mkfs.fat)) and mtools (C(mcopy), C(mmd)) for O(fstype=vfat).
extends_documentation_fragment:
  - osimage.builder._attributes
  - osimage.builder._attributes.IMAGE
  - osimage.builder._attributes.FORCE
  - osimage.builder._attributes.SEED
attributes:
  check_mode:
    support: full
    details:
      - Check mode walks the tree and checks that it fits, building an empty filesystem in a temporary file, but writes
        nothing to the image.
      - On an image that does not exist yet, or has no partition table yet, check mode reports that the filesystem would
        be built.
  diff_mode:
    support: full
    details:
      - The diff shows the filesystem type, UUID, label, size and tree digest before and after.
  idempotent:
    support: full
    details:
      - Not idempotent while something else keeps changing the partition; with O(force=true) the filesystem is then rebuilt
        on every run.
options:
  partition:
    description:
      - The partition to format, by number (V(2)) or by GPT name (V(root)).
    type: raw
    required: true
  fstype:
    description:
      - The filesystem to make. V(vfat) is FAT12, FAT16 or FAT32 as the partition size requires; FAT32 from about 33 MiB
        up, with Microsoft's cluster sizes (512 bytes up to 260 MiB, 4 KiB up to 8 GiB).
    type: str
    choices: [ext4, ext3, ext2, vfat]
    required: true
  source:
    description:
      - Directory whose contents become the root of the filesystem. Symlinks inside it are copied as symlinks.
      - When left out, the filesystem is empty.
    type: path
  label:
    description:
      - Filesystem label. For ext at most 16 bytes.
      - For V(vfat) at most 11 characters from A-Z, 0-9, space, parentheses and C(!#$%&'-@^_`{}~); it is stored upper-case.
    type: str
  uuid:
    description:
      - Filesystem UUID for ext (V(0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d)), or volume id for V(vfat) (V(1A2B-3C4D)).
      - Derived from O(seed) and the partition when not given.
    type: str
  mkfs_options:
    description:
      - Extra options for C(mke2fs) or C(mkfs.fat), one list item per argument, for example V(['-b', '4096']),
        V(['-O', '^has_journal']), V(['-N', '200000']) or, for FAT, V(['-F', '16']) or V(['-s', '8']).
      - C(mke2fs -E) settings are merged with the module's own. Options the module sets from its own options (label,
        UUID, type, source, hash seed, offset) are refused.
      - By default ext block size, inode count and features come from mke2fs and C(/etc/mke2fs.conf) of the build host.
    type: list
    elements: str
    default: []
seealso:
  - module: osimage.builder.disk_image
  - module: osimage.builder.partition_table
  - name: mke2fs manual
    description: The options C(mkfs_options) can pass for ext filesystems.
    link: https://man7.org/linux/man-pages/man8/mke2fs.8.html
"""

EXAMPLES = r"""
---
- name: Partition the image
  osimage.builder.partition_table:
    image: /var/tmp/build/disk.raw
    label: gpt
    partitions:
      - {name: esp, type: esp, size: 256MiB}
      - {name: root, type: linux-root-x86-64}

- name: Make the ESP from the staged EFI files
  osimage.builder.filesystem:
    image: /var/tmp/build/disk.raw
    partition: esp
    fstype: vfat
    label: EFI
    source: /var/tmp/build/esp

- name: Make the root filesystem from the tree
  osimage.builder.filesystem:
    image: /var/tmp/build/disk.raw
    partition: root
    fstype: ext4
    label: root
    source: /var/tmp/build/rootfs
  become: true
  environment:
    SOURCE_DATE_EPOCH: "1700000000"
  register: rootfs

- name: Use the root filesystem UUID in the kernel command line
  ansible.builtin.debug:
    msg: "root=UUID={{ rootfs.uuid }}"

- name: A 4 KiB-block ext4 without a journal
  osimage.builder.filesystem:
    image: /var/tmp/build/disk.raw
    partition: 2
    fstype: ext4
    source: /var/tmp/build/rootfs
    mkfs_options: ['-b', '4096', '-O', '^has_journal']
"""

RETURN = r"""
---
partition:
  description: Number of the partition.
  returned: success, except in check mode before the image or its partition table exists
  type: int
  sample: 2
offset:
  description: Byte offset of the partition (and so of the filesystem) in the image.
  returned: success, except in check mode before the image or its partition table exists
  type: int
  sample: 269484032
size:
  description: Size of the filesystem in bytes (the partition's size).
  returned: success, except in check mode before the image or its partition table exists
  type: int
  sample: 1877983232
fstype:
  description: The filesystem type.
  returned: success
  type: str
  sample: ext4
uuid:
  description: Filesystem UUID (ext) or volume id (vfat), as C(blkid) shows it.
  returned: success
  type: str
  sample: 5b0c9e1c-2f5d-5c8e-a3f2-7d61c0e9b4a1
label:
  description: The label as written (upper-case for vfat).
  returned: success
  type: str
  sample: root
built:
  description: Whether the filesystem was built by this run (false when it was already up to date, and in check mode).
  returned: success
  type: bool
  sample: true
msg:
  description: What was done, or would be done in check mode.
  returned: success
  type: str
  sample: built the ext4 filesystem on partition 2
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.osimage.builder.plugins.module_utils._adapter import exit_with, failing_cleanly
from ansible_collections.osimage.builder.plugins.module_utils._filesystem import ensure_filesystem


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "image": {"type": "path", "required": True},
            "partition": {"type": "raw", "required": True},
            "fstype": {"type": "str", "required": True, "choices": ["ext4", "ext3", "ext2", "vfat"]},
            "source": {"type": "path"},
            "label": {"type": "str"},
            "uuid": {"type": "str"},
            "mkfs_options": {"type": "list", "elements": "str", "default": []},
            "seed": {"type": "str", "default": "osimage.builder"},
            "force": {"type": "bool", "default": False},
            "allow_block_device": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    p = module.params
    with failing_cleanly(module):
        result = ensure_filesystem(
            p["image"], p["partition"], p["fstype"], source=p["source"], label=p["label"], uuid=p["uuid"],
            mkfs_options=p["mkfs_options"], seed=p["seed"], force=p["force"], allow_block_device=p["allow_block_device"],
            check_mode=module.check_mode)
    exit_with(module, result)


if __name__ == "__main__":
    main()
