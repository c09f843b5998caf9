#!/usr/bin/python
# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: disk_image
short_description: Create, grow or remove a sparse raw disk image file
version_added: 0.1.0
description:
  - Creates a sparse raw image file of the given size, appearing under O(path) only when complete
    (temporary file and rename).
  - Grows an existing image in place (the new space stays sparse). Refuses to shrink unless O(force=true).
  - Needs no root, no loop device and no mount.
author:
  - osimage.builder developers (@osimage)
extends_documentation_fragment:
  - osimage.builder._attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows the state and size of the image before and after.
  idempotent:
    support: full
options:
  path:
    description:
      - Path of the image file on the build host.
    type: path
    required: true
  size:
    description:
      - Size of the image, in bytes (an integer) or with a unit, V(2GiB), V(512MiB), V(1500MB) or V(4096s) (sectors).
      - V(K), V(M), V(G), V(T) and V(KiB) ... V(TiB) are powers of 1024; V(KB), V(MB), V(GB), V(TB) are powers of 1000.
      - Must be a whole number of 512-byte sectors.
      - Required to create the image; when left out, an existing image keeps its size.
    type: raw
  state:
    description:
      - V(present) makes sure the image exists with O(size); V(absent) removes the image file.
    type: str
    choices: [present, absent]
    default: present
  force:
    description:
      - Allow shrinking the image, which cuts off whatever lies beyond the new size.
    type: bool
    default: false
  allow_block_device:
    description:
      - Accept a block device as O(path). Its size is never changed, and O(state=absent) refuses it.
    type: bool
    default: false
seealso:
  - module: osimage.builder.partition_table
"""

EXAMPLES = r"""
---
- name: Create a 2 GiB sparse image
  osimage.builder.disk_image:
    path: /var/tmp/build/disk.raw
    size: 2GiB

- name: Grow it to 4 GiB (the new space stays sparse)
  osimage.builder.disk_image:
    path: /var/tmp/build/disk.raw
    size: 4GiB

- name: Remove the image
  osimage.builder.disk_image:
    path: /var/tmp/build/disk.raw
    state: absent
"""

RETURN = r"""
---
path:
  description: Path of the image.
  returned: always
  type: str
  sample: /var/tmp/build/disk.raw
size:
  description: Size of the image in bytes (in check mode, the size it would have).
  returned: when O(state=present)
  type: int
  sample: 2147483648
allocated:
  description: Bytes actually allocated on the build host's filesystem (small for a sparse image).
  returned: when O(state=present)
  type: int
  sample: 0
action:
  description: What was done, or would be done in check mode.
  returned: changed
  type: str
  choices: [create, grow, shrink, remove]
  sample: create
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.osimage.builder.plugins.module_utils._adapter import exit_with, failing_cleanly
from ansible_collections.osimage.builder.plugins.module_utils._disk_image import ensure_disk_image


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "size": {"type": "raw"},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "force": {"type": "bool", "default": False},
            "allow_block_device": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    p = module.params
    with failing_cleanly(module):
        result = ensure_disk_image(p["path"], p["size"], p["state"], force=p["force"],
                                   allow_block_device=p["allow_block_device"], check_mode=module.check_mode)
    exit_with(module, result)


if __name__ == "__main__":
    main()
