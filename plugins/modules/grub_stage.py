#!/usr/bin/python
# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: grub_stage
short_description: Put GRUB's modules, lists, font and environment block into a root tree
version_added: 0.1.0
description:
  - Copies the C(*.mod) and C(*.lst) files of O(grub_dir) into C(TREE/boot/grub/<platform>/), the font into
    C(TREE/boot/grub/fonts/), and creates a 1024-byte C(grubenv) when there is none, as C(grub-install) does,
    but into a directory tree instead of a mounted disk.
  - Removes C(*.mod) and C(*.lst) files of the platform directory that O(grub_dir) does not have, so the modules
    in the tree always come from the same GRUB build as the core.img that
    M(osimage.builder.grub_bios_install) builds from the same O(grub_dir).
  - Does not write C(grub.cfg); render it with M(ansible.builtin.template) (the C(bootloader) role does).
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
      - The diff lists the files that would be copied or removed.
  idempotent:
    support: full
options:
  tree:
    description:
      - The root directory tree of the image, on the build host.
    type: path
    required: true
  grub_dir:
    description:
      - GRUB's platform directory. Its last component (V(i386-pc), V(x86_64-efi)) names the directory created in the tree.
    type: path
    default: /usr/lib/grub/i386-pc
  boot_dir:
    description:
      - GRUB's directory inside the tree, relative to it. Fedora-family systems use V(boot/grub2).
    type: str
    default: boot/grub
  font:
    description:
      - Font file to copy into C(fonts/). An empty string stages no font.
    type: path
    default: /usr/share/grub/unicode.pf2
  grubenv:
    description:
      - Create C(grubenv) when the tree has none. An existing one is left as it is.
    type: bool
    default: true
seealso:
  - module: osimage.builder.grub_bios_install
"""

EXAMPLES = r"""
---
- name: Stage GRUB for BIOS boot into the tree
  osimage.builder.grub_stage:
    tree: /var/tmp/build/tree

- name: Stage the Fedora way
  osimage.builder.grub_stage:
    tree: /var/tmp/build/tree
    boot_dir: boot/grub2
"""

RETURN = r"""
---
path:
  description: GRUB's directory in the tree.
  returned: success
  type: str
  sample: /var/tmp/build/tree/boot/grub
copied:
  description: Files copied or created (relative to the tree); in check mode, those that would be.
  returned: success
  type: list
  elements: str
  sample: [boot/grub/i386-pc/normal.mod, boot/grub/grubenv]
removed:
  description: Stale module files removed from the tree.
  returned: success
  type: list
  elements: str
  sample: []
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.osimage.builder.plugins.module_utils._adapter import exit_with, failing_cleanly
from ansible_collections.osimage.builder.plugins.module_utils._grub_stage import stage_grub_files


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "tree": {"type": "path", "required": True},
            "grub_dir": {"type": "path", "default": "/usr/lib/grub/i386-pc"},
            "boot_dir": {"type": "str", "default": "boot/grub"},
            "font": {"type": "path", "default": "/usr/share/grub/unicode.pf2"},
            "grubenv": {"type": "bool", "default": True},
        },
        supports_check_mode=True,
    )
    p = module.params
    with failing_cleanly(module):
        result = stage_grub_files(p["tree"], grub_dir=p["grub_dir"], boot_dir=p["boot_dir"], font=p["font"] or None,
                                  grubenv=p["grubenv"], check_mode=module.check_mode)
    exit_with(module, result)


if __name__ == "__main__":
    main()
