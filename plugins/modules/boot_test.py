#!/usr/bin/python
# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: boot_test
short_description: Boot a disk image in QEMU and wait for a pattern on its serial console
version_added: 0.1.0
description:
  - Boots O(image) with C(qemu-system-x86_64), BIOS (SeaBIOS) or UEFI (OVMF) firmware, and watches the first
    serial port until O(expect) matches, the guest powers off, QEMU fails or O(timeout) runs out.
  - Never changes the image. It is attached with C(snapshot=on), so every guest write goes to a temporary overlay
    that is thrown away; UEFI runs get a private copy of the OVMF variable store.
  - QEMU runs with no display, no network and no reboot (a guest reset ends the run), and is stopped as soon as the
    pattern matches. A guest that prints the pattern and then powers off by itself has booted.
  - The output is matched with carriage returns and terminal escape sequences removed, so C(^) and C($) work on
    console lines as they appear on screen.
  - The boot loader and the OS must write to the first serial port, for example GRUB with
    C(serial --unit=0 --speed=115200) and C(terminal_output serial console), Linux with C(console=ttyS0,115200).
author:
  - osimage.builder developers (@osimage)
requirements:
  - qemu-system-x86_64 on the build host (Debian package C(qemu-system-x86), C(qemu-kvm) on RHEL and Fedora).
  - For O(firmware=uefi), OVMF as installed by Debian's C(ovmf) package (C(/usr/share/OVMF/OVMF_CODE_4M.fd) and
    C(OVMF_VARS_4M.fd); the C(.ms.fd) files for O(secure_boot=true)).
extends_documentation_fragment:
  - osimage.builder._attributes
attributes:
  check_mode:
    support: full
    details:
      - The module never changes anything, so it boots the image in check mode too. When O(image) does not exist
        yet in check mode (a playbook run in check mode on a fresh path), nothing is booted and RV(booted) is null.
      - O(log) is not written in check mode.
  diff_mode:
    support: none
  idempotent:
    support: full
    details:
      - It never reports a change.
options:
  image:
    description:
      - Path of the image to boot, on the build host. A regular file or a block device; it is only read.
    type: path
    required: true
  format:
    description:
      - Format of O(image), as QEMU names it (V(vpc) is VHD).
      - Detected from the image's magic bytes when left out (qcow2, VMDK sparse or descriptor, VDI, VHDX, VHD at
        the start or in the footer at the end), else V(raw).
    type: str
    choices: [raw, qcow2, vmdk, vdi, vpc, vhdx]
  firmware:
    description:
      - V(bios) boots with SeaBIOS, QEMU's default; V(uefi) with OVMF as two pflash drives (code read-only, a fresh
        copy of the variable store template for each run).
    type: str
    choices: [bios, uefi]
    default: bios
  secure_boot:
    description:
      - Boot with Secure Boot enforced, on the q35 machine with SMM, using C(OVMF_CODE_4M.ms.fd) and a copy of
        C(OVMF_VARS_4M.ms.fd), whose keys are Microsoft's (so a shim signed by Microsoft boots and an unsigned
        boot loader is refused with C(Access Denied)).
      - Needs O(firmware=uefi).
      - RV(secure_boot_enabled) reports what the guest kernel says about it.
    type: bool
    default: false
  expect:
    description:
      - Python regular expression searched for in the serial console output.
      - The default matches the login prompt of a getty on the serial console, as Debian's C(serial-getty@ttyS0)
        prints it (C(debian login) followed by a space), at the start of a line.
    type: str
    default: '(?m)^(?!Last login)[A-Za-z0-9][A-Za-z0-9._-]* login: '
  timeout:
    description:
      - Seconds to wait for O(expect), counted from QEMU's start.
      - With O(accel=auto), a KVM attempt that is given up adds at most O(kvm_probe_seconds) before the TCG boot,
        which gets the whole O(timeout).
    type: int
    default: 300
  accel:
    description:
      - V(kvm) uses hardware virtualization and fails when C(/dev/kvm) cannot be opened read-write or KVM cannot
        run the guest. V(tcg) is QEMU's emulator, slower but it works everywhere.
      - V(auto) tries KVM when C(/dev/kvm) opens read-write, and boots again under TCG when QEMU reports that KVM
        cannot run the guest (for example C(KVM internal error), seen with OVMF under nested virtualization), when
        QEMU exits before the guest printed anything, or when the serial console stays silent for
        O(kvm_probe_seconds) before the match, counted from QEMU's start or from the guest's last output.
        RV(accel) says which was used and RV(fallback_reason) why it is TCG.
    type: str
    choices: [auto, kvm, tcg]
    default: auto
  kvm_probe_seconds:
    description:
      - With O(accel=auto), how long the serial console may stay silent under KVM, from QEMU's start or since the
        guest's last output, before the boot is started again under TCG. V(0) turns this off (KVM errors still
        fall back).
      - Under nested KVM, real-mode code (SeaBIOS, BIOS GRUB and its disk reads) can run far slower than under
        TCG. Measured on one such host, BIOS GRUB printed after 18 s under KVM (0.4 s under TCG), then took
        minutes to load a Debian kernel that TCG booted to the login prompt in 30 s. The probe catches both.
      - Keep it above the longest silence of a healthy boot, such as a GRUB menu timeout when the menu is not
        on the serial console, or a healthy KVM host boots under TCG, slower.
    type: int
    default: 20
  memory:
    description:
      - Guest memory in MiB.
    type: int
    default: 1024
  extra_args:
    description:
      - More arguments for qemu-system-x86_64, appended to the command line (for example V(-smp), V(2)).
    type: list
    elements: str
  log:
    description:
      - Path on the build host where the full serial console output (as QEMU wrote it, escape sequences included)
        of the run that counts is kept, whether the boot succeeded or not.
    type: path
notes:
  - QEMU is always stopped before the module returns, on success, failure and timeout alike, and is killed with
    the module process if that dies.
seealso:
  - module: osimage.builder.disk_image
"""

EXAMPLES = r"""
---
- name: Boot the image and wait for the login prompt on the serial console
  osimage.builder.boot_test:
    image: /var/tmp/build/disk.qcow2

- name: Boot a UEFI image with Secure Boot, keep the console log
  osimage.builder.boot_test:
    image: /var/tmp/build/disk.raw
    firmware: uefi
    secure_boot: true
    log: /var/tmp/build/boot.log
  register: boot

- name: Check that the kernel saw Secure Boot on
  ansible.builtin.assert:
    that:
      - boot.secure_boot_enabled

- name: Wait for a marker printed by grub.cfg, emulated (no KVM), for at most a minute
  osimage.builder.boot_test:
    image: /var/tmp/build/smoke.raw
    expect: GRUB-CFG-OK
    accel: tcg
    timeout: 60
"""

RETURN = r"""
---
booted:
  description:
    - Whether O(expect) matched.
    - Null in check mode when O(image) does not exist yet; failures are reported as a failed task.
  returned: always
  type: bool
  sample: true
seconds:
  description: Seconds from QEMU's start until the match (or until the failure), in the run that counts.
  returned: always
  type: float
  sample: 7.42
total_seconds:
  description: Seconds the whole task spent booting, including a KVM attempt that O(accel=auto) gave up on.
  returned: when the image exists
  type: float
  sample: 59.64
log_tail:
  description: The last 40 lines (at most 4096 characters) of the serial console, without escape sequences.
  returned: always
  type: str
  sample: "Debian GNU/Linux 12 debian ttyS0\n\ndebian login: "
accel:
  description: The accelerator of the run that counts, V(kvm) or V(tcg).
  returned: always
  type: str
  sample: tcg
fallback_reason:
  description: Why O(accel=auto) used TCG.
  returned: when O(accel=auto) used TCG
  type: str
  sample: "KVM could not run the guest (KVM internal error. Suberror: 1) after 0.2 s"
format:
  description: The image format given or detected.
  returned: when the image exists
  type: str
  sample: qcow2
firmware:
  description: The firmware used.
  returned: when the image exists
  type: str
  sample: uefi
secure_boot_enabled:
  description:
    - V(true) when the guest printed C(Secure boot enabled) (as Linux does during boot), V(false) for
      C(Secure boot disabled), null when it printed neither (before the match).
  returned: when the image exists
  type: bool
  sample: true
log:
  description: Path of the kept serial log.
  returned: when O(log) is given, outside check mode
  type: str
  sample: /var/tmp/build/boot.log
cmd:
  description: The QEMU command line of the run that counts (its temporary paths are gone).
  returned: when the image exists
  type: list
  elements: str
  sample: [qemu-system-x86_64, -nodefaults, -accel, tcg, -m, "1024"]
skipped_reason:
  description: Why nothing was booted.
  returned: in check mode when O(image) does not exist
  type: str
  sample: /var/tmp/build/disk.raw does not exist (yet); in check mode it is not booted
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.osimage.builder.plugins.module_utils._adapter import failing_cleanly
from ansible_collections.osimage.builder.plugins.module_utils._boot_test import boot_test
from ansible_collections.osimage.builder.plugins.module_utils._qemu import ACCELS, DEFAULT_EXPECT, FIRMWARES, FORMATS


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "image": {"type": "path", "required": True},
            "format": {"type": "str", "choices": list(FORMATS)},
            "firmware": {"type": "str", "choices": list(FIRMWARES), "default": "bios"},
            "secure_boot": {"type": "bool", "default": False},
            "expect": {"type": "str", "default": DEFAULT_EXPECT},
            "timeout": {"type": "int", "default": 300},
            "accel": {"type": "str", "choices": list(ACCELS), "default": "auto"},
            "kvm_probe_seconds": {"type": "int", "default": 20},
            "memory": {"type": "int", "default": 1024},
            "extra_args": {"type": "list", "elements": "str"},
            "log": {"type": "path"},
        },
        supports_check_mode=True,
    )
    p = module.params
    with failing_cleanly(module):
        result = boot_test(p["image"], fmt=p["format"], firmware=p["firmware"], secure_boot=p["secure_boot"],
                           expect=p["expect"], timeout=p["timeout"], accel=p["accel"], memory=p["memory"],
                           extra_args=p["extra_args"], log=p["log"], kvm_probe_seconds=p["kvm_probe_seconds"],
                           check_mode=module.check_mode)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
