# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Running the host tools the modules drive: argv lists only, never a shell.

The helpers run without an AnsibleModule (they raise, the adapter reports), so
they cannot use ``run_command``; this is the one place that starts processes
that run to completion.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import typing as t

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError

# mke2fs, mkfs.fat and friends live in sbin, which an ordinary user's PATH often lacks.
_SBIN = ("/usr/sbin", "/sbin")


def find_tool(candidates: t.Sequence[str], option: str, package: str) -> str:
    """The path of the first of ``candidates`` found on PATH or in sbin (or given as a path)."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath)] + list(_SBIN))
    for name in candidates:
        found = shutil.which(name, path=search)
        if found:
            return found
    raise BuildError(f"{' or '.join(candidates)} was not found on the build host (searched PATH and {', '.join(_SBIN)}); "
                     f"install {package}", option=option)


def run_tool(argv: t.Sequence[str], env: dict[str, str] | None = None, merge_stderr: bool = False) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion with no stdin; raise OSError when it cannot start."""
    return subprocess.run(  # pylint: disable=ansible-bad-function
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, env=env, check=False)


def run(argv: t.Sequence[str], option: str, env: dict[str, str] | None = None, what: str | None = None) -> str:
    """Run ``argv``; return its stdout, or raise BuildError with its stderr."""
    try:
        proc = run_tool(argv, env=env)
    except OSError as exc:
        raise BuildError(f"{what or argv[0]} could not be started: {exc.strerror}", option=option)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(errors="replace").strip()
        raise BuildError(f"{what or argv[0]} failed (exit {proc.returncode}): {err}", option=option,
                         cmd=[os.fsdecode(arg) for arg in argv], rc=proc.returncode)
    return proc.stdout.decode(errors="replace")
