# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Byte sizes as users write them (``2GiB``, ``1500MB``, ``4096``), and alignment.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError

SECTOR_SIZE = 512

# Binary units follow IEC; a bare K/M/G/T is binary too, as in qemu-img and
# truncate, because that is what people mean when they size a disk.
_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024 ** 2, "mib": 1024 ** 2, "mb": 1000 ** 2,
    "g": 1024 ** 3, "gib": 1024 ** 3, "gb": 1000 ** 3,
    "t": 1024 ** 4, "tib": 1024 ** 4, "tb": 1000 ** 4,
    "s": 512,  # sectors, as sfdisk and parted accept them
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_PERCENT_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*$")
_EXAMPLES = "write it as bytes (4096) or with a unit: 512MiB, 2GiB, 1500MB, 2048s"


def parse_size(value: object, option: str) -> int:
    """Return ``value`` in bytes; raise BuildError naming ``option`` when it is no size."""
    if isinstance(value, bool):
        raise BuildError(f"{value!r} is not a size; {_EXAMPLES}", option=option)
    if isinstance(value, int):
        if value < 0:
            raise BuildError(f"{value} is negative; {_EXAMPLES}", option=option)
        return value
    if not isinstance(value, str):
        raise BuildError(f"{value!r} is not a size; {_EXAMPLES}", option=option)
    match = _SIZE_RE.match(value)
    if not match or match.group(2).lower() not in _UNITS:
        raise BuildError(f"{value!r} is not a size; {_EXAMPLES}", option=option)
    try:
        number = Decimal(match.group(1)) * _UNITS[match.group(2).lower()]
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise BuildError(f"{value!r} is not a size; {_EXAMPLES}", option=option)
    if number != number.to_integral_value():
        raise BuildError(f"{value!r} is not a whole number of bytes", option=option)
    return int(number)


def parse_percent(value: object) -> Decimal | None:
    """Return the percentage in ``"50%"`` (as 50), or None when ``value`` is not a percentage."""
    if isinstance(value, str):
        match = _PERCENT_RE.match(value)
        if match:
            return Decimal(match.group(1))
    return None


def align_up(value: int, alignment: int) -> int:
    """The smallest multiple of ``alignment`` that is >= ``value``."""
    if alignment <= 1:
        return value
    return -(-value // alignment) * alignment


def align_down(value: int, alignment: int) -> int:
    """The largest multiple of ``alignment`` that is <= ``value``."""
    if alignment <= 1:
        return value
    return value // alignment * alignment


def format_size(value: int) -> str:
    """A short human form: ``2 GiB``, ``1.5 MiB``, ``512 B``."""
    for unit, factor in (("TiB", 1024 ** 4), ("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if value >= factor:
            text = f"{value / factor:.2f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
    return f"{value} B"
