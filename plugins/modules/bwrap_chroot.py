#!/usr/bin/python
# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: bwrap_chroot
short_description: Run a command inside a root tree, sandboxed with bubblewrap
version_added: 0.1.0
description:
  - Runs one command with the directory tree O(root) as C(/), like C(chroot), but in a bubblewrap (C(bwrap)) sandbox,
    and otherwise behaves like M(ansible.builtin.command) (O(argv) or O(cmd), O(creates), O(removes), O(chdir),
    O(stdin), fails on a non-zero return code, returns RV(rc), RV(stdout), RV(stderr), RV(cmd) and RV(delta)).
  - The command sees the tree read-write as C(/); its own C(/proc) (a new pid namespace, so no host process is
    visible; C(/proc/sys) read-only); a private C(/dev) with only C(null), C(zero), C(full), C(random), C(urandom),
    C(tty), C(pts), C(ptmx) and C(shm); C(/sys) read-only; empty tmpfs C(/run) and C(/tmp) (mode 1777); new ipc,
    uts and cgroup namespaces, the hostname from the tree's C(/etc/hostname) (or V(osimage)); no network at all,
    not even the host's loopback, unless O(network=true).
  - Nothing else of the build host is visible (no host C(/usr), C(/etc), C(/home) or C(/root)) except O(binds) and
    O(ro_binds). The tree is bound C(nosuid) and C(nodev), so device nodes inside it cannot be opened.
  - While the command runs, C(/usr/sbin/policy-rc.d) is a script that exits 101, so C(invoke-rc.d) and
    C(deb-systemd-invoke) refuse to start, stop or restart services during a package installation. It is bound
    read-only from a host temporary directory; a policy-rc.d of the tree is hidden for the command and left
    untouched. C(/sbin/start-stop-daemon) is not replaced (debootstrap and mmdebstrap divert it only while
    bootstrapping); a daemon started anyway dies with the sandbox, whose pid namespace ends with the command.
  - Nothing is left in the tree. bwrap can only mount onto an existing path, so a missing mount point (for example
    C(/usr/sbin/policy-rc.d), or C(/etc/resolv.conf) with O(network=true)) is created just before the run and
    removed after it, and the times of its directory are put back. If the module itself is killed with SIGKILL
    during the run, such a file may stay; it holds a comment saying so, is not executable (so it does not act as a
    policy-rc.d), and the next run removes it. The mounts themselves never outlive the sandbox.
  - The tree's C(/etc/machine-id) is never bound over or written by the sandbox.
  - The environment is not inherited. The command gets C(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin),
    C(HOME=/root), C(LANG=C.UTF-8), C(DEBIAN_FRONTEND=noninteractive) and O(env); no C(TERM). The environment is
    passed to bwrap through its own environment, never on its command line, which every host user can read.
  - As root, bwrap is used without a user namespace and the command has root's capabilities inside its namespaces,
    as in a chroot (package maintainer scripts need C(chown), C(mknod), C(setuid) and the like). This keeps honest
    package scripts from touching the host; it is no barrier against hostile code running as root.
  - As an ordinary user, the caller is mapped to uid and gid 0 in a user namespace (C(--unshare-user --uid 0 --gid 0)),
    and the command has no capabilities. It can change only what the calling user could change; files of the tree
    owned by other host users appear owned by C(nobody). Only that one uid and gid exist, so C(chown) or C(chgrp) to
    any other id fails (dpkg cannot install packages with files owned by system users, and apt must be told
    C(APT::Sandbox::User=root)); C(mknod), C(chroot), C(mount) and changing to another user fail too. Needs
    unprivileged user namespaces (kernel sysctls C(kernel.unprivileged_userns_clone), C(user.max_user_namespaces),
    and on Ubuntu C(kernel.apparmor_restrict_unprivileged_userns)); when the kernel refuses, the task fails and says so.
author:
  - osimage.builder developers (@osimage)
extends_documentation_fragment:
  - osimage.builder._attributes
attributes:
  check_mode:
    support: full
    details:
      - Runs nothing. Reports a change unless O(creates) or O(removes) say the command would be skipped.
  diff_mode:
    support: none
  idempotent:
    support: partial
    details:
      - The command runs (and reports a change) every time, unless O(creates) or O(removes) say otherwise.
options:
  root:
    description:
      - The root directory tree, on the build host. It becomes C(/) for the command.
      - The build host's own C(/) is refused.
    type: path
    required: true
  argv:
    description:
      - The command as a list of arguments, run without a shell. The first one is looked up in the sandbox's C(PATH).
      - Exactly one of O(argv) and O(cmd) is required.
    type: list
    elements: str
  cmd:
    description:
      - The command as a string, run by C(/bin/sh -c) inside the tree (so the tree needs a C(/bin/sh)).
      - Exactly one of O(argv) and O(cmd) is required.
    type: str
  chdir:
    description:
      - Working directory of the command, inside the tree.
    type: str
    default: /
  env:
    description:
      - Variables added to (or replacing) the sandbox's minimal environment.
      - Values must be scalars; they are passed as strings.
    type: dict
    default: {}
  network:
    description:
      - V(false) gives the command a network namespace of its own with only an unconnected loopback, so it reaches
        nothing, not even services listening on the host's C(127.0.0.1).
      - V(true) shares the build host's network (for downloads) and binds the host's C(/etc/resolv.conf) read-only
        over the tree's resolv.conf (following the tree's symlink, so a resolv.conf that points into C(/run) works).
        As root, the command could then also change the host's network configuration.
    type: bool
    default: false
  binds:
    description:
      - Host paths bound read-write into the tree, in this order, after the sandbox's own mounts.
      - A destination that does not exist in the tree is created for the run and removed after it.
      - A destination may not be C(/), C(/dev), nor lie in C(/proc), C(/sys) or another bind.
    type: list
    elements: dict
    default: []
    suboptions:
      src:
        description:
          - Absolute path on the build host. It must exist.
        type: path
        required: true
      dest:
        description:
          - Absolute path inside the tree; the default is the same path as O(binds[].src).
        type: str
  ro_binds:
    description:
      - Like O(binds), but read-only; bound after O(binds).
    type: list
    elements: dict
    default: []
    suboptions:
      src:
        description:
          - Absolute path on the build host. It must exist.
        type: path
        required: true
      dest:
        description:
          - Absolute path inside the tree; the default is the same path as O(ro_binds[].src).
        type: str
  creates:
    description:
      - A path inside the tree (relative paths are relative to O(chdir)). When it already exists, the command is not run.
      - May be a glob pattern.
    type: str
  removes:
    description:
      - A path inside the tree (relative paths are relative to O(chdir)). When it does not exist, the command is not run.
      - May be a glob pattern.
    type: str
  stdin:
    description:
      - Text fed to the command on its standard input. Without it the command reads C(/dev/null).
    type: str
  stdin_add_newline:
    description:
      - Append a newline to O(stdin).
    type: bool
    default: true
  timeout:
    description:
      - Seconds the command may run. Then the sandbox and every process in it are killed (SIGKILL) and the task fails.
      - Without it the command may run forever.
    type: int
notes:
  - Needs C(bwrap) from the C(bubblewrap) package on the build host, and nothing inside the tree but the command
    itself (and C(/bin/sh) for O(cmd)).
  - Trailing newlines of RV(stdout) and RV(stderr) are removed, as M(ansible.builtin.command) does by default.
  - A file at a mount point cannot be replaced while the command runs, so a package that ships
    C(/usr/sbin/policy-rc.d) cannot be installed through this module.
seealso:
  - module: ansible.builtin.command
  - name: bubblewrap
    description: The sandboxing tool this module drives.
    link: https://github.com/containers/bubblewrap
"""

EXAMPLES = r"""
---
- name: Install a kernel into the tree, without starting any service
  osimage.builder.bwrap_chroot:
    root: /var/tmp/build/tree
    argv: [apt-get, install, --yes, --no-install-recommends, linux-image-amd64]
    network: true
    timeout: 1800

- name: Set the root password hash
  osimage.builder.bwrap_chroot:
    root: /var/tmp/build/tree
    argv: [chpasswd, --encrypted]
    stdin: "root:{{ root_password_hash }}"

- name: Build the initramfs once
  osimage.builder.bwrap_chroot:
    root: /var/tmp/build/tree
    cmd: update-initramfs -c -k all
    creates: /boot/initrd.img-*

- name: Use the host's package cache and a read-only copy of local packages
  osimage.builder.bwrap_chroot:
    root: /var/tmp/build/tree
    cmd: apt-get install --yes /srv/debs/*.deb
    binds:
      - src: /var/cache/osimage/apt
        dest: /var/cache/apt/archives
    ro_binds:
      - src: /srv/local-debs
        dest: /srv/debs
"""

RETURN = r"""
---
cmd:
  description: The command as given, O(argv) as a list or O(cmd) as a string (not the bwrap command line).
  returned: always
  type: raw
  sample: [apt-get, install, --yes, linux-image-amd64]
rc:
  description: Exit status of the command (128 plus the signal number when a signal ended it). 0 when it was skipped.
  returned: always
  type: int
  sample: 0
stdout:
  description: Standard output of the command, trailing newlines removed.
  returned: always
  type: str
  sample: "Setting up linux-image-amd64 (6.1.0) ..."
stderr:
  description: Standard error of the command, trailing newlines removed.
  returned: always
  type: str
  sample: ""
stdout_lines:
  description: RV(stdout) split into lines.
  returned: always
  type: list
  elements: str
  sample: ["Setting up linux-image-amd64 (6.1.0) ..."]
stderr_lines:
  description: RV(stderr) split into lines.
  returned: always
  type: list
  elements: str
  sample: []
msg:
  description: Why the command did not run (skipped, or check mode), or what went wrong; empty after a successful run.
  returned: always
  type: str
  sample: "skipped, since /boot/initrd.img-* exists"
start:
  description: When the command started, local time.
  returned: when the command ran
  type: str
  sample: "2024-05-01 12:00:00.000001"
end:
  description: When the command ended, local time.
  returned: when the command ran
  type: str
  sample: "2024-05-01 12:00:42.000002"
delta:
  description: How long the command ran.
  returned: when the command ran
  type: str
  sample: "0:00:42.000001"
bwrap_argv:
  description: The bwrap command line that ran the command, for debugging. The environment is not on it.
  returned: when the command ran
  type: list
  elements: str
  sample: [/usr/bin/bwrap, --unshare-pid, --unshare-ipc, --unshare-uts, --unshare-cgroup-try, --unshare-net, --hostname,
           osimage, --die-with-parent, --new-session, --bind, /var/tmp/build/tree, /, --proc, /proc, --chdir, /, --,
           /bin/sh, -c, "update-initramfs -c -k all"]
rootless:
  description: Whether the command ran (or would run) in a user namespace because the module did not run as root.
  returned: when the command ran or would have run
  type: bool
  sample: false
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.osimage.builder.plugins.module_utils._adapter import failing_cleanly
from ansible_collections.osimage.builder.plugins.module_utils._bwrap_chroot import run_in_tree


def _binds_spec() -> dict:
    return {"type": "list", "elements": "dict", "default": [],
            "options": {"src": {"type": "path", "required": True}, "dest": {"type": "str"}}}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "root": {"type": "path", "required": True},
            "argv": {"type": "list", "elements": "str"},
            "cmd": {"type": "str"},
            "chdir": {"type": "str", "default": "/"},
            "env": {"type": "dict", "default": {}},
            "network": {"type": "bool", "default": False},
            "binds": _binds_spec(),
            "ro_binds": _binds_spec(),
            "creates": {"type": "str"},
            "removes": {"type": "str"},
            "stdin": {"type": "str"},
            "stdin_add_newline": {"type": "bool", "default": True},
            "timeout": {"type": "int"},
        },
        mutually_exclusive=[("argv", "cmd")],
        required_one_of=[("argv", "cmd")],
        supports_check_mode=True,
    )
    p = module.params
    with failing_cleanly(module):
        result = run_in_tree(p["root"], argv=p["argv"], cmd=p["cmd"], chdir=p["chdir"], env=p["env"],
                             network=p["network"], binds=p["binds"], ro_binds=p["ro_binds"], creates=p["creates"],
                             removes=p["removes"], stdin=p["stdin"], stdin_add_newline=p["stdin_add_newline"],
                             timeout=p["timeout"], check_mode=module.check_mode)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
