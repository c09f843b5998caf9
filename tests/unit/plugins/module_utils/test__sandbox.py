# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The bwrap argv, flag by flag (pure: nothing runs here)."""

from __future__ import annotations

import dataclasses

import pytest

from ansible_collections.osimage.builder.plugins.module_utils import _sandbox
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._sandbox import Mount, SandboxOptions, bwrap_argv

ROOT = "/srv/tree"
NAMESPACES = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
API = ["--bind", ROOT, "/",
       "--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys", "--ro-bind-try", "/proc/sysrq-trigger", "/proc/sysrq-trigger",
       "--dev", "/dev", "--ro-bind", "/sys", "/sys", "--tmpfs", "/run", "--perms", "1777", "--tmpfs", "/tmp"]


def opts(**kwargs) -> SandboxOptions:
    kwargs.setdefault("root", ROOT)
    kwargs.setdefault("command", ("true",))
    return SandboxOptions(**kwargs)


def test_minimal_argv_as_root():
    assert bwrap_argv(opts()) == (
        ["bwrap"] + NAMESPACES + ["--unshare-net", "--hostname", "osimage", "--die-with-parent", "--new-session"]
        + API + ["--chdir", "/", "--", "true"])


def test_rootless_maps_the_caller_to_uid_0_first():
    argv = bwrap_argv(opts(rootless=True))
    assert argv[:6] == ["bwrap", "--unshare-user", "--uid", "0", "--gid", "0"]
    assert argv[6:] == bwrap_argv(opts())[1:]


def test_root_gets_no_user_namespace_and_no_capability_flags():
    argv = bwrap_argv(opts())
    assert "--unshare-user" not in argv and "--uid" not in argv
    assert not [arg for arg in argv if arg.startswith("--cap-")]


def test_bwrap_path_and_command_after_double_dash():
    argv = bwrap_argv(opts(command=("/bin/sh", "-c", "echo --bind / /")), bwrap="/usr/bin/bwrap")
    assert argv[0] == "/usr/bin/bwrap"
    assert argv[-4:] == ["--", "/bin/sh", "-c", "echo --bind / /"]
    assert argv[argv.index("--") + 1:] == ["/bin/sh", "-c", "echo --bind / /"]


def test_network_false_unshares_net_and_binds_no_resolv_conf():
    argv = bwrap_argv(opts(network=False, resolv_conf="/etc/resolv.conf"))
    assert "--unshare-net" in argv
    assert "/etc/resolv.conf" not in argv


def test_network_true_shares_net_and_binds_resolv_conf_read_only():
    argv = bwrap_argv(opts(network=True, resolv_conf="/etc/resolv.conf"))
    assert "--unshare-net" not in argv
    i = argv.index("/etc/resolv.conf")
    assert argv[i - 1:i + 2] == ["--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf"]
    # after the API filesystems, so that a resolv.conf that leads into /run lands in the tmpfs
    assert i > argv.index("/tmp")


def test_network_true_without_host_resolv_conf():
    argv = bwrap_argv(opts(network=True, resolv_conf=None))
    assert "--unshare-net" not in argv and "/etc/resolv.conf" not in argv


def test_resolv_conf_follows_the_tree_symlink_via_dest_map():
    argv = bwrap_argv(opts(network=True, resolv_conf="/etc/resolv.conf",
                           dest_map={"/etc/resolv.conf": "/run/systemd/resolve/stub-resolv.conf"}))
    i = argv.index("--ro-bind", argv.index("/tmp"))
    assert argv[i:i + 3] == ["--ro-bind", "/etc/resolv.conf", "/run/systemd/resolve/stub-resolv.conf"]


def test_policy_rc_d_bound_read_only():
    argv = bwrap_argv(opts(policy_rc_d="/tmp/x/policy-rc.d"))
    i = argv.index("/tmp/x/policy-rc.d")
    assert argv[i - 1:i + 2] == ["--ro-bind", "/tmp/x/policy-rc.d", "/usr/sbin/policy-rc.d"]


def test_mount_order_api_resolv_policy_binds_ro_binds():
    o = opts(network=True, resolv_conf="/etc/resolv.conf", policy_rc_d="/p",
             binds=(("/cache", "/var/cache/apt/archives"), ("/b", "/mnt/b")), ro_binds=(("/debs", "/srv/debs"),))
    assert [(m.kind, m.dest) for m in _sandbox.mounts(o)] == [
        ("bind", "/"), ("proc", "/proc"), ("ro-bind", "/proc/sys"), ("ro-bind-try", "/proc/sysrq-trigger"),
        ("dev", "/dev"), ("ro-bind", "/sys"), ("tmpfs", "/run"), ("tmpfs", "/tmp"),
        ("ro-bind", "/etc/resolv.conf"), ("ro-bind", "/usr/sbin/policy-rc.d"),
        ("bind", "/var/cache/apt/archives"), ("bind", "/mnt/b"), ("ro-bind", "/srv/debs")]
    argv = bwrap_argv(o)
    tail = argv[argv.index("/usr/sbin/policy-rc.d") + 1:argv.index("--chdir")]
    assert tail == ["--bind", "/cache", "/var/cache/apt/archives", "--bind", "/b", "/mnt/b",
                    "--ro-bind", "/debs", "/srv/debs"]


def test_dest_map_never_moves_the_root():
    o = opts(dest_map={"/": "/elsewhere", "/proc": "/x/proc"})
    argv = bwrap_argv(o)
    assert argv[argv.index("--bind"):argv.index("--bind") + 3] == ["--bind", ROOT, "/"]
    assert argv[argv.index("--proc") + 1] == "/x/proc"


def test_hostname_chdir_and_status_fd():
    argv = bwrap_argv(opts(hostname="web1.example", chdir="/var/lib", status_fd=7))
    assert argv[argv.index("--hostname") + 1] == "web1.example"
    assert argv[argv.index("--chdir") + 1] == "/var/lib"
    assert argv[argv.index("--json-status-fd") + 1] == "7"
    assert argv.index("--json-status-fd") < argv.index("--bind")


def test_no_status_fd_by_default():
    assert "--json-status-fd" not in bwrap_argv(opts())


def test_tmp_is_sticky_world_writable_run_is_not():
    argv = bwrap_argv(opts())
    assert argv[argv.index("/tmp") - 3:argv.index("/tmp") + 1] == ["--perms", "1777", "--tmpfs", "/tmp"]
    assert argv[argv.index("/run") - 1] == "--tmpfs" and argv[argv.index("/run") - 2] != "1777"


def test_nothing_of_the_host_but_api_filesystems_and_explicit_binds():
    o = opts(policy_rc_d="/tmp/p/policy-rc.d", binds=(("/srv/cache", "/var/cache"),))
    sources = [m.src for m in _sandbox.mounts(o) if m.src is not None]
    assert sources == [ROOT, "/proc/sys", "/proc/sysrq-trigger", "/sys", "/tmp/p/policy-rc.d", "/srv/cache"]


def test_environment_is_not_on_the_command_line():
    argv = bwrap_argv(opts())
    assert not {"--setenv", "--unsetenv", "--clearenv"} & set(argv)


def test_sandbox_env_defaults():
    assert _sandbox.sandbox_env(None) == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
        "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}


def test_sandbox_env_adds_overrides_and_stringifies():
    env = _sandbox.sandbox_env({"FOO": "bar", "LANG": "C", "N": 3, "EMPTY": None})
    assert env["FOO"] == "bar" and env["LANG"] == "C" and env["N"] == "3" and env["EMPTY"] == ""
    assert "TERM" not in env


@pytest.mark.parametrize("env, fragment", [
    ({"A=B": "x"}, "not a valid environment variable name"),
    ({"": "x"}, "not a valid environment variable name"),
    ({"1X": "x"}, "not a valid environment variable name"),
    ({"X": ["a"]}, "must be a string"),
    ({"X": {"a": 1}}, "must be a string"),
    ({"X": "a\0b"}, "NUL"),
])
def test_sandbox_env_rejects(env, fragment):
    with pytest.raises(BuildError, match=fragment) as info:
        _sandbox.sandbox_env(env)
    assert info.value.option == "env"


@pytest.mark.parametrize("path, base, expected", [
    ("/", "/", "/"),
    ("/var/lib/", "/", "/var/lib"),
    ("var/lib", "/", "/var/lib"),
    ("lib", "/var", "/var/lib"),
    ("../../../../etc", "/var", "/etc"),
    ("/../../..", "/", "/"),
    ("//etc//./x/..", "/", "/etc"),
])
def test_sandbox_path_never_climbs_above_root(path, base, expected):
    assert _sandbox.sandbox_path(path, "chdir", base) == expected


def test_sandbox_path_rejects_empty_and_nul():
    for bad in ("", "a\0b"):
        with pytest.raises(BuildError) as info:
            _sandbox.sandbox_path(bad, "creates")
        assert info.value.option == "creates"


def test_parse_binds_dest_defaults_to_src():
    assert _sandbox.parse_binds([{"src": "/srv/cache/"}, {"src": "/a", "dest": "/mnt/../b/"}], "binds") == (
        ("/srv/cache", "/srv/cache"), ("/a", "/b"))
    assert _sandbox.parse_binds(None, "binds") == ()


@pytest.mark.parametrize("binds, option, fragment", [
    (["/a:/b"], "binds[0]", "dictionary"),
    ([{"dest": "/b"}], "binds[0]", "dictionary"),
    ([{"src": "/a"}, {"src": "a"}], "binds[1].src", "absolute path on the build host"),
    ([{"src": "/a", "dest": "b"}], "binds[0].dest", "absolute path inside the tree"),
    ([{"src": "/a", "dest": "/"}], "binds[0].dest", "root of the tree"),
    ([{"src": "/a", "dest": "/x/.."}], "binds[0].dest", "root of the tree"),
    ([{"src": "/a", "dest": "/proc"}], "binds[0].dest", "cannot be bound over"),
    ([{"src": "/a", "dest": "/proc/1/root"}], "binds[0].dest", "cannot be bound over"),
    ([{"src": "/a", "dest": "/sys/fs"}], "binds[0].dest", "cannot be bound over"),
    ([{"src": "/a", "dest": "/dev"}], "binds[0].dest", "cannot be bound over"),
])
def test_parse_binds_rejects(binds, option, fragment):
    with pytest.raises(BuildError, match=fragment) as info:
        _sandbox.parse_binds(binds, "binds")
    assert info.value.option == option


def test_bind_into_dev_shm_is_allowed():
    assert _sandbox.parse_binds([{"src": "/a", "dest": "/dev/shm/a"}], "ro_binds") == (("/a", "/dev/shm/a"),)


def test_is_within_and_containing_mount():
    assert _sandbox.is_within("/run/x", "/run") and _sandbox.is_within("/run", "/run")
    assert not _sandbox.is_within("/running", "/run")
    assert _sandbox.is_within("/anything", "/")
    ms = _sandbox.mounts(opts(binds=(("/c", "/var/cache"),)))
    assert _sandbox.containing_mount("/run/systemd/resolve/stub-resolv.conf", ms).dest == "/run"
    assert _sandbox.containing_mount("/proc/sys/kernel", ms).dest == "/proc/sys"
    assert _sandbox.containing_mount("/var/cache/apt", ms).origin == "binds[0]"
    assert _sandbox.containing_mount("/etc/resolv.conf", ms) is None
    assert _sandbox.containing_mount("/", ms) is None


@pytest.mark.parametrize("text, expected", [
    ("web1", "web1"), ("web-1.example.org", "web-1.example.org"), ("", None), (None, None),
    ("-bad", None), ("bad-", None), ("has space", None), ("a" * 64, None), ("a" * 63, "a" * 63),
    ("x" * 30 + "." + "y" * 34, None), ("under_score", None), ("a..b", None),
])
def test_valid_hostname(text, expected):
    assert _sandbox.valid_hostname(text) == expected


def test_mount_args():
    assert Mount("tmpfs", "/tmp", perms="1777").args() == ["--perms", "1777", "--tmpfs", "/tmp"]
    assert Mount("ro-bind", "/b", "/a").args() == ["--ro-bind", "/a", "/b"]
    assert Mount("proc", "/proc").args() == ["--proc", "/proc"]


def test_options_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts().network = True  # type: ignore[misc]


def test_policy_script_exits_101():
    assert _sandbox.POLICY_RC_D_SCRIPT.startswith("#!/bin/sh\n")
    assert _sandbox.POLICY_RC_D_SCRIPT.rstrip().endswith("exit 101")
