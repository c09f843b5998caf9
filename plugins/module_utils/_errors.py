# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Exceptions raised by the pure helpers of this collection.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations


class BuildError(Exception):
    """A problem the user can fix.

    ``option`` names the module option at fault (e.g. ``partitions[2].size``) so
    the adapter can prefix the message with it; ``details`` are returned to the
    user as extra keys of the failed result.
    """

    def __init__(self, message: str, option: str | None = None, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.option = option
        self.details = details

    def __str__(self) -> str:
        if self.option:
            return f"{self.option}: {self.message}"
        return self.message
