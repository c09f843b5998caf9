# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The one place that knows bubblewrap's flags: sandbox options in, bwrap argv out.

Everything here is pure (no I/O): ``bwrap_argv`` turns a ``SandboxOptions``
into the argv; the helpers validate and normalize the user's input and tell
which earlier mount a sandbox path lies in. ``_bwrap_chroot`` does the I/O
(symlink resolution inside the tree, mount points, running, cleanup).

What the command gets, in mount order (later mounts stack on earlier ones):

* the tree bound read-write as ``/`` (bwrap's ``--bind`` is ``nosuid,nodev``, so
  device nodes inside the tree cannot be opened);
* its own procfs (``--unshare-pid --proc /proc``) with ``/proc/sys`` bound
  read-only over it, and ``/proc/sysrq-trigger`` too where the kernel has one.
  bwrap 0.8 means to cover both but skips them when it runs as root (its
  ``access(W_OK)`` probe fails with EACCES in its unprivileged helper), and
  then a ``sysctl -w kernel.*`` in a package script changes the build host;
* a private ``/dev`` (``--dev``: null, zero, full, random, urandom, tty, pts,
  ptmx, shm, fd, stdin/out/err), ``/sys`` read-only, tmpfs ``/run`` (0755) and
  ``/tmp`` (1777);
* with ``network``: the host's resolv.conf read-only at the tree's resolv.conf;
* a ``policy-rc.d`` that exits 101, read-only at ``/usr/sbin/policy-rc.d``;
* the user's ``binds`` (read-write), then ``ro_binds``.

Namespaces: pid, ipc, uts (hostname), cgroup (when the kernel has it), and net
unless ``network``; ``--die-with-parent`` and ``--new-session`` (no TIOCSTI
into the caller's terminal). Rootless, ``--unshare-user --uid 0 --gid 0`` maps
the caller to uid/gid 0 (and bwrap gives the command no capabilities).

The environment is deliberately not on the command line (``--setenv``): a
process's argv is readable by every user of the host in ``/proc/PID/cmdline``,
its environment only by its owner. ``sandbox_env`` gives the exact environment
to start bwrap with; bwrap passes it on unchanged.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
import typing as t
from collections.abc import Mapping

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_ENV = {
    "PATH": DEFAULT_PATH,
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}
DEFAULT_HOSTNAME = "osimage"
POLICY_RC_D = "/usr/sbin/policy-rc.d"
RESOLV_CONF = "/etc/resolv.conf"
# invoke-rc.d(8) and deb-systemd-invoke ask this script before acting on a service; 101 means "action forbidden".
POLICY_RC_D_SCRIPT = (
    "#!/bin/sh\n"
    "# osimage.builder bwrap_chroot: no service may be started, stopped or restarted while a command\n"
    "# runs in this tree (exit 101 = action forbidden, see invoke-rc.d(8)). Mounted only for the command.\n"
    "exit 101\n"
)
# Where the command's view must not be taken over by a bind (they hold the sandbox's own API filesystems).
_RESERVED_DESTS = ("/proc", "/sys")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@dataclasses.dataclass(frozen=True)
class Mount:
    """One mount of the sandbox: ``kind`` is a bwrap flag without dashes."""

    kind: str  # bind, ro-bind, ro-bind-try, proc, dev, tmpfs
    dest: str
    src: str | None = None
    origin: str = ""  # what asked for it, for messages: "root", "binds[0]", "policy-rc.d", ...
    perms: str | None = None  # octal mode of a tmpfs (bwrap's default is 0755)

    def args(self) -> list[str]:
        perms = ["--perms", self.perms] if self.perms else []
        if self.src is None:
            return perms + [f"--{self.kind}", self.dest]
        return perms + [f"--{self.kind}", self.src, self.dest]


@dataclasses.dataclass(frozen=True)
class SandboxOptions:
    """Everything ``bwrap_argv`` needs; host paths are absolute, sandbox paths normalized.

    ``binds`` and ``ro_binds`` are ``(src, dest)`` pairs from ``parse_binds``.
    ``policy_rc_d`` and ``resolv_conf`` are host files to bind read-only (None:
    no such mount; ``resolv_conf`` is used only with ``network``).
    ``dest_map`` replaces planned destinations by where they really land in the
    tree once its symlinks are followed (``/etc/resolv.conf`` ->
    ``/run/systemd/resolve/stub-resolv.conf``); ``_bwrap_chroot`` fills it in.
    """

    root: str
    command: tuple[str, ...]
    chdir: str = "/"
    network: bool = False
    binds: tuple[tuple[str, str], ...] = ()
    ro_binds: tuple[tuple[str, str], ...] = ()
    hostname: str = DEFAULT_HOSTNAME
    rootless: bool = False
    policy_rc_d: str | None = None
    resolv_conf: str | None = None
    status_fd: int | None = None
    dest_map: t.Mapping[str, str] = dataclasses.field(default_factory=dict)


def mounts(opts: SandboxOptions) -> list[Mount]:
    """The sandbox's mounts in the order bwrap makes them, ``dest_map`` applied."""
    planned = [
        Mount("bind", "/", opts.root, "root"),
        Mount("proc", "/proc", None, "proc"),
        Mount("ro-bind", "/proc/sys", "/proc/sys", "proc"),
        Mount("ro-bind-try", "/proc/sysrq-trigger", "/proc/sysrq-trigger", "proc"),
        Mount("dev", "/dev", None, "dev"),
        Mount("ro-bind", "/sys", "/sys", "sys"),
        Mount("tmpfs", "/run", None, "run"),
        Mount("tmpfs", "/tmp", None, "tmp", perms="1777"),
    ]
    if opts.network and opts.resolv_conf:
        planned.append(Mount("ro-bind", RESOLV_CONF, opts.resolv_conf, "resolv.conf"))
    if opts.policy_rc_d:
        planned.append(Mount("ro-bind", POLICY_RC_D, opts.policy_rc_d, "policy-rc.d"))
    planned += [Mount("bind", dest, src, f"binds[{i}]") for i, (src, dest) in enumerate(opts.binds)]
    planned += [Mount("ro-bind", dest, src, f"ro_binds[{i}]") for i, (src, dest) in enumerate(opts.ro_binds)]
    return [dataclasses.replace(m, dest=opts.dest_map.get(m.dest, m.dest)) if m.origin != "root" else m
            for m in planned]


def bwrap_argv(opts: SandboxOptions, bwrap: str = "bwrap") -> list[str]:
    """The bwrap command line that runs ``opts.command`` in the sandbox ``opts`` describes."""
    argv = [bwrap]
    if opts.rootless:
        argv += ["--unshare-user", "--uid", "0", "--gid", "0"]
    argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if not opts.network:
        argv.append("--unshare-net")
    argv += ["--hostname", opts.hostname, "--die-with-parent", "--new-session"]
    if opts.status_fd is not None:
        argv += ["--json-status-fd", str(opts.status_fd)]
    for mount in mounts(opts):
        argv += mount.args()
    argv += ["--chdir", opts.chdir, "--"]
    argv += list(opts.command)
    return argv


def sandbox_env(env: t.Mapping[str, t.Any] | None, option: str = "env") -> dict[str, str]:
    """The command's whole environment: ``BASE_ENV`` updated with ``env`` (scalars only)."""
    result = dict(BASE_ENV)
    for name, value in (env or {}).items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise BuildError(f"{name!r} is not a valid environment variable name", option=option)
        if isinstance(value, (dict, list, tuple, set)):
            raise BuildError(f"the value of {name} must be a string, not a {type(value).__name__}", option=option)
        text = "" if value is None else str(value)
        if "\0" in text:
            raise BuildError(f"the value of {name} contains a NUL byte", option=option)
        result[name] = text
    return result


def sandbox_path(path: str, option: str, base: str = "/") -> str:
    """``path`` as a normalized absolute path inside the sandbox (relative to ``base``).

    ``..`` cannot climb above ``/``, exactly as inside the sandbox.
    """
    if not isinstance(path, str) or not path or "\0" in path:
        raise BuildError(f"{path!r} is not a path", option=option)
    joined = posixpath.join(base, path)
    normalized = posixpath.normpath("/" + joined.lstrip("/"))
    return "/" + normalized.lstrip("/")


def bind_dest(path: str, option: str) -> str:
    """A bind destination: absolute, normalized, not ``/`` nor inside ``/proc`` or ``/sys``, not ``/dev`` itself."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise BuildError(f"{path!r} must be an absolute path inside the tree", option=option)
    dest = sandbox_path(path, option)
    if dest == "/":
        raise BuildError("cannot bind over the root of the tree", option=option)
    if dest == "/dev" or any(is_within(dest, reserved) for reserved in _RESERVED_DESTS):
        raise BuildError(f"{dest} holds the sandbox's own /proc, /sys or /dev and cannot be bound over", option=option)
    return dest


def parse_binds(binds: t.Sequence[t.Any] | None, option: str) -> tuple[tuple[str, str], ...]:
    """``[{src, dest}]`` (``dest`` defaults to ``src``) as ``(src, dest)`` pairs; no I/O."""
    pairs = []
    for i, item in enumerate(binds or ()):
        where = f"{option}[{i}]"
        if not isinstance(item, Mapping) or not item.get("src"):
            raise BuildError("must be a dictionary with src (a host path) and optionally dest (a path in the tree)",
                             option=where)
        src = item["src"]
        if not isinstance(src, str) or not src.startswith("/"):
            raise BuildError(f"{src!r} must be an absolute path on the build host", option=f"{where}.src")
        dest = item.get("dest") or src
        pairs.append((posixpath.normpath(src), bind_dest(dest, f"{where}.dest")))
    return tuple(pairs)


def is_within(path: str, prefix: str) -> bool:
    """Whether sandbox path ``path`` is ``prefix`` or lies below it (both normalized)."""
    return prefix == "/" or path == prefix or path.startswith(prefix.rstrip("/") + "/")


def containing_mount(path: str, earlier: t.Sequence[Mount]) -> Mount | None:
    """The innermost of ``earlier`` (the root excluded) that ``path`` is or lies in; None: the tree itself."""
    best: Mount | None = None
    for mount in earlier:
        if mount.dest == "/" or not is_within(path, mount.dest):
            continue
        if best is None or len(mount.dest) >= len(best.dest):
            best = mount
    return best


def valid_hostname(text: str | None) -> str | None:
    """``text`` when it is a usable hostname (RFC 1123, at most 64 characters), else None."""
    if not text or len(text) > 64:
        return None
    labels = text.split(".")
    if all(_HOST_LABEL.match(label) for label in labels):
        return text
    return None
