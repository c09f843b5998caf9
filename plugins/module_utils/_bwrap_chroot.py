# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Run one command inside a root tree with bubblewrap, like ``ansible.builtin.command``.

``run_in_tree`` validates, honours ``creates``/``removes`` and check mode,
prepares the mount points, runs bwrap (argv from ``_sandbox.bwrap_argv``) and
removes what it had to put into the tree.

Mount points. bwrap can only mount onto a path that exists, and creates a
missing one itself in the (writable) tree, where it would stay. So every
destination is first resolved the way the sandbox will see it (the tree's
symlinks followed inside the tree, ``..`` stopping at its root, nothing followed
below an earlier mount such as the tmpfs ``/run``); a destination that lies in
the tree and is missing is created here, recorded, and removed after the run:
directories when still empty, files when they still hold exactly
``MOUNT_POINT_MARKER``. Destinations inside ``/run``, ``/tmp`` or ``/dev`` land in
the sandbox's own tmpfs and leave nothing. A resolv.conf that is a dangling
symlink into ``/run`` (systemd-resolved's stub) therefore costs nothing.

policy-rc.d. The script lives in a private host temp dir and is bound
read-only at ``/usr/sbin/policy-rc.d``; an existing policy-rc.d of the tree is
hidden for the command and never written to. When the tree has none, the mount
point is a marker file (mode 0644, not executable) created just before the run
and removed just after. Residual risk: when this process is SIGKILLed (or the
host dies) during the run, the marker file (and any directory created for it)
stays (as does the private temp dir on the host, about 1 KB). It is harmless,
because invoke-rc.d and deb-systemd-invoke only consult an *executable*
policy-rc.d, and the next run recognizes the marker and removes it. Mount points of other files (resolv.conf, file binds) are marker files too.
The mounts themselves live in the sandbox's mount namespace and vanish with
its last process, whatever kills it.

``/sbin/start-stop-daemon`` is not replaced (debootstrap and mmdebstrap do
that only while bootstrapping): a daemon started anyway cannot outlive the
command, since the sandbox has its own pid namespace that dies with it.

Killing. bwrap gets PR_SET_PDEATHSIG from us and passes death on with
``--die-with-parent``, so a killed module takes the sandbox along. The one gap
is bwrap's: its init sets PDEATHSIG a moment after its clone without checking
that its parent still lives, so a module killed in that moment leaves the
command running to its end. A timeout or SIGTERM kills bwrap's whole process
group (its init included) and cleans the tree.

Processes are not run with ``_commands.run_tool``: the command needs stdin, a
timeout that kills the whole sandbox (bwrap runs in its own process group and
the command in bwrap's pid namespace), and an extra fd for bwrap's JSON status,
which tells a sandbox that could not be set up from a command that failed.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import json
import os
import posixpath
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import typing as t

from ansible_collections.osimage.builder.plugins.module_utils import _sandbox
from ansible_collections.osimage.builder.plugins.module_utils._commands import find_tool
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError

MOUNT_POINT_MARKER = (b"# Mount point of an osimage.builder bwrap_chroot run. It is removed after the run and\n"
                      b"# left here only if that run was killed: safe to delete.\n")
MAX_SYMLINKS = 40
KILL_WAIT_SECONDS = 10.0
HOST_RESOLV_CONF = "/etc/resolv.conf"
_USERNS_HINTS = ("namespace", "uid map", "uid_map", "setting up", "operation not permitted", "no permissions")


def resolve_in_tree(root: str, path: str, stops: t.Sequence[str] = ()) -> str:
    """``path`` with the tree's symlinks followed as inside the tree (chroot semantics).

    Returns a normalized sandbox path. Below any of ``stops`` (sandbox paths of
    earlier mounts, whose contents the tree does not provide) nothing is
    followed. Missing components are kept as they are.
    """
    pending = [part for part in path.split("/") if part]
    resolved = "/"
    followed = 0
    while pending:
        name = pending.pop(0)
        if name == ".":
            continue
        if name == "..":
            resolved = posixpath.dirname(resolved)
            continue
        candidate = posixpath.join(resolved, name)
        if any(_sandbox.is_within(candidate, stop) for stop in stops if stop != "/"):
            resolved = candidate
            continue
        host = os.path.join(root, candidate.lstrip("/"))
        if os.path.islink(host):
            followed += 1
            if followed > MAX_SYMLINKS:
                raise BuildError(f"too many levels of symbolic links in the tree resolving {path}", option="root")
            target = os.readlink(host)
            if target.startswith("/"):
                resolved = "/"
            pending = [part for part in target.split("/") if part] + pending
            continue
        resolved = candidate
    return resolved


def _host_path(root: str, sandbox_path: str) -> str:
    return os.path.join(root, sandbox_path.lstrip("/")) if sandbox_path != "/" else root


def _exists_in_tree(root: str, path: str) -> bool:
    """Whether ``path`` (normalized sandbox path or glob) exists in the tree, like command's creates/removes."""
    if glob.has_magic(path):
        return bool(glob.glob(_host_path(root, path)))
    parent = resolve_in_tree(root, posixpath.dirname(path))
    return os.path.lexists(_host_path(root, posixpath.join(parent, posixpath.basename(path))))


def _read_hostname(root: str) -> str:
    """The tree's /etc/hostname when it holds a valid name, else ``osimage``."""
    path = _host_path(root, resolve_in_tree(root, "/etc/hostname"))
    try:
        with open(path, "rb") as f:
            first = f.read(256).decode("ascii", errors="replace").splitlines()
    except OSError:
        return _sandbox.DEFAULT_HOSTNAME
    return _sandbox.valid_hostname(first[0].strip() if first else None) or _sandbox.DEFAULT_HOSTNAME


class _MountPoints:
    """Mount points this run created in the tree (or found left by a killed run), removed by ``remove``."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.created: list[tuple[str, bool]] = []  # (host path, is_dir), in creation order
        self.stamps: dict[str, tuple[int, int]] = {}  # existing parent -> (atime_ns, mtime_ns) before we added to it
        self.sealed: dict[str, int] = {}  # existing parent -> mtime_ns once all mount points were made

    def ensure(self, mount: _sandbox.Mount, is_dir: bool) -> None:
        parts = [part for part in mount.dest.split("/") if part]
        current = "/"
        for i, name in enumerate(parts):
            current = posixpath.join(current, name)
            host = _host_path(self.root, current)
            last = i == len(parts) - 1
            if os.path.lexists(host):
                if last and not is_dir and _is_marker(host):
                    self.created.append((host, False))  # left by a killed run: this run removes it
                continue
            parent = os.path.dirname(host)
            if parent not in self.stamps and parent not in [path for path, made_dir in self.created if made_dir]:
                st = os.stat(parent)
                self.stamps[parent] = (st.st_atime_ns, st.st_mtime_ns)
            try:
                if last and not is_dir:
                    fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                    try:
                        os.write(fd, MOUNT_POINT_MARKER)
                    finally:
                        os.close(fd)
                else:
                    os.mkdir(host, 0o755)
            except OSError as exc:
                raise BuildError(f"cannot create the mount point {mount.dest} for {mount.origin} in the tree: "
                                 f"{exc.strerror}", option="root")
            self.created.append((host, not last or is_dir))

    def seal(self) -> None:
        """Note the parents' mtimes after the last ``ensure``: a later change is the command's."""
        for parent in self.stamps:
            try:
                self.sealed[parent] = os.stat(parent).st_mtime_ns
            except OSError:
                pass

    def remove(self) -> list[str]:
        """Remove what ``ensure`` created, newest first, and give the parents back their times; return what stayed.

        The times matter: the filesystem module takes the default timestamp of an
        image from the newest mtime in the tree.
        """
        untouched = set()
        for parent, mtime in self.sealed.items():
            try:
                if os.stat(parent).st_mtime_ns == mtime:
                    untouched.add(parent)
            except OSError:
                pass
        kept = []
        for host, is_dir in reversed(self.created):
            try:
                if is_dir:
                    os.rmdir(host)
                elif _is_marker(host):
                    os.unlink(host)
                else:
                    kept.append(host)
            except FileNotFoundError:
                pass
            except OSError:
                kept.append(host)
        for parent, times in self.stamps.items():
            if parent in untouched and not any(os.path.dirname(path) == parent for path in kept):
                try:
                    os.utime(parent, ns=times)
                except OSError:
                    pass
        self.created = []
        self.stamps = {}
        self.sealed = {}
        return kept


def _is_marker(host: str) -> bool:
    try:
        st = os.lstat(host)
        if not stat.S_ISREG(st.st_mode) or st.st_size != len(MOUNT_POINT_MARKER):
            return False
        with open(host, "rb") as f:
            return f.read() == MOUNT_POINT_MARKER
    except OSError:
        return False


def _plan(opts: _sandbox.SandboxOptions, root: str) -> tuple[dict[str, str], list[tuple[_sandbox.Mount, bool]]]:
    """Resolve every destination in the tree; return the dest map and the mounts that need a mount point in it."""
    dest_map: dict[str, str] = {}
    earlier: list[_sandbox.Mount] = []
    in_tree: list[tuple[_sandbox.Mount, bool]] = []
    for mount in _sandbox.mounts(opts):
        if mount.origin == "root":
            earlier.append(mount)
            continue
        dest = resolve_in_tree(root, mount.dest, [m.dest for m in earlier])
        if dest != mount.dest:
            dest_map[mount.dest] = dest
        resolved = dataclasses.replace(mount, dest=dest)
        outer = _sandbox.containing_mount(dest, earlier)
        user_bind = mount.origin.startswith(("binds", "ro_binds"))
        if outer is not None and outer.origin.startswith(("binds", "ro_binds")):
            raise BuildError(f"{dest} lies inside {outer.origin} ({outer.dest}); nested binds are not supported",
                             option=f"{mount.origin}.dest")
        if user_bind and (dest in ("/", "/dev") or _sandbox.is_within(dest, "/proc") or _sandbox.is_within(dest, "/sys")):
            raise BuildError(f"resolves to {dest} in the tree, which cannot be bound over", option=f"{mount.origin}.dest")
        if outer is None and mount.kind != "ro-bind-try":
            src_is_dir = mount.src is None or os.path.isdir(mount.src)
            host = _host_path(root, dest)
            if os.path.lexists(host) and not os.path.islink(host) and os.path.isdir(host) != src_is_dir:
                what = "a directory" if src_is_dir else "a file"
                raise BuildError(f"{dest} exists in the tree but is not {what} like its source {mount.src}",
                                 option=f"{mount.origin}.dest" if user_bind else "root")
            in_tree.append((resolved, src_is_dir))
        earlier.append(resolved)
    return dest_map, in_tree


def _check_chdir(root: str, chdir: str, mounts: t.Sequence[_sandbox.Mount]) -> None:
    if _sandbox.containing_mount(chdir, mounts) is not None:
        return  # inside /tmp, /run or a bind: the tree cannot tell
    if not os.path.isdir(_host_path(root, resolve_in_tree(root, chdir))):
        raise BuildError(f"{chdir} is not a directory in the tree", option="chdir")


class _TermAsExit:
    """Turn SIGTERM into SystemExit while the sandbox runs, so ``finally`` kills it and cleans the tree."""

    def __init__(self) -> None:
        self.previous: t.Any = None
        self.installed = False

    def __enter__(self) -> _TermAsExit:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._raise)
            self.installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous)

    @staticmethod
    def _raise(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)


def _die_with_us() -> None:
    """In bwrap, before exec: the kernel SIGKILLs it when this process dies, even by SIGKILL.

    bwrap's own ``--die-with-parent`` then takes the sandbox down with it, so no
    sandbox outlives a killed module.
    """
    try:
        import ctypes  # pylint: disable=import-outside-toplevel

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # pylint: disable=broad-except
        pass


def _kill_sandbox(proc: subprocess.Popen) -> None:
    """SIGKILL bwrap's process group; its pid-1 child dies with it (--die-with-parent) and takes the pid namespace along."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.kill()


def _run(argv: list[str], env: dict[str, str], stdin: bytes | None, timeout: float | None,
         status_fd: int) -> tuple[int, bytes, bytes, bool]:
    """Run bwrap; return (returncode, stdout, stderr, timed_out)."""
    # Not run_tool: stdin, a timeout that kills the process group, and bwrap's status fd (see the module docstring).
    proc = subprocess.Popen(  # pylint: disable=consider-using-with,ansible-bad-function
        argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env, cwd="/", pass_fds=(status_fd,), start_new_session=True, close_fds=True,
        preexec_fn=_die_with_us)
    timed_out = False
    try:
        try:
            out, err = proc.communicate(input=stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_sandbox(proc)
            try:
                out, err = proc.communicate(timeout=KILL_WAIT_SECONDS)
            except subprocess.TimeoutExpired:  # something still holds the pipes: give up on the rest of the output
                out, err = b"", b""
                for pipe in (proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()
                proc.wait()
    finally:
        _kill_sandbox(proc)
        if proc.returncode is None:
            proc.wait()
    return proc.returncode, out or b"", err or b"", timed_out


def _exit_code(status_path: str) -> int | None:
    """The command's exit code from bwrap's JSON status, None when it never ran (sandbox setup failed)."""
    try:
        with open(status_path, "rb") as f:
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "exit-code" in entry:
            return int(entry["exit-code"])
    return None


def _setup_failure(stderr: str, rootless: bool, command_option: str) -> BuildError:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    said = lines[-1] if lines else "no message"
    if "execvp" in said:
        return BuildError(f"the command could not be started in the tree: {said.replace('bwrap: ', '')}",
                          option=command_option)
    message = f"bwrap could not set up the sandbox: {said}"
    if rootless and any(hint in said.lower() for hint in _USERNS_HINTS):
        message += ("; as an ordinary user bwrap_chroot needs unprivileged user namespaces, which this build host "
                    "refuses (see the sysctls kernel.unprivileged_userns_clone, user.max_user_namespaces and "
                    "kernel.apparmor_restrict_unprivileged_userns), or run it as root")
    return BuildError(message)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").rstrip("\r\n")


def run_in_tree(
    root: str,
    argv: t.Sequence[str] | None = None,
    cmd: str | None = None,
    chdir: str = "/",
    env: t.Mapping[str, t.Any] | None = None,
    network: bool = False,
    binds: t.Sequence[t.Any] | None = None,
    ro_binds: t.Sequence[t.Any] | None = None,
    creates: str | None = None,
    removes: str | None = None,
    stdin: str | None = None,
    stdin_add_newline: bool = True,
    timeout: float | None = None,
    check_mode: bool = False,
) -> dict[str, t.Any]:
    """Run ``argv`` (or ``/bin/sh -c cmd``) with the tree ``root`` as ``/``; the module's result."""
    if (argv is None) == (cmd is None):
        raise BuildError("give exactly one of argv and cmd", option="argv")
    if argv is not None:
        if not argv or not all(isinstance(arg, str) for arg in argv) or not argv[0]:
            raise BuildError("must be a non-empty list of strings", option="argv")
        command, shown, command_option = tuple(argv), list(argv), "argv"
    else:
        if not isinstance(cmd, str) or not cmd.strip():
            raise BuildError("must be a non-empty string", option="cmd")
        command, shown, command_option = ("/bin/sh", "-c", cmd), cmd, "cmd"
    if not isinstance(root, str) or not os.path.isdir(root):
        raise BuildError(f"{root!r} is not a directory", option="root")
    tree = os.path.realpath(root)
    if tree == "/":
        raise BuildError("the build host's / cannot be the tree", option="root")
    workdir = _sandbox.sandbox_path(chdir or "/", "chdir")
    command_env = _sandbox.sandbox_env(env)
    bind_pairs = _sandbox.parse_binds(binds, "binds")
    ro_pairs = _sandbox.parse_binds(ro_binds, "ro_binds")
    for option, pairs in (("binds", bind_pairs), ("ro_binds", ro_pairs)):
        for i, (src, _dest) in enumerate(pairs):
            if not os.path.exists(src):
                raise BuildError(f"{src} does not exist on the build host", option=f"{option}[{i}].src")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise BuildError(f"{timeout!r} is not a positive number of seconds", option="timeout")

    result: dict[str, t.Any] = {"changed": False, "cmd": shown, "rc": 0, "stdout": "", "stderr": "",
                                "stdout_lines": [], "stderr_lines": [], "msg": ""}
    if creates and _exists_in_tree(tree, _sandbox.sandbox_path(creates, "creates", workdir)):
        result["msg"] = f"skipped, since {creates} exists"
        return result
    if removes and not _exists_in_tree(tree, _sandbox.sandbox_path(removes, "removes", workdir)):
        result["msg"] = f"skipped, since {removes} does not exist"
        return result

    try:
        bwrap = find_tool(("bwrap",), option="", package="bubblewrap")
    except BuildError as exc:
        raise BuildError(exc.message) from None
    rootless = os.geteuid() != 0
    result["rootless"] = rootless
    if check_mode:
        result.update(changed=True, msg="check mode: the command was not run")
        return result

    host_resolv = HOST_RESOLV_CONF if network and os.path.exists(HOST_RESOLV_CONF) else None
    stdin_bytes = None
    if stdin is not None:
        stdin_bytes = (stdin + ("\n" if stdin_add_newline else "")).encode("utf-8", errors="surrogateescape")
    private = tempfile.mkdtemp(prefix="osimage-bwrap-")
    points = _MountPoints(tree)
    try:
        policy = os.path.join(private, "policy-rc.d")
        with open(policy, "w", encoding="ascii") as f:
            f.write(_sandbox.POLICY_RC_D_SCRIPT)
        os.chmod(policy, 0o755)
        status_path = os.path.join(private, "status.json")
        status_fd = os.open(status_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            opts = _sandbox.SandboxOptions(
                root=tree, command=command, chdir=workdir, network=network, binds=bind_pairs, ro_binds=ro_pairs,
                hostname=_read_hostname(tree), rootless=rootless, policy_rc_d=policy, resolv_conf=host_resolv,
                status_fd=status_fd)
            dest_map, in_tree = _plan(opts, tree)
            opts = dataclasses.replace(opts, dest_map=dest_map)
            _check_chdir(tree, workdir, _sandbox.mounts(opts)[1:])
            full_argv = _sandbox.bwrap_argv(opts, bwrap)
            result["bwrap_argv"] = full_argv
            with _TermAsExit():
                for mount, is_dir in in_tree:
                    points.ensure(mount, is_dir)
                points.seal()
                start = datetime.datetime.now()
                rc, out, err, timed_out = _run(full_argv, command_env, stdin_bytes, timeout, status_fd)
                end = datetime.datetime.now()
        finally:
            os.close(status_fd)
        exit_code = _exit_code(status_path)
    finally:
        kept = points.remove()
        shutil.rmtree(private, ignore_errors=True)

    result.update(changed=True, rc=rc, stdout=_text(out), stderr=_text(err), start=str(start), end=str(end),
                  delta=str(end - start))
    result["stdout_lines"] = result["stdout"].splitlines()
    result["stderr_lines"] = result["stderr"].splitlines()
    if kept:
        result["warnings"] = [f"left in the tree: {', '.join(kept)}, created as mount points for the command, "
                              "which then wrote into them"]
    if timed_out:
        details = {k: v for k, v in result.items() if k != "msg"}
        raise BuildError(f"timed out after {timeout:g} seconds; the sandbox and every process in it were killed",
                         option="timeout", **details)
    if exit_code is None:
        error = _setup_failure(result["stderr"], rootless, command_option)
        error.details.update({k: v for k, v in result.items() if k != "msg"})
        raise error
    if rc != 0:
        raise BuildError("non-zero return code", **{k: v for k, v in result.items() if k != "msg"})
    return result
