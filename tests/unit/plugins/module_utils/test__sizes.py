# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

from decimal import Decimal

import pytest

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._sizes import (
    align_down, align_up, format_size, parse_percent, parse_size,
)


@pytest.mark.parametrize("value, expected", [
    (4096, 4096),
    (0, 0),
    ("4096", 4096),
    ("2GiB", 2 * 1024 ** 3),
    ("2G", 2 * 1024 ** 3),
    ("2 gib", 2 * 1024 ** 3),
    ("512MiB", 512 * 1024 ** 2),
    ("1500MB", 1500 * 1000 ** 2),
    ("1.5GiB", 3 * 512 * 1024 ** 2),
    ("64k", 65536),
    ("2KB", 2000),
    ("1TiB", 1024 ** 4),
    ("2048s", 2048 * 512),
    ("100B", 100),
])
def test_parse_size(value, expected):
    assert parse_size(value, "size") == expected


@pytest.mark.parametrize("value", ["", "2XB", "GiB", "-5", "1.5", "0.3KiB", "2 Gi B", True, None, [], 1.5, -1, "50%"])
def test_parse_size_rejects_non_sizes_naming_the_option(value):
    with pytest.raises(BuildError) as exc:
        parse_size(value, "partitions[2].size")
    assert exc.value.option == "partitions[2].size"
    assert str(exc.value).startswith("partitions[2].size: ")


def test_parse_size_error_says_how_to_write_a_size():
    with pytest.raises(BuildError, match=r"2GiB"):
        parse_size("lots", "size")


@pytest.mark.parametrize("value, expected", [("50%", Decimal(50)), (" 12.5 % ", Decimal("12.5")), ("50", None), (50, None), ("x%", None)])
def test_parse_percent(value, expected):
    assert parse_percent(value) == expected


@pytest.mark.parametrize("value, alignment, up, down", [
    (0, 2048, 0, 0), (1, 2048, 2048, 0), (2048, 2048, 2048, 2048), (2049, 2048, 4096, 2048), (7, 1, 7, 7), (7, 0, 7, 7),
])
def test_alignment(value, alignment, up, down):
    assert align_up(value, alignment) == up
    assert align_down(value, alignment) == down


@pytest.mark.parametrize("value, text", [(512, "512 B"), (1024, "1 KiB"), (1536 * 1024, "1.5 MiB"), (2 * 1024 ** 3, "2 GiB"), (3 * 1024 ** 4, "3 TiB")])
def test_format_size(value, text):
    assert format_size(value) == text
