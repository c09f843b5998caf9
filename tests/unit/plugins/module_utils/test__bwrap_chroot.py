# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Real runs of bwrap_chroot in a busybox tree: what the command sees, escape attempts, cleanup, rootless.

Needs bwrap (bubblewrap) and a static busybox (busybox-static). The escape,
canary and unprivileged tests need root (they create host canaries and switch
to ``nobody`` with setpriv).
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from ansible_collections.osimage.builder.plugins.module_utils import _bwrap_chroot
from ansible_collections.osimage.builder.plugins.module_utils._bwrap_chroot import MOUNT_POINT_MARKER, run_in_tree
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.tests.unit.plugins.module_utils import mini_tree

AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not AS_ROOT, reason="creates host canaries or switches users: run as root")
COLLECTIONS_ROOT = os.path.abspath(_bwrap_chroot.__file__).rsplit(os.sep, 6)[0]
HOST_PYTHON = "/usr/bin/python3"
EXPECTED_DEV = {"core", "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty",
                "urandom", "zero"}
NOBODY_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from ansible_collections.osimage.builder.plugins.module_utils._bwrap_chroot import run_in_tree
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
kwargs = json.load(sys.stdin)
try:
    print(json.dumps({"ok": True, "result": run_in_tree(**kwargs)}))
except BuildError as exc:
    print(json.dumps({"ok": False, "msg": str(exc), "option": exc.option, "details": exc.details}, default=str))
"""


@pytest.fixture(autouse=True, scope="module")
def _tools():
    if not shutil.which("bwrap", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
        pytest.fail("bwrap is not installed: run scripts/install-system-packages (package bubblewrap)")
    if mini_tree.static_busybox() is None:
        pytest.fail("a static busybox is not installed: apt-get install --no-install-recommends busybox-static")


@pytest.fixture
def tree(tmp_path):
    return mini_tree.make_tree(str(tmp_path / "tree"))


def run(tree_path, cmd, **kwargs):
    return run_in_tree(tree_path, cmd=cmd, **kwargs)


def fails(tree_path, **kwargs) -> BuildError:
    with pytest.raises(BuildError) as info:
        run_in_tree(tree_path, **kwargs)
    return info.value


def host_pids_with(marker: str) -> list[int]:
    """Pids of host processes whose command line contains ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


class Listener:
    """A TCP server on the host's 127.0.0.1 that answers ``pong`` and counts connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _addr = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            with conn:
                conn.sendall(b"pong\n")

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


# --- basics like ansible.builtin.command -----------------------------------------------------------------------


def test_argv_runs_and_returns_like_command(tree):
    result = run_in_tree(tree, argv=["echo", "hello", "world"])
    assert result["changed"] is True and result["rc"] == 0
    assert result["stdout"] == "hello world" and result["stdout_lines"] == ["hello world"]
    assert result["stderr"] == "" and result["stderr_lines"] == []
    assert result["cmd"] == ["echo", "hello", "world"]
    assert result["msg"] == "" and result["rootless"] is (not AS_ROOT)
    assert result["bwrap_argv"][-4:] == ["--", "echo", "hello", "world"]
    assert set(result) >= {"start", "end", "delta"} and result["delta"].startswith("0:00:")


def test_cmd_runs_through_bin_sh(tree):
    result = run(tree, "echo one; echo two >&2; echo three")
    assert result["cmd"] == "echo one; echo two >&2; echo three"
    assert result["stdout_lines"] == ["one", "three"] and result["stderr"] == "two"
    assert result["bwrap_argv"][-3:] == ["/bin/sh", "-c", "echo one; echo two >&2; echo three"]


def test_non_zero_rc_fails_with_rc_stdout_stderr(tree):
    error = fails(tree, cmd="echo out; echo err >&2; exit 3")
    assert error.message == "non-zero return code" and error.option is None
    assert error.details["rc"] == 3 and error.details["stdout"] == "out" and error.details["stderr"] == "err"
    assert error.details["changed"] is True and error.details["cmd"] == "echo out; echo err >&2; exit 3"


def test_killed_by_a_signal_is_128_plus_signal(tree):
    error = fails(tree, cmd="kill -9 $$")
    assert error.details["rc"] == 137


def test_missing_command_is_a_clear_error(tree):
    error = fails(tree, argv=["/bin/no-such-program"])
    assert error.option == "argv"
    assert "could not be started in the tree" in error.message and "no-such-program" in error.message


def test_cmd_without_bin_sh_in_the_tree(tmp_path):
    bare = tmp_path / "empty"
    bare.mkdir()
    error = fails(str(bare), cmd="true")
    assert error.option == "cmd" and "/bin/sh" in error.message


@pytest.mark.parametrize("kwargs, option", [
    ({"argv": ["true"], "cmd": "true"}, "argv"),
    ({}, "argv"),
    ({"argv": []}, "argv"),
    ({"cmd": "  "}, "cmd"),
    ({"cmd": "true", "timeout": 0}, "timeout"),
    ({"cmd": "true", "timeout": -1}, "timeout"),
    ({"cmd": "true", "chdir": "/no/such/dir"}, "chdir"),
    ({"cmd": "true", "chdir": "/etc/hostname"}, "chdir"),
    ({"cmd": "true", "env": {"A B": "x"}}, "env"),
    ({"cmd": "true", "binds": [{"src": "/no/such/source/dir"}]}, "binds[0].src"),
    ({"cmd": "true", "ro_binds": [{"src": "/etc", "dest": "/proc/self"}]}, "ro_binds[0].dest"),
])
def test_bad_options_name_the_option(tree, kwargs, option):
    assert fails(tree, **kwargs).option == option


def test_root_must_be_a_directory_and_not_the_host_root(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    for root in (str(afile), str(tmp_path / "missing"), "/", "/tmp/.."):
        error = fails(root, cmd="true")
        assert error.option == "root", root


def test_bwrap_missing_names_the_package(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    error = fails(tree, cmd="true")
    assert "bwrap" in error.message and "bubblewrap" in error.message


def test_chdir(tree):
    assert run(tree, "pwd", chdir="/etc")["stdout"] == "/etc"
    assert run(tree, "pwd", chdir="etc/")["stdout"] == "/etc"
    assert run(tree, "pwd", chdir="/etc/../../../usr/sbin")["stdout"] == "/usr/sbin"
    assert run(tree, "pwd", chdir="/tmp")["stdout"] == "/tmp"  # a mount of the sandbox: not checked in the tree


def test_env_is_clean_and_minimal(tree, monkeypatch):
    monkeypatch.setenv("OSIMAGE_HOST_ONLY_CANARY", "leak")
    monkeypatch.setenv("TERM", "xterm")
    lines = run(tree, "env")["stdout_lines"]
    env = dict(line.split("=", 1) for line in lines)
    env.pop("PWD", None), env.pop("SHLVL", None)  # set by the shell itself
    assert env == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                   "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}


def test_env_adds_and_overrides_and_stays_off_the_command_line(tree):
    secret = "s3cret-" + secrets.token_hex(8)
    result = run(tree, 'echo "$TOKEN $LANG $N"', env={"TOKEN": secret, "LANG": "C", "N": 5})
    assert result["stdout"] == f"{secret} C 5"
    assert not any(secret in arg for arg in result["bwrap_argv"])


def test_stdin(tree):
    assert run(tree, "cat", stdin="hello")["stdout"] == "hello"
    assert run(tree, "wc -c", stdin="abc")["stdout"].strip() == "4"
    assert run(tree, "wc -c", stdin="abc", stdin_add_newline=False)["stdout"].strip() == "3"
    assert run(tree, "wc -c")["stdout"].strip() == "0"  # no stdin: /dev/null


def test_creates_and_removes(tree):
    touch = "touch /var-made"
    assert run(tree, touch, creates="/var-made")["changed"] is True
    skipped = run(tree, touch, creates="/var-made")
    assert skipped == {"changed": False, "cmd": touch, "rc": 0, "stdout": "", "stderr": "", "stdout_lines": [],
                       "stderr_lines": [], "msg": "skipped, since /var-made exists"}
    assert run(tree, touch, creates="/var-m*")["changed"] is False  # a glob
    assert run(tree, "true", creates="hostname", chdir="/etc")["changed"] is False  # relative to chdir
    assert run(tree, "true", creates="/../../etc/hostname")["changed"] is False  # cannot climb out of the tree
    gone = run(tree, "rm /var-made", removes="/var-made")
    assert gone["changed"] is True and not os.path.exists(os.path.join(tree, "var-made"))
    again = run(tree, "rm /var-made", removes="/var-made")
    assert again["changed"] is False and again["msg"] == "skipped, since /var-made does not exist"


def test_creates_follows_the_trees_symlinks_not_the_hosts(tree):
    os.symlink("/opt/real", os.path.join(tree, "link"))  # absolute: must resolve inside the tree
    os.makedirs(os.path.join(tree, "opt", "real"))
    open(os.path.join(tree, "opt", "real", "flag"), "w").close()
    assert run(tree, "true", creates="/link/flag")["changed"] is False
    os.symlink("/etc", os.path.join(tree, "hostetc"))
    assert run(tree, "true", creates="/hostetc/os-release")["changed"] is True  # the tree has no /etc/os-release


def test_check_mode_runs_nothing(tree):
    result = run(tree, "touch /made-in-check-mode", check_mode=True)
    assert result["changed"] is True and "not run" in result["msg"] and result["rc"] == 0
    assert "bwrap_argv" not in result
    assert not os.path.lexists(os.path.join(tree, "made-in-check-mode"))
    skipped = run(tree, "touch /x", creates="/etc/hostname", check_mode=True)
    assert skipped["changed"] is False and skipped["msg"] == "skipped, since /etc/hostname exists"
    would = run(tree, "rm /etc/hostname", removes="/etc/hostname", check_mode=True)
    assert would["changed"] is True and os.path.exists(os.path.join(tree, "etc", "hostname"))


def test_timeout_kills_the_whole_sandbox(tree):
    mark = str(900000 + secrets.randbelow(99999))
    started = time.monotonic()
    error = fails(tree, cmd=f"sleep 7{mark} & (sleep 8{mark} &) ; sleep 9{mark}", timeout=1)
    elapsed = time.monotonic() - started
    assert error.option == "timeout" and "timed out after 1 seconds" in error.message
    assert error.details["changed"] is True and "stdout" in error.details
    assert elapsed < 15
    deadline = time.monotonic() + 5
    while host_pids_with(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert host_pids_with(mark) == []
    assert not os.path.lexists(os.path.join(tree, "usr", "sbin", "policy-rc.d"))


def test_timeout_keeps_output_so_far(tree):
    error = fails(tree, cmd="echo before; sleep 30", timeout=1)
    assert error.details["stdout"] == "before"


# --- what the command sees ------------------------------------------------------------------------------------------


def test_the_tree_is_root_read_write(tree):
    result = run(tree, "ls /; cat /etc/hostname; echo made > /root/file; id -u")
    assert result["stdout_lines"][-2:] == ["minitree", "0"]
    assert {"bin", "etc", "usr", "proc", "dev", "sys", "run", "tmp", "root"} <= set(result["stdout_lines"])
    with open(os.path.join(tree, "root", "file"), encoding="ascii") as f:
        assert f.read() == "made\n"


def test_own_proc_in_a_new_pid_namespace(tree):
    lines = run(tree, "echo $$; ls /proc | grep -c '^[0-9]'; cat /proc/1/cmdline | tr '\\0' ' '")["stdout_lines"]
    assert int(lines[0]) <= 3  # bwrap's init is pid 1 and the shell comes next
    assert int(lines[1]) <= 6  # only the sandbox's own processes
    assert "bwrap" in lines[2]


def test_proc_sys_is_read_only_and_the_host_keeps_its_hostname(tree):
    before = socket.gethostname()
    result = run(tree, "echo evil > /proc/sys/kernel/hostname; echo rc=$?; echo 1 > /proc/sys/vm/drop_caches; echo rc=$?")
    assert result["stdout_lines"] == ["rc=1", "rc=1"] and "Read-only file system" in result["stderr"]
    assert socket.gethostname() == before


def test_private_dev_with_the_usual_nodes(tree):
    result = run(tree, "ls /dev; echo x > /dev/null; head -c 4 /dev/zero | wc -c; head -c 4 /dev/urandom | wc -c;"
                       " ls /dev/pts; test -e /dev/vda || test -e /dev/sda || echo no-disks")
    lines = result["stdout_lines"]
    assert EXPECTED_DEV <= set(lines) and not [name for name in lines if name.startswith(("sd", "vd", "nvme", "loop"))]
    assert lines.count("4") == 2 and lines[-1] == "no-disks"


def test_sys_is_read_only(tree):
    result = run(tree, "ls /sys/kernel >/dev/null && echo readable; touch /sys/x; echo rc=$?;"
                       " echo 1 > /sys/kernel/uevent_helper; echo rc=$?")
    assert result["stdout_lines"] == ["readable", "rc=1", "rc=1"]


def test_tmpfs_run_and_tmp_hide_the_tree_and_leave_nothing(tree):
    open(os.path.join(tree, "tmp", "tree-file"), "w").close()
    before = mini_tree.listing(tree)
    result = run(tree, "ls -A /tmp /run; stat -c %a /tmp /run; echo x > /tmp/new; mkdir -p /run/lock/x")
    assert result["stdout_lines"] == ["/run:", "", "/tmp:", "1777", "755"]
    assert mini_tree.listing(tree) == before


def test_namespaces_hostname_from_the_tree(tree, tmp_path):
    assert run(tree, "hostname")["stdout"] == "minitree"
    if AS_ROOT:  # the uts namespace is the sandbox's own
        host = socket.gethostname()
        assert run(tree, "hostname changed-inside; hostname")["stdout"] == "changed-inside"
        assert socket.gethostname() == host
    nohost = mini_tree.make_tree(str(tmp_path / "nohost"), hostname=None)
    assert run(nohost, "hostname")["stdout"] == "osimage"
    bad = mini_tree.make_tree(str(tmp_path / "bad"), hostname="not a hostname!")
    assert run(bad, "hostname")["stdout"] == "osimage"


def test_ipc_and_cgroup_namespaces_differ_from_the_hosts(tree):
    inside = run(tree, "for ns in ipc uts pid net; do readlink /proc/self/ns/$ns; done")["stdout_lines"]
    outside = [os.readlink(f"/proc/self/ns/{ns}") for ns in ("ipc", "uts", "pid", "net")]
    assert all(a != b for a, b in zip(inside, outside))


def test_machine_id_is_untouched(tree):
    path = os.path.join(tree, "etc", "machine-id")
    before = os.stat(path)
    result = run(tree, "cat /etc/machine-id; grep -c machine-id /proc/self/mountinfo || true")
    assert result["stdout_lines"] == [mini_tree.MACHINE_ID.strip(), "0"]
    after = os.stat(path)
    with open(path, encoding="ascii") as f:
        assert f.read() == mini_tree.MACHINE_ID
    assert (before.st_mtime_ns, before.st_ino, before.st_mode) == (after.st_mtime_ns, after.st_ino, after.st_mode)


def test_nothing_of_the_host_is_visible(tree):
    result = run(tree, "for p in /usr/bin/python3 /home /etc/os-release /root/.bashrc /work /lib; do"
                       " test -e $p && echo visible $p; done; cut -d' ' -f5 /proc/self/mountinfo")
    assert not [line for line in result["stdout_lines"] if line.startswith("visible")]
    points = set(result["stdout_lines"])
    allowed = {"/", "/proc", "/proc/sys", "/proc/irq", "/proc/bus", "/proc/sysrq-trigger", "/dev", "/sys", "/run",
               "/tmp", "/usr/sbin/policy-rc.d"}
    assert {p for p in points if not p.startswith(("/dev/", "/sys/"))} <= allowed


def test_device_nodes_in_the_tree_cannot_be_opened(tree):
    """The tree and the tmpfs are nodev: a node made for a host disk gives no access to it."""
    if not AS_ROOT:
        pytest.skip("mknod needs root")
    st = os.stat(tree)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    if major == 0:
        pytest.skip("the tree is not on a block device")
    result = run(tree, f"mknod /disk b {major} {minor} && mknod /tmp/disk b {major} {minor} && mknod /dev/disk b {major} {minor};"
                       " for d in /disk /tmp/disk /dev/disk; do head -c 512 $d > /dev/null && echo read $d; done; rm /disk")
    assert "read" not in result["stdout"]
    assert result["stderr"].count("Permission denied") == 3


# --- network ------------------------------------------------------------------------------------------------------


def test_no_network_not_even_the_hosts_loopback(tree, listener):
    result = run(tree, f"echo ping | nc -w 2 127.0.0.1 {listener.port}; echo rc=$?; ls /sys/class/net")
    assert "pong" not in result["stdout"] and "rc=1" in result["stdout_lines"]
    assert listener.connections == 0


def test_network_true_reaches_the_host_and_sees_its_resolv_conf(tree, listener):
    result = run(tree, f"echo ping | nc -w 2 127.0.0.1 {listener.port}; cat /etc/resolv.conf; echo x >> /etc/resolv.conf; true",
                 network=True)
    assert result["stdout_lines"][0] == "pong" and listener.connections == 1
    if os.path.exists("/etc/resolv.conf"):
        with open("/etc/resolv.conf", encoding="utf-8") as f:
            assert result["stdout_lines"][1:] == f.read().rstrip("\n").splitlines()
        assert "Read-only file system" in result["stderr"]


def test_network_leaves_the_trees_resolv_conf_alone(tree):
    before = mini_tree.listing(tree)
    run(tree, "cat /etc/resolv.conf", network=True)  # the tree has none: a mount point is made and removed
    assert mini_tree.listing(tree) == before
    path = os.path.join(tree, "etc", "resolv.conf")
    with open(path, "w", encoding="ascii") as f:
        f.write("nameserver 192.0.2.1\n")
    before = mini_tree.listing(tree)
    inside = run(tree, "cat /etc/resolv.conf", network=True)["stdout"]
    assert "192.0.2.1" not in inside or not os.path.exists("/etc/resolv.conf")
    assert run(tree, "cat /etc/resolv.conf")["stdout"] == "nameserver 192.0.2.1"  # network false: the tree's own
    assert mini_tree.listing(tree) == before


def test_network_with_a_dangling_resolv_conf_symlink_into_run(tree):
    os.symlink("../run/systemd/resolve/stub-resolv.conf", os.path.join(tree, "etc", "resolv.conf"))
    before = mini_tree.listing(tree)
    result = run(tree, "cat /etc/resolv.conf", network=True)
    if os.path.exists("/etc/resolv.conf"):
        with open("/etc/resolv.conf", encoding="utf-8") as f:
            assert result["stdout"] == f.read().rstrip("\n")
    assert "--ro-bind" in result["bwrap_argv"] and "/run/systemd/resolve/stub-resolv.conf" in result["bwrap_argv"]
    assert mini_tree.listing(tree) == before


def test_network_with_a_dangling_absolute_symlink_elsewhere(tree):
    os.symlink("/var/lib/resolv/resolv.conf", os.path.join(tree, "etc", "resolv.conf"))
    before = mini_tree.listing(tree)
    run(tree, "cat /etc/resolv.conf", network=True)
    assert mini_tree.listing(tree) == before
    assert not os.path.exists("/var/lib/resolv/resolv.conf")  # resolved in the tree, not on the host


# --- policy-rc.d -------------------------------------------------------------------------------------------------------

INVOKE_RC_D = """#!/bin/sh
# the part of invoke-rc.d(8) that matters here
if [ -x /usr/sbin/policy-rc.d ]; then
    /usr/sbin/policy-rc.d "$1" "$2"
    if [ $? = 101 ]; then echo "invoke-rc.d: policy-rc.d denied execution of $2."; exit 0; fi
fi
echo started > /started-$1
"""


def _install_invoke_rc_d(tree_path):
    path = os.path.join(tree_path, "usr", "sbin", "invoke-rc.d")
    with open(path, "w", encoding="ascii") as f:
        f.write(INVOKE_RC_D)
    os.chmod(path, 0o755)


def test_policy_rc_d_refuses_service_starts_and_is_gone_afterwards(tree):
    _install_invoke_rc_d(tree)
    before = mini_tree.listing(tree)
    result = run(tree, "/usr/sbin/policy-rc.d ssh start; echo $?; test -x /usr/sbin/policy-rc.d && echo executable;"
                       " invoke-rc.d ssh start; echo > /usr/sbin/policy-rc.d || echo read-only")
    assert result["stdout_lines"] == ["101", "executable", "invoke-rc.d: policy-rc.d denied execution of start.",
                                      "read-only"]
    assert not os.path.lexists(os.path.join(tree, "started-ssh"))
    assert not os.path.lexists(os.path.join(tree, "usr", "sbin", "policy-rc.d"))
    assert mini_tree.listing(tree) == before


def test_an_existing_policy_rc_d_is_hidden_and_kept(tree):
    path = os.path.join(tree, "usr", "sbin", "policy-rc.d")
    with open(path, "w", encoding="ascii") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(path, 0o750)
    before = mini_tree.listing(tree)
    assert run(tree, "/usr/sbin/policy-rc.d x start; echo $?")["stdout"] == "101"
    assert mini_tree.listing(tree) == before


def test_a_marker_left_by_a_killed_run_is_removed(tree):
    path = os.path.join(tree, "usr", "sbin", "policy-rc.d")
    with open(path, "wb") as f:
        f.write(MOUNT_POINT_MARKER)
    assert run(tree, "/usr/sbin/policy-rc.d x start; echo $?")["stdout"] == "101"
    assert not os.path.lexists(path)


def _module_in_a_child(tree_path, cmd):
    """Run run_in_tree in a child Python; return the Popen once the sandbox is up."""
    script = (f"import sys; sys.path.insert(0, {COLLECTIONS_ROOT!r});"
              "from ansible_collections.osimage.builder.plugins.module_utils._bwrap_chroot import run_in_tree;"
              f"run_in_tree({tree_path!r}, cmd={cmd!r})")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return child


def _private_dir_of(pids):
    """The module's private temp dir, from the policy-rc.d bind on a running bwrap's command line."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode().split("\0")
        except OSError:
            continue
        for arg in args:
            if arg.endswith("/policy-rc.d") and arg != "/usr/sbin/policy-rc.d":
                return os.path.dirname(arg)
    return None


def _wait_for(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sigkill_of_the_module_kills_the_sandbox_and_leaves_only_a_harmless_marker(tree):
    """The documented residual risk: a SIGKILLed module cannot remove its mount point; the next run does."""
    mark = str(800000 + secrets.randbelow(99999))
    child = _module_in_a_child(tree, f"sleep 6{mark}")
    try:
        # the child Python, bwrap, bwrap's init in the sandbox and the command itself: the sandbox is up
        # (killed earlier, within bwrap's own window between its clone and its prctl, the sandbox would survive)
        assert _wait_for(lambda: len(host_pids_with(f"6{mark}")) >= 4)
        private = _private_dir_of(host_pids_with(f"6{mark}"))
        child.kill()
        child.wait()
        assert _wait_for(lambda: not host_pids_with(f"6{mark}")), "the sandbox outlived the killed module"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert private and os.path.isdir(private)  # the killed module's temp dir stays too (policy-rc.d, status)
    shutil.rmtree(private)
    path = os.path.join(tree, "usr", "sbin", "policy-rc.d")
    with open(path, "rb") as f:
        assert f.read() == MOUNT_POINT_MARKER
    assert not os.access(path, os.X_OK) or not os.stat(path).st_mode & 0o111  # not a policy for invoke-rc.d
    run(tree, "true")
    assert not os.path.lexists(path)


def test_sigterm_of_the_module_cleans_up(tree):
    mark = str(700000 + secrets.randbelow(99999))
    before = mini_tree.listing(tree)
    child = _module_in_a_child(tree, f"sleep 5{mark}")
    try:
        assert _wait_for(lambda: len(host_pids_with(f"5{mark}")) >= 4)
        child.terminate()
        child.wait(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert _wait_for(lambda: not host_pids_with(f"5{mark}"))
    assert mini_tree.listing(tree) == before


# --- nothing left behind --------------------------------------------------------------------------------------------


def test_nothing_left_behind_in_a_complete_tree(tree):
    before = mini_tree.listing(tree)
    run(tree, "true")
    run(tree, "true", network=True, binds=[{"src": "/etc/hostname" if os.path.exists("/etc/hostname") else "/etc/passwd",
                                            "dest": "/mnt/host-file"}],
        ro_binds=[{"src": tempfile.gettempdir(), "dest": "/srv/a/b/c"}])
    assert mini_tree.listing(tree) == before
    assert mini_tree.mounts_under(tree) == []


def test_nothing_left_behind_in_a_bare_tree(tmp_path):
    bare = mini_tree.make_tree(str(tmp_path / "bare"), api_dirs=False, etc=False)
    before = mini_tree.listing(bare)
    result = run(bare, "ls /; ls /usr/sbin /etc", network=True)
    assert {"proc", "dev", "sys", "run", "tmp", "usr", "etc"} <= set(result["stdout_lines"])
    assert mini_tree.listing(bare) == before  # mtimes included: the parents got their times back
    assert mini_tree.mounts_under(bare) == []


def test_a_directory_the_command_filled_is_kept(tmp_path):
    bare = mini_tree.make_tree(str(tmp_path / "bare"), api_dirs=False)
    result = run(bare, "echo tool > /usr/sbin/tool")
    assert os.path.isfile(os.path.join(bare, "usr", "sbin", "tool"))
    assert not os.path.lexists(os.path.join(bare, "usr", "sbin", "policy-rc.d"))
    assert result["warnings"] and "usr/sbin" in result["warnings"][0]


def test_a_command_touching_the_parent_keeps_its_new_mtime(tree):
    sbin = os.path.join(tree, "usr", "sbin")
    before = os.stat(sbin).st_mtime_ns
    time.sleep(0.01)
    run(tree, "touch /usr/sbin/new && rm /usr/sbin/new")
    assert os.stat(sbin).st_mtime_ns != before


# --- binds ---------------------------------------------------------------------------------------------------------------


def test_binds_read_write_and_read_only(tree, tmp_path):
    rw = tmp_path / "rw"
    ro = tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "in").write_text("data\n")
    before = mini_tree.listing(tree)
    result = run(tree, "cat /mnt/ro/in; echo out > /mnt/rw/out; echo x > /mnt/ro/x || echo ro-refused",
                 binds=[{"src": str(rw), "dest": "/mnt/rw"}], ro_binds=[{"src": str(ro), "dest": "/mnt/ro"}])
    assert result["stdout_lines"] == ["data", "ro-refused"]
    assert (rw / "out").read_text() == "out\n" and not (ro / "x").exists()
    assert mini_tree.listing(tree) == before


def test_bind_dest_follows_the_trees_symlinks(tree, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f\n")
    os.makedirs(os.path.join(tree, "opt"))
    name = "osimage-test-" + secrets.token_hex(4)
    os.symlink(f"/opt/{name}", os.path.join(tree, "link"))  # absolute, dangling: must land in the tree's /opt
    before = mini_tree.listing(tree)
    assert run(tree, "cat /link/f", binds=[{"src": str(src), "dest": "/link"}])["stdout"] == "f"
    assert not os.path.lexists(f"/opt/{name}")
    assert mini_tree.listing(tree) == before


def test_nested_binds_are_refused(tree, tmp_path):
    error = fails(tree, cmd="true", binds=[{"src": str(tmp_path), "dest": "/mnt"}],
                  ro_binds=[{"src": str(tmp_path), "dest": "/mnt/inner"}])
    assert error.option == "ro_binds[0].dest" and "binds[0]" in error.message


def test_bind_type_mismatch(tree, tmp_path):
    error = fails(tree, cmd="true", binds=[{"src": str(tmp_path), "dest": "/etc/hostname"}])
    assert error.option == "binds[0].dest" and "not a directory" in error.message


# --- escape attempts -----------------------------------------------------------------------------------------------------


@needs_root
def test_escape_write_outside_the_tree(tree):
    names = [f"host-file-canary-{secrets.token_hex(6)}" for _n in range(3)]
    try:
        run(tree, f"echo x > /{names[0]}; cd /; cd ../../../..; pwd > /pwd; echo y > ../../../../../{names[1]};"
                  f" echo z > /proc/1/root/../../{names[2]}; echo w > /tmp/../../../{names[2]}-tmp")
        for name in names:
            assert not os.path.lexists(f"/{name}"), name
            assert not os.path.lexists(f"/tmp/{name}"), name
        assert os.path.exists(os.path.join(tree, names[0]))  # they all landed in the tree
        assert os.path.exists(os.path.join(tree, names[1]))
        assert os.path.exists(os.path.join(tree, names[2]))
        with open(os.path.join(tree, "pwd"), encoding="ascii") as f:
            assert f.read() == "/\n"
    finally:
        for name in names:
            for leftover in (f"/{name}", f"/{name}-tmp"):
                if os.path.lexists(leftover):
                    os.unlink(leftover)


@needs_root
def test_escape_read_the_hosts_root_home(tree):
    name = f".osimage-canary-{secrets.token_hex(6)}"
    canary = f"/root/{name}"
    with open(canary, "w", encoding="ascii") as f:
        f.write("host secret\n")
    try:
        result = run(tree, f"cat /root/{name}; cat /proc/1/root/root/{name}; ls -a /root;"
                           f" find / \\( -path /proc -o -path /sys \\) -prune -o -name '{name}' -print; true")
        assert "host secret" not in result["stdout"] and name not in result["stdout"]
        assert result["stdout_lines"] == [".", ".."]  # the tree's own, empty /root
    finally:
        os.unlink(canary)


@needs_root
def test_escape_connect_to_the_hosts_loopback(tree, listener):
    blocked = run(tree, f"echo ping | nc -w 2 127.0.0.1 {listener.port}; echo rc=$?;"
                        f" wget -q -T 2 -O - http://127.0.0.1:{listener.port}/ ; echo rc=$?")
    assert "pong" not in blocked["stdout"] and listener.connections == 0
    allowed = run(tree, f"echo ping | nc -w 2 127.0.0.1 {listener.port}", network=True)
    assert allowed["stdout"] == "pong" and listener.connections == 1


@needs_root
def test_escape_see_host_processes(tree):
    mark = f"0.{secrets.randbelow(10 ** 9):09d}"
    host = subprocess.Popen(["sleep", "300", mark])
    try:
        assert _wait_for(lambda: host_pids_with(mark) == [host.pid])
        result = run(tree, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '; echo; ps -o pid,args;"
                           f" kill -0 {host.pid} && echo signalled; true")
        assert mark not in result["stdout"]
        assert "signalled" not in result["stdout_lines"]
        assert host.poll() is None
    finally:
        host.kill()
        host.wait()


@needs_root
def test_escape_start_a_service_during_package_install(tree):
    _install_invoke_rc_d(tree)
    result = run(tree, "invoke-rc.d apache2 start; invoke-rc.d apache2 restart")
    assert result["stdout_lines"] == ["invoke-rc.d: policy-rc.d denied execution of start.",
                                      "invoke-rc.d: policy-rc.d denied execution of restart."]
    assert not os.path.lexists(os.path.join(tree, "started-apache2"))
    assert not os.path.lexists(os.path.join(tree, "usr", "sbin", "policy-rc.d"))


# --- root vs rootless -----------------------------------------------------------------------------------------------------


@needs_root
def test_as_root_the_command_has_root_powers_in_the_tree(tree):
    result = run(tree, "touch /f && chown 1234:5678 /f && stat -c %u:%g /f; mknod /tmp/null c 1 3 && echo mknod;"
                       " grep CapEff /proc/self/status")
    lines = result["stdout_lines"]
    assert lines[:2] == ["1234:5678", "mknod"]
    assert int(lines[2].split()[1], 16) != 0
    st = os.stat(os.path.join(tree, "f"))
    assert (st.st_uid, st.st_gid) == (1234, 5678)


def _nobody_ids() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def as_nobody(kwargs: dict, wrapper: list[str] | None = None) -> dict:
    """run_in_tree(**kwargs) as nobody (setpriv, the host's python3); the result or the error as a dict."""
    if not os.path.exists(HOST_PYTHON) or not shutil.which("setpriv"):
        pytest.fail("needs /usr/bin/python3 and setpriv (util-linux)")
    uid, gid = _nobody_ids()
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"] + (wrapper or []) + [
        HOST_PYTHON, "-c", NOBODY_SCRIPT, COLLECTIONS_ROOT]
    done = subprocess.run(argv, input=json.dumps(kwargs).encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, cwd="/", check=False, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


@pytest.fixture
def nobody_tree():
    if not AS_ROOT:
        pytest.skip("switching to nobody needs root")
    base = tempfile.mkdtemp(prefix="osimage-bwrap-nobody-")
    os.chmod(base, 0o755)
    try:
        yield mini_tree.make_tree(os.path.join(base, "tree"), owner=_nobody_ids())
    finally:
        shutil.rmtree(base)


def test_unprivileged_user_namespaces_are_available_here():
    """Records the host setting the rootless mode depends on (reported, not changed)."""
    with open("/proc/sys/user/max_user_namespaces", encoding="ascii") as f:
        assert int(f.read()) > 0
    if os.path.exists("/proc/sys/kernel/unprivileged_userns_clone"):
        with open("/proc/sys/kernel/unprivileged_userns_clone", encoding="ascii") as f:
            assert f.read().strip() == "1"


def test_unprivileged_run_as_nobody(nobody_tree, listener):
    before = mini_tree.listing(nobody_tree)
    cmd = (f"id -u; id -g; hostname; echo made > /root/by-nobody; /usr/sbin/policy-rc.d x start; echo $?;"
           f" echo ping | nc -w 2 127.0.0.1 {listener.port} || echo no-net; ls /proc | grep -c '^[0-9]'")
    out = as_nobody({"root": nobody_tree, "cmd": cmd})
    assert out["ok"], out
    result = out["result"]
    assert result["rootless"] is True and "--unshare-user" in result["bwrap_argv"]
    lines = result["stdout_lines"]
    assert lines[:5] == ["0", "0", "minitree", "101", "no-net"] and int(lines[5]) <= 6
    assert listener.connections == 0
    made = os.path.join(nobody_tree, "root", "by-nobody")
    assert os.stat(made).st_uid == _nobody_ids()[0]
    os.unlink(made)
    os.utime(os.path.join(nobody_tree, "root"), ns=(before["root"][-1], before["root"][-1]))
    assert mini_tree.listing(nobody_tree) == before


def test_unprivileged_limits(nobody_tree):
    """What uid 0 in a user namespace cannot do (documented in the module)."""
    cmd = ("touch /f; chown 1234 /f || echo chown-refused; chgrp 42 /f || echo chgrp-refused;"
           " mknod /tmp/null c 1 3 || echo mknod-refused; hostname other || echo hostname-refused;"
           " chroot / /bin/true || echo chroot-refused; mount -t tmpfs none /mnt || echo mount-refused;"
           " grep CapEff /proc/self/status; rm /f")
    out = as_nobody({"root": nobody_tree, "cmd": cmd})
    assert out["ok"], out
    lines = out["result"]["stdout_lines"]
    assert lines[:6] == ["chown-refused", "chgrp-refused", "mknod-refused", "hostname-refused", "chroot-refused",
                         "mount-refused"]
    assert lines[6].split() == ["CapEff:", "0000000000000000"]


def test_unprivileged_escapes_fail_too(nobody_tree):
    name = f"host-file-canary-{secrets.token_hex(6)}"
    cmd = f"echo x > /{name}; echo y > ../../../tmp/{name}; cat /proc/[0-9]*/cmdline | tr '\\0' ' '"
    out = as_nobody({"root": nobody_tree, "cmd": cmd})
    assert out["ok"], out
    assert not os.path.lexists(f"/{name}") and not os.path.lexists(f"/tmp/{name}")
    assert "pytest" not in out["result"]["stdout"]  # no host process visible
    os.unlink(os.path.join(nobody_tree, name))


def test_unprivileged_nothing_left_behind_in_a_bare_tree():
    if not AS_ROOT:
        pytest.skip("switching to nobody needs root")
    base = tempfile.mkdtemp(prefix="osimage-bwrap-nobody-")
    os.chmod(base, 0o755)
    try:
        bare = mini_tree.make_tree(os.path.join(base, "bare"), api_dirs=False, etc=False, owner=_nobody_ids())
        before = mini_tree.listing(bare)
        out = as_nobody({"root": bare, "cmd": "ls /usr/sbin /etc", "network": True})
        assert out["ok"], out
        assert mini_tree.listing(bare) == before
    finally:
        shutil.rmtree(base)


def test_unprivileged_tree_not_writable_is_a_clear_error(tree):
    if not AS_ROOT:
        pytest.skip("switching to nobody needs root")
    base = tempfile.mkdtemp(prefix="osimage-bwrap-nobody-")
    os.chmod(base, 0o755)
    try:
        root_owned = mini_tree.make_tree(os.path.join(base, "tree"))
        out = as_nobody({"root": root_owned, "cmd": "true"})
        assert not out["ok"] and out["option"] == "root"
        assert "policy-rc.d" in out["msg"] and "Permission denied" in out["msg"]
    finally:
        shutil.rmtree(base)


def test_bwrap_refused_by_the_kernel_is_a_clear_error(nobody_tree):
    """User namespaces disabled (here: bwrap's --disable-userns around the module, so nothing host-wide changes)."""
    outer = ["bwrap", "--unshare-user", "--disable-userns", "--bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
             "--unshare-pid", "--die-with-parent"]
    before = mini_tree.listing(nobody_tree)
    out = as_nobody({"root": nobody_tree, "cmd": "true"}, wrapper=outer)
    assert not out["ok"]
    assert "bwrap could not set up the sandbox" in out["msg"] and "user namespaces" in out["msg"]
    assert mini_tree.listing(nobody_tree) == before
