# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment:
    # Standard attribute descriptions; modules state their support level.
    DOCUMENTATION = r"""
options: {}
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
  idempotent:
    description:
      - When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
      - This assumes that the system controlled/queried by the module has not changed in a relevant way.
"""

    # Options shared by the modules that write into an existing image file.
    IMAGE = r"""
options:
  image:
    description:
      - Path of the image file to write into, on the build host.
      - Must be a regular file unless O(allow_block_device=true).
    type: path
    required: true
  allow_block_device:
    description:
      - Allow O(image) to be a block device (or a symlink to one).
      - Off by default so that a typo can never overwrite a disk of the build host.
    type: bool
    default: false
"""

    # For the modules that can refuse to overwrite data they did not write.
    FORCE = r"""
options:
  force:
    description:
      - Replace what is on the image even when it could destroy data this module did not write.
    type: bool
    default: false
"""

    SEED = r"""
options:
  seed:
    description:
      - String from which identifiers that are not given explicitly (disk ids, GUIDs, UUIDs) are derived with UUIDv5.
      - The same seed gives the same identifiers, so builds are reproducible; give each image its own seed when
        two images must not share identifiers.
    type: str
    default: osimage.builder
"""
