#!/usr/bin/python
# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: image_convert
short_description: Convert a raw disk image to qcow2, vmdk, vdi, vpc (VHD), vhdx or raw with qemu-img
version_added: 0.1.0
description:
  - Converts the raw image O(src) with C(qemu-img convert) into O(dest) in the given O(format).
  - The output is written into a temporary directory beside O(dest) (named C(.<dest name>.osimage-convert-XXXXXXXX)),
    flushed to disk and then renamed over O(dest), so O(dest) is never a half-written image, even when the run is
    killed. A temporary directory left by an interrupted run is removed by the next run.
  - Idempotent through a record kept beside O(dest) (C(<dest>.osimage-state.json)) of what O(dest) was made from, the
    identity of O(src) (size, modification and change times, inode), the conversion settings and the qemu-img version,
    and of what O(dest) looked like right after it was written. A rerun with nothing changed compares file metadata only,
    runs no process and takes milliseconds. A changed O(src), changed settings, another qemu-img version, or a modified
    or deleted O(dest) make it convert again.
  - An existing O(dest) that this module did not write (it has no record) is only replaced with O(force=true).
  - Reproducible. qemu-img is never run with out-of-order writes (C(-W)), and the fields qemu-img fills with random
    numbers or the clock are rewritten (with their checksums) with values derived from O(seed) and a digest of the
    rest of the image, so the same O(src) gives the same bytes, and changed contents get new identifiers. These are the
    VMDK content id (CID), the VDI image and snapshot UUIDs, the VHD unique id and timestamp, and the VHDX file and
    data write GUIDs, header sequence numbers, log entry GUIDs and virtual disk id (Page83Data). The VHD timestamp is
    E(SOURCE_DATE_EPOCH) when it is set, else the modification time of O(src).
  - The raw output stays sparse (zero blocks of O(src) become holes).
  - Two runs converting to the same O(dest) at once take turns, through a lock on the file
    C(.<dest name>.osimage-convert.lock) beside O(dest); the second one then finds O(dest) up to date.
author:
  - osimage.builder developers (@osimage)
requirements:
  - qemu-img (Debian and Ubuntu package C(qemu-utils), Fedora and RHEL package C(qemu-img)).
  - QEMU 5.1 or later to write, and to read, zstd-compressed qcow2.
extends_documentation_fragment:
  - osimage.builder._attributes
  - osimage.builder._attributes.FORCE
  - osimage.builder._attributes.SEED
attributes:
  check_mode:
    support: full
    details:
      - Check mode converts nothing. When O(src) or the directory of O(dest) does not exist yet (an earlier task would
        create it), check mode reports that O(src) would be converted.
  diff_mode:
    support: full
    details:
      - The diff shows the format, virtual size, O(src) with a short digest of its identity, and the options before and
        after.
  idempotent:
    support: full
    details:
      - With a block device as O(src), every run reads the whole device to tell whether its contents changed.
options:
  src:
    description:
      - The raw image to convert, on the build host.
      - Must be a regular file unless O(allow_block_device=true).
    type: path
    required: true
  dest:
    description:
      - Path of the image to write. Its directory must exist. It is always written as a regular file.
    type: path
    required: true
  format:
    description:
      - Format of O(dest). V(vpc) is the VHD format of Virtual PC, Hyper-V and Azure.
    type: str
    choices: [raw, qcow2, vmdk, vdi, vpc, vhdx]
    required: true
  compress:
    description:
      - Compress the data of O(dest). Only V(qcow2), and V(vmdk) with the option C(subformat=streamOptimized) (which is
        always compressed), can be compressed; any other format fails naming this option.
      - A compressed qcow2 is smaller but slower to write (see O(compression_type)) and a little slower to read; clusters
        the guest writes later are stored uncompressed.
    type: bool
    default: false
  compression_type:
    description:
      - The compression of a compressed qcow2. V(zlib) can be read by every QEMU. V(zstd) is several times faster to
        write and a little smaller, but needs QEMU 5.1 or later to read the image (and to write it).
      - Only for O(format=qcow2) with O(compress=true).
    type: str
    choices: [zlib, zstd]
    default: zlib
  options:
    description:
      - Format options passed to C(qemu-img convert -o), as a dict of option names and values, or as a list of
        C(key=value) strings (V(['subformat=streamOptimized', 'force_size=on'])). Booleans become V(on) and V(off).
      - Useful ones are C(subformat) (vmdk V(monolithicSparse) or V(streamOptimized); vpc and vhdx V(dynamic) or
        V(fixed)), C(force_size) (vpc, keep the exact size instead of rounding to a CHS geometry, as Azure requires),
        C(cluster_size) and C(compat) (qcow2), C(adapter_type) and C(hwversion) (vmdk), C(preallocation).
        C(qemu-img create -f FORMAT -o help) lists them all.
      - Values may not contain commas. Options the module sets itself or that would make O(dest) more than one file are
        refused (C(compression_type), C(size), C(backing_file), C(backing_fmt), C(data_file), C(encrypt.*), and the
        vmdk subformats that write extent files).
    type: raw
  checksum:
    description:
      - Return the sha256 of O(dest). Off by default because it reads the whole image. It is computed once after each
        conversion and kept in the record, so an unchanged rerun returns it without reading O(dest) again.
    type: bool
    default: false
  force:
    description:
      - Convert even when O(dest) is up to date, and replace a file at O(dest) that this module did not write.
  allow_block_device:
    description:
      - Accept a block device (or a symlink to one) as O(src). O(dest) is always a regular file.
    type: bool
    default: false
seealso:
  - module: osimage.builder.disk_image
  - module: osimage.builder.boot_test
  - name: qemu-img manual
    description: The formats and their options.
    link: https://www.qemu.org/docs/master/tools/qemu-img.html
"""

EXAMPLES = r"""
---
- name: Convert the image to qcow2, compressed with zstd
  osimage.builder.image_convert:
    src: /var/tmp/build/disk.raw
    dest: /var/tmp/build/output/debian-12.qcow2
    format: qcow2
    compress: true
    compression_type: zstd
  register: qcow2

- name: Show the size of the result
  ansible.builtin.debug:
    msg: "{{ qcow2.dest }} holds {{ qcow2.virtual_size }} bytes in {{ qcow2.actual_size }}"

- name: A stream-optimized VMDK for VMware (OVA)
  osimage.builder.image_convert:
    src: /var/tmp/build/disk.raw
    dest: /var/tmp/build/output/debian-12.vmdk
    format: vmdk
    options:
      subformat: streamOptimized
      adapter_type: lsilogic

- name: A fixed VHD of the exact size, as Azure wants it, with its sha256
  osimage.builder.image_convert:
    src: /var/tmp/build/disk.raw
    dest: /var/tmp/build/output/debian-12.vhd
    format: vpc
    options: [subformat=fixed, force_size=on]
    checksum: true
  environment:
    SOURCE_DATE_EPOCH: "1700000000"
"""

RETURN = r"""
---
dest:
  description: Absolute path of the converted image.
  returned: success
  type: str
  sample: /var/tmp/build/output/debian-12.qcow2
src:
  description: Absolute path of the source image.
  returned: success
  type: str
  sample: /var/tmp/build/disk.raw
format:
  description: Format of O(dest).
  returned: success
  type: str
  sample: qcow2
virtual_size:
  description: Size of the disk the image holds, in bytes (for V(vpc) without C(force_size) rounded to a CHS geometry).
  returned: success, except in check mode when the image would be converted
  type: int
  sample: 2147483648
actual_size:
  description: Bytes O(dest) takes on the build host's filesystem.
  returned: success, except in check mode when the image would be converted
  type: int
  sample: 307494912
sha256:
  description: sha256 of O(dest), as C(sha256sum) prints it.
  returned: when O(checksum=true), except in check mode when the image would be converted
  type: str
  sample: 0f5d4e1c3b2a19088f7e6d5c4b3a29180f7e6d5c4b3a29180f7e6d5c4b3a2918
cmd:
  description: The C(qemu-img convert) command that was run (with O(dest) in place of the temporary file).
  returned: when the image was converted
  type: list
  elements: str
  sample: [/usr/bin/qemu-img, convert, -f, raw, -O, qcow2, -c, -o, compression_type=zstd, /var/tmp/build/disk.raw,
           /var/tmp/build/output/debian-12.qcow2]
msg:
  description: What was done, or would be done in check mode, and why.
  returned: success
  type: str
  sample: "converted to qcow2: src changed"
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.osimage.builder.plugins.module_utils._adapter import exit_with, failing_cleanly
from ansible_collections.osimage.builder.plugins.module_utils._image_convert import convert_image


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "src": {"type": "path", "required": True},
            "dest": {"type": "path", "required": True},
            "format": {"type": "str", "required": True, "choices": ["raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx"]},
            "compress": {"type": "bool", "default": False},
            "compression_type": {"type": "str", "choices": ["zlib", "zstd"], "default": "zlib"},
            "options": {"type": "raw"},
            "checksum": {"type": "bool", "default": False},
            "seed": {"type": "str", "default": "osimage.builder"},
            "force": {"type": "bool", "default": False},
            "allow_block_device": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    p = module.params
    with failing_cleanly(module):
        result = convert_image(
            p["src"], p["dest"], p["format"], compress=p["compress"], compression_type=p["compression_type"],
            options=p["options"], force=p["force"], allow_block_device=p["allow_block_device"], checksum=p["checksum"],
            seed=p["seed"], check_mode=module.check_mode)
    for warning in result.pop("warnings", []):
        module.warn(warning)
    exit_with(module, result)


if __name__ == "__main__":
    main()
