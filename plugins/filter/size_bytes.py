# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
name: size_bytes
short_description: A size as the modules of this collection read it (V(2GiB), V(1500MB)), in bytes
version_added: 0.1.0
description:
  - Parses a size the way M(osimage.builder.disk_image) and M(osimage.builder.partition_table) do, so a playbook can
    check or compare sizes before it writes anything.
  - V(K), V(M), V(G), V(T) and V(KiB) ... V(TiB) are powers of 1024; V(KB), V(MB), V(GB), V(TB) are powers of 1000;
    V(s) counts 512-byte sectors.
author:
  - osimage.builder developers (@osimage)
options:
  _input:
    description: The size, a string with an optional unit or an integer number of bytes.
    type: raw
    required: true
  option:
    description: The name to report in the error when the input is not a size.
    type: str
    default: size
"""

EXAMPLES = r"""
---
- name: Refuse images smaller than 1 GiB
  ansible.builtin.assert:
    that: osimage_size | osimage.builder.size_bytes('osimage_size') >= 1073741824
"""

RETURN = r"""
---
_value:
  description: The size in bytes.
  type: int
"""

from ansible.errors import AnsibleFilterError

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._sizes import parse_size


def size_bytes(value: object, option: str = "size") -> int:
    try:
        return parse_size(value, option)
    except BuildError as exc:
        raise AnsibleFilterError(str(exc))


class FilterModule:
    def filters(self) -> dict:
        return {"size_bytes": size_bytes}
