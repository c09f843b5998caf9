# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The one place where the exceptions of the pure helpers become ``fail_json``.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import typing as t
from contextlib import contextmanager

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError

if t.TYPE_CHECKING:
    from ansible.module_utils.basic import AnsibleModule  # pragma: no cover


@contextmanager
def failing_cleanly(module: AnsibleModule) -> t.Iterator[None]:
    """Turn BuildError and OSError into a failed task with a readable message."""
    try:
        yield
    except BuildError as exc:
        details = dict(exc.details)
        if exc.option:
            details["option"] = exc.option
        module.fail_json(msg=str(exc), **details)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        module.fail_json(msg=f"{where}{exc.strerror or exc}", errno=exc.errno)


def exit_with(module: AnsibleModule, result: dict[str, t.Any]) -> None:
    """Report ``result``, with its ``diff`` only when Ansible runs in diff mode."""
    if not module._diff:
        result.pop("diff", None)
    module.exit_json(**result)
