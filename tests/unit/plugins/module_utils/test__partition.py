# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import uuid
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._partition import (
    NAMESPACE, SECTOR_SIZE, TYPE_ALIASES, Partition, PartitionTable, _chs, clear_writes, parse, plan_table, serialize,
)

MiB = 1024 ** 2
GiB = 1024 ** 3
SIZE = 2 * GiB
SECTORS = SIZE // SECTOR_SIZE

BIOS_GRUB = TYPE_ALIASES["bios_grub"][0]
ESP = TYPE_ALIASES["esp"][0]
ROOT = TYPE_ALIASES["linux-root-x86-64"][0]
LINUX = TYPE_ALIASES["linux"][0]

GPT_LAYOUT = [
    {"name": "bios", "type": "bios_grub", "size": "1MiB"},
    {"name": "esp", "type": "esp", "size": "256MiB"},
    {"name": "root", "type": "linux-root-x86-64"},
]
MSDOS_LAYOUT = [
    {"size": "100MiB", "bootable": True},
    {"size": "100MiB", "type": "swap"},
    {"size": "100MiB", "type": "esp"},
    {"type": "lvm"},
]


class Disk:
    """An in-memory sparse disk: a dict of written ranges, zeros elsewhere."""

    def __init__(self, size: int = SIZE) -> None:
        self.size = size
        self.writes: list[tuple[int, bytes]] = []

    def apply(self, writes: list[tuple[int, bytes]]) -> Disk:
        self.writes.extend(writes)
        return self

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        out = bytearray(length)
        for start, data in self.writes:
            lo, hi = max(offset, start), min(offset + length, start + len(data))
            if lo < hi:
                out[lo - offset:hi - offset] = data[lo - start:hi - start]
        return bytes(out)

    def parse(self) -> PartitionTable | None:
        return parse(self.read, self.size)


def disk_of(table: PartitionTable) -> Disk:
    return Disk(table.disk_sectors * SECTOR_SIZE).apply(serialize(table))


def expect_error(option: str | None, *words: str):
    """Context manager: a BuildError naming ``option`` whose message holds every word."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(BuildError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            err = self.info.value
            assert err.option == option, f"option {err.option!r} != {option!r}: {err}"
            for word in words:
                assert word in err.message, f"{word!r} not in {err.message!r}"
            return handled
    return _Check()


# ---------------------------------------------------------------- planning

def test_type_aliases_match_sfdisk_list():
    listing = run("sfdisk", "--list-types", "--label", "gpt")
    for alias, (guid, _mbr) in TYPE_ALIASES.items():
        assert guid in listing, alias
    dos = run("sfdisk", "--list-types", "--label", "dos")
    for alias, (_guid, mbr) in TYPE_ALIASES.items():
        if mbr is not None:
            assert any(line.split()[:1] == [mbr.lstrip("0") or "0"] for line in dos.splitlines()), alias


def test_gpt_default_layout():
    table = plan_table("gpt", SIZE, GPT_LAYOUT)
    assert table.label == "gpt"
    assert (table.first_lba, table.last_lba, table.disk_sectors) == (34, SECTORS - 34, SECTORS)
    assert [(p.number, p.start_sector, p.sectors) for p in table.partitions] == [
        (1, 2048, 2048), (2, 4096, 524288), (3, 528384, 3663872)]
    assert [p.type for p in table.partitions] == [BIOS_GRUB, ESP, ROOT]
    assert [p.name for p in table.partitions] == ["bios", "esp", "root"]
    assert all(p.mbr_type is None and not p.bootable and p.attributes == 0 for p in table.partitions)
    assert uuid.UUID(table.disk_id) and table.disk_id == table.disk_id.upper()


def test_gpt_fill_ends_on_alignment_like_sfdisk():
    # sfdisk 2.38 ends the last GPT partition on a grain boundary, short of the last usable LBA.
    size = SIZE + 2100 * SECTOR_SIZE
    table = plan_table("gpt", size, [{"size": "100MiB"}, {}])
    assert table.last_lba == size // SECTOR_SIZE - 34
    assert table.partitions[1].end_sector == 4196351
    small = plan_table("gpt", SIZE, [{}], alignment=512)
    assert (small.partitions[0].start_sector, small.partitions[0].end_sector) == (34, SECTORS - 34)


def test_msdos_fill_runs_to_last_sector():
    size = SIZE + 100 * SECTOR_SIZE
    table = plan_table("msdos", size, MSDOS_LAYOUT, disk_id="0x1a2b3c4d")
    assert table.partitions[-1].end_sector == size // SECTOR_SIZE - 1
    assert [(p.start_sector, p.sectors) for p in table.partitions[:3]] == [(2048, 204800), (206848, 204800), (411648, 204800)]
    assert [p.type for p in table.partitions] == ["83", "82", "ef", "8e"]
    assert [p.bootable for p in table.partitions] == [True, False, False, False]
    assert [p.uuid for p in table.partitions] == ["1a2b3c4d-01", "1a2b3c4d-02", "1a2b3c4d-03", "1a2b3c4d-04"]
    assert all(p.name == "" and p.attributes == 0 and p.mbr_type is None for p in table.partitions)
    assert (table.disk_id, table.first_lba, table.last_lba) == ("0x1a2b3c4d", 1, size // SECTOR_SIZE - 1)


@pytest.mark.parametrize("label, alignment, first", [
    ("gpt", "4KiB", 40), ("gpt", 512, 34), ("gpt", "1MiB", 2048), ("gpt", "2MiB", 4096),
    ("msdos", "4KiB", 8), ("msdos", 512, 1), ("msdos", 2048 * 512, 2048), ("hybrid", "4KiB", 40),
])
def test_alignment_first_start(label, alignment, first):
    table = plan_table(label, SIZE, [{"size": "1000KiB"}, {"size": "1MiB"}], alignment=alignment)
    align = (int(alignment) if isinstance(alignment, int) else {"4KiB": 4096, "1MiB": MiB, "2MiB": 2 * MiB}[alignment]) // SECTOR_SIZE
    assert table.partitions[0].start_sector == first
    assert table.partitions[1].start_sector % align == 0
    assert table.partitions[1].start_sector == -(-(first + 2000) // align) * align


@pytest.mark.parametrize("alignment", ["1000", 768, 0, "abc", "-1MiB", True])
def test_alignment_errors(alignment):
    with expect_error("alignment"):
        plan_table("gpt", SIZE, [{}], alignment=alignment)


def test_percent_sizes():
    table = plan_table("gpt", SIZE, [{"size": "50%"}, {"size": "25%"}, {}])
    assert [p.sectors for p in table.partitions[:2]] == [SECTORS // 2, SECTORS // 4]
    assert table.partitions[1].start_sector == 2048 + SECTORS // 2
    odd = plan_table("msdos", 1000000000, [{"size": "33%"}, {}])
    assert odd.partitions[0].sectors == 643072  # 33% of 10^9 bytes = 644531 sectors, rounded down to 1MiB
    for bad in ("0%", "150%"):
        with expect_error("partitions[1].size", "percentage"):
            plan_table("gpt", SIZE, [{"size": bad}, {}])


def test_explicit_start_and_next_aligned():
    table = plan_table("gpt", SIZE, [{"start": "10MiB", "size": "1000KiB"}, {"size": "1MiB"}, {"start": 1024 * MiB}])
    assert [p.start_sector for p in table.partitions] == [20480, 22528, 2097152]
    table = plan_table("msdos", SIZE, [{"start": "63s", "size": "1MiB"}, {}])
    assert table.partitions[0].start_sector == 63
    assert table.partitions[1].start_sector == 4096


def test_none_values_count_as_unset():
    keys = {"name": None, "type": None, "start": None, "bootable": None, "uuid": None, "attributes": None, "hybrid": None, "mbr_type": None}
    table = plan_table("gpt", SIZE, [dict(keys, size="1MiB"), dict(keys, size=None)])
    assert [p.type for p in table.partitions] == [LINUX, LINUX]
    msdos = plan_table("msdos", SIZE, [dict(keys, size=None)])
    assert msdos.partitions[0].type == "83"


@pytest.mark.parametrize("label, parts, kwargs, option, words", [
    ("bsd", [{}], {}, "label", ["msdos, gpt or hybrid"]),
    ("gpt", [{"size": "1MiB"}, {}], {"seed": ""}, "seed", ["non-empty"]),
    ("gpt", [{"name": "a"}, {}], {}, "partitions[1].size", ["required", "last"]),
    ("gpt", [{"size": 0}], {}, "partitions[1].size", ["0"]),
    ("gpt", [{"size": 1000}], {}, "partitions[1].size", ["512", "1024"]),
    ("gpt", [{"size": "lots"}], {}, "partitions[1].size", ["not a size"]),
    ("gpt", [{"size": "1MiB"}, {"start": "1MiB", "size": "1MiB"}], {}, "partitions[2].start", ["overlaps partitions[1]", "sectors 2048-4095"]),
    ("gpt", [{"start": "2MiB", "size": "1MiB"}, {"start": "1MiB", "size": "2MiB"}], {}, "partitions[2].start", ["overlaps partitions[1]"]),
    ("gpt", [{"size": "3GiB"}], {}, "partitions[1].size", ["past the last usable sector 4194270", "at least 3222290944 bytes", "disk_image"]),
    ("msdos", [{"size": "3GiB"}], {}, "partitions[1].size", ["past the last usable sector 4194303", "at least 3222274048 bytes"]),
    ("gpt", [{"start": "3GiB"}], {}, "partitions[1].start", ["past the last usable sector"]),
    ("gpt", [{"start": 33 * 512, "size": "1MiB"}], {}, "partitions[1].start", ["first usable sector 34", "17408"]),
    ("msdos", [{"start": 0, "size": "1MiB"}], {}, "partitions[1].start", ["first usable sector 1"]),
    ("gpt", [{"start": 1000, "size": "1MiB"}], {}, "partitions[1].start", ["512"]),
    ("msdos", [{"size": "1MiB"}] * 4 + [{}], {}, "partitions", ["at most 4", "extended/logical partitions are not supported"]),
    ("gpt", [{"size": "1MiB"}] * 128 + [{}], {}, "partitions", ["at most 128"]),
    ("hybrid", [{"size": "1MiB", "hybrid": True}] * 4, {}, "partitions[4].hybrid", ["at most 3"]),
    ("gpt", [{"size": "1MiB", "name": "x"}, {"name": "x"}], {}, "partitions[2].name", ["partitions[1]", "own name"]),
    ("msdos", [{"name": "root"}], {}, "partitions[1].name", ["no names"]),
    ("gpt", [{"name": "a" * 37}], {}, "partitions[1].name", ["37", "36"]),
    ("gpt", [{"name": "\U0001F600" * 18 + "a"}], {}, "partitions[1].name", ["37 UTF-16 code units"]),
    ("gpt", [{"name": "a\x00b"}], {}, "partitions[1].name", ["NUL"]),
    ("msdos", [{}], {"disk_id": "1a2b3c4d"}, "disk_id", ["0x followed by 8 hex digits"]),
    ("msdos", [{}], {"disk_id": "0x1a2b3c4d5"}, "disk_id", ["0x followed by 8 hex digits"]),
    ("msdos", [{}], {"disk_id": 1 << 32}, "disk_id", ["32-bit"]),
    ("gpt", [{}], {"disk_id": "0x1a2b3c4d"}, "disk_id", ["not a GUID"]),
    ("gpt", [{}], {"disk_id": "00000000-0000-0000-0000-000000000000"}, "disk_id", ["all-zero"]),
    ("gpt", [{"size": "1MiB", "colour": "red"}], {}, "partitions[1].colour", ["unknown key"]),
    ("gpt", ["big"], {}, "partitions[1]", ["not a partition"]),
    ("gpt", {"size": 1}, {}, "partitions", ["list"]),
    ("gpt", [{"type": "ext4"}], {}, "partitions[1].type", ["linux, esp, bios_grub, swap, linux-root-x86-64, xbootldr, lvm"]),
    ("gpt", [{"type": 83}], {}, "partitions[1].type", ["not a partition type"]),
    ("msdos", [{"type": LINUX}], {}, "partitions[1].type", ["GPT type GUID", "alias"]),
    ("gpt", [{"type": "83"}], {}, "partitions[1].type", ["MBR type byte", "linux or linux-root-x86-64"]),
    ("msdos", [{"type": "bios_grub"}], {}, "partitions[1].type", ["no MBR type", "gpt"]),
    ("msdos", [{"type": "05"}], {}, "partitions[1].type", ["extended/logical partitions are not supported"]),
    ("msdos", [{"type": "0x0f"}], {}, "partitions[1].type", ["extended/logical"]),
    ("msdos", [{"type": "ee"}], {}, "partitions[1].type", ["protective"]),
    ("msdos", [{"type": "00"}], {}, "partitions[1].type", ["unused"]),
    ("gpt", [{"type": "00000000-0000-0000-0000-000000000000"}], {}, "partitions[1].type", ["unused"]),
    ("gpt", [{"uuid": "nope"}], {}, "partitions[1].uuid", ["not a GUID"]),
    ("gpt", [{"size": "1MiB", "uuid": ESP}, {"uuid": ESP.lower()}], {}, "partitions[2].uuid", ["partitions[1]", "unique"]),
    ("gpt", [{"uuid": "11111111-2222-3333-4444-555555555555"}], {"disk_id": "11111111-2222-3333-4444-555555555555"},
     "partitions[1].uuid", ["disk_id"]),
    ("msdos", [{"uuid": "12345678-01"}], {"disk_id": "0x1a2b3c4d"}, "partitions[1].uuid", ["1a2b3c4d-01"]),
    ("gpt", [{"attributes": [64]}], {}, "partitions[1].attributes", ["0-63"]),
    ("gpt", [{"attributes": 1 << 64}], {}, "partitions[1].attributes", ["64-bit"]),
    ("gpt", [{"attributes": "x"}], {}, "partitions[1].attributes", ["list of bit numbers"]),
    ("msdos", [{"attributes": [2]}], {}, "partitions[1].attributes", ["bootable"]),
    ("gpt", [{"bootable": "yes"}], {}, "partitions[1].bootable", ["boolean"]),
    ("gpt", [{"hybrid": True}], {}, "partitions[1].hybrid", ["label hybrid"]),
    ("gpt", [{"mbr_type": "83"}], {}, "partitions[1].mbr_type", ["label hybrid"]),
    ("msdos", [{"hybrid": True}], {}, "partitions[1].hybrid", ["label hybrid"]),
    ("msdos", [{"mbr_type": "83"}], {}, "partitions[1].mbr_type", ["type"]),
    ("hybrid", [{"size": "1MiB", "hybrid": True}, {"mbr_type": "8e"}], {}, "partitions[2].mbr_type", ["not mirrored", "hybrid: true"]),
    ("hybrid", [{"type": "0FC63DAF-8483-4772-8E79-3D69D8477DE5"}], {}, "partitions[1].mbr_type", ["no MBR type byte", "by default"]),
    ("hybrid", [{"size": "1MiB", "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE5", "hybrid": True}], {}, "partitions[1].mbr_type",
     ["no MBR type byte"]),
    ("hybrid", [{"type": "bios_grub"}], {}, "partitions", ["at least one mirrored"]),
    ("hybrid", [{"mbr_type": "ee", "hybrid": True}], {}, "partitions[1].mbr_type", ["protective"]),
])
def test_plan_errors(label, parts, kwargs, option, words):
    with expect_error(option, *words):
        plan_table(label, SIZE, parts, **kwargs)


@pytest.mark.parametrize("label, size", [("gpt", 67 * 512), ("hybrid", 10000), ("msdos", 512), ("gpt", -1)])
def test_disk_too_small(label, size):
    with expect_error("image"):
        plan_table(label, size, [])


def test_smallest_gpt_disk():
    table = plan_table("gpt", 68 * 512, [{}], alignment=512)
    assert (table.partitions[0].start_sector, table.partitions[0].sectors) == (34, 1)
    assert disk_of(table).parse() == table


def test_msdos_over_2tib():
    size = 3 * 1024 ** 4
    table = plan_table("msdos", size, [{"size": "1GiB"}, {}])
    assert table.last_lba == 0xFFFFFFFF
    assert table.partitions[1].end_sector == 0xFFFFFFFF
    with expect_error("partitions[2].size", "2 TiB", "gpt"):
        plan_table("msdos", size, [{"size": "1GiB"}, {"size": "2TiB"}])
    assert disk_of(table).parse() == table


def test_names_and_limits_ok():
    table = plan_table("gpt", SIZE, [{"size": "1MiB", "name": "a" * 36}, {"name": "\U0001F600" * 18}])
    assert table.partitions[1].name == "\U0001F600" * 18
    assert disk_of(table).parse() == table
    many = plan_table("gpt", SIZE, [{"size": "1MiB"}] * 127 + [{}])
    assert len(many.partitions) == 128 and many.partitions[-1].number == 128
    assert disk_of(many).parse() == many


def test_type_spellings():
    table = plan_table("gpt", SIZE, [
        {"size": "1MiB", "type": "BIOS-GRUB"},
        {"size": "1MiB", "type": "linux_root_x86_64"},
        {"size": "1MiB", "type": "{c12a7328-f81f-11d2-ba4b-00a0c93ec93b}"},
        {"size": "1MiB", "type": "xbootldr"},
        {"size": "1MiB", "type": "swap"},
        {"type": "lvm"},
    ])
    assert [p.type for p in table.partitions] == [
        BIOS_GRUB, ROOT, ESP, "BC13C2FF-59E6-4262-A352-B275FD6F7172", "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928"]
    msdos = plan_table("msdos", SIZE, [{"size": "1MiB", "type": "0x83"}, {"size": "1MiB", "type": "EF"}, {"size": "1MiB", "type": "c"},
                                       {"type": "xbootldr"}])
    assert [p.type for p in msdos.partitions] == ["83", "ef", "c", "ea"]  # sfdisk prints 0x0c as "c"


def test_gpt_attributes_and_bootable():
    table = plan_table("gpt", SIZE, [
        {"size": "1MiB", "bootable": True},
        {"size": "1MiB", "attributes": [0, 60, 63]},
        {"size": "1MiB", "attributes": 4},
        {"attributes": 1 << 48, "bootable": True},
    ])
    assert [(p.bootable, p.attributes) for p in table.partitions] == [
        (True, 4), (False, 1 | 1 << 60 | 1 << 63), (True, 4), (True, 1 << 48 | 4)]


def test_hybrid_default_mirrors_skip_bios_grub():
    table = plan_table("hybrid", SIZE, [dict(p) for p in GPT_LAYOUT])
    assert [p.mbr_type for p in table.partitions] == [None, "ef", "83"]
    assert table.mbr_disk_id is not None and table.mbr_disk_id.startswith("0x")
    assert int(table.mbr_disk_id, 16) != 0
    # Only the first three candidates are mirrored by default.
    four = plan_table("hybrid", SIZE, [{"size": "1MiB"}] * 4 + [{}])
    assert [p.mbr_type for p in four.partitions] == ["83", "83", "83", None, None]


def test_hybrid_explicit_mirrors():
    table = plan_table("hybrid", SIZE, [
        {"size": "1MiB", "type": "bios_grub"},
        {"size": "256MiB", "type": "esp", "hybrid": False},
        {"size": "1GiB", "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE5", "hybrid": True, "mbr_type": "0x8e", "bootable": True},
        {"type": "linux", "hybrid": True, "mbr_type": "swap"},
    ])
    assert [p.mbr_type for p in table.partitions] == [None, None, "8e", "82"]
    assert [p.bootable for p in table.partitions] == [False, False, True, False]
    assert table.partitions[2].attributes == 4
    # hybrid: false keeps a partition out of the default set too.
    table = plan_table("hybrid", SIZE, [{"size": "1MiB", "hybrid": False}, {"size": "1MiB"}, {}])
    assert [p.mbr_type for p in table.partitions] == [None, "83", "83"]


def test_deterministic_ids():
    one = plan_table("gpt", SIZE, GPT_LAYOUT)
    assert one == plan_table("gpt", SIZE, GPT_LAYOUT)
    assert serialize(one) == serialize(plan_table("gpt", SIZE, GPT_LAYOUT))
    assert one.disk_id == str(uuid.uuid5(NAMESPACE, "osimage.builder/disk")).upper()
    assert [p.uuid for p in one.partitions] == [str(uuid.uuid5(NAMESPACE, f"osimage.builder/partition/{n}")).upper() for n in (1, 2, 3)]
    other = plan_table("gpt", SIZE, GPT_LAYOUT, seed="other")
    assert other.disk_id != one.disk_id
    assert not {p.uuid for p in other.partitions} & {p.uuid for p in one.partitions}
    assert len({p.uuid for p in one.partitions} | {one.disk_id}) == 4
    assert serialize(other) != serialize(one)
    msdos = plan_table("msdos", SIZE, [{}], seed="abc")
    assert msdos.disk_id == "0x" + str(uuid.uuid5(NAMESPACE, "abc/disk"))[:8]
    assert msdos.disk_id != plan_table("msdos", SIZE, [{}], seed="abd").disk_id
    hybrid = plan_table("hybrid", SIZE, GPT_LAYOUT, seed="abc")
    assert hybrid.mbr_disk_id == "0x" + str(uuid.uuid5(NAMESPACE, "abc/mbr"))[:8]
    assert serialize(hybrid) == serialize(plan_table("hybrid", SIZE, GPT_LAYOUT, seed="abc"))


@pytest.mark.parametrize("given, expected", [
    (0x1A2B3C4D, "0x1a2b3c4d"), ("0X1A2B3C4D", "0x1a2b3c4d"), ("0x00c0ffee", "0x00c0ffee"), ("0xff", "0x000000ff"), (0, "0x00000000"),
])
def test_msdos_disk_id_forms(given, expected):
    table = plan_table("msdos", SIZE, [{"size": "1MiB"}, {}], disk_id=given)
    assert table.disk_id == expected
    assert table.partitions[1].uuid == f"{expected[2:]}-02"


def test_gpt_disk_id_and_uuids_uppercase():
    table = plan_table("gpt", SIZE, [{"uuid": "6b376f71-d030-4e8f-a7a8-11c5f2898e28"}], disk_id="1b33bf68-7c68-4b25-be50-57c2f4db6724")
    assert table.disk_id == "1B33BF68-7C68-4B25-BE50-57C2F4DB6724"
    assert table.partitions[0].uuid == "6B376F71-D030-4E8F-A7A8-11C5F2898E28"


def test_as_dict():
    table = plan_table("gpt", SIZE, GPT_LAYOUT)
    data = table.as_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) == {"label", "disk_id", "sector_size", "partitions"}
    assert data["sector_size"] == 512
    assert data["partitions"][1] == {
        "number": 2, "name": "esp", "type": ESP, "start": 2 * MiB, "size": 256 * MiB, "start_sector": 4096, "sectors": 524288,
        "uuid": table.partitions[1].uuid, "bootable": False, "attributes": 0,
    }


def test_describe():
    text = plan_table("gpt", SIZE, [dict(GPT_LAYOUT[0]), dict(GPT_LAYOUT[1], bootable=True), dict(GPT_LAYOUT[2], attributes=[60])]).describe()
    lines = text.splitlines()
    assert lines[0].startswith("label: gpt, disk id: ") and "4194304 sectors" in lines[0] and "2 GiB" in lines[0]
    assert "1: sectors 2048-4095 (2048 sectors, 1 MiB), type bios_grub (21686148-6449-6E6F-744E-656564454649), name \"bios\"" in text
    assert "type esp (C12A7328-F81F-11D2-BA4B-00A0C93EC93B)" in lines[3] and "bootable" in lines[3]
    assert "attrs \"GUID:60\"" in lines[4]
    assert text.endswith("\n")
    msdos = plan_table("msdos", SIZE, MSDOS_LAYOUT, disk_id="0x1a2b3c4d").describe()
    assert "disk id: 0x1a2b3c4d" in msdos
    assert "type linux (83), uuid 1a2b3c4d-01, bootable" in msdos and "type lvm (8e)" in msdos
    hybrid = plan_table("hybrid", SIZE, GPT_LAYOUT).describe()
    assert "hybrid MBR disk id: 0x" in hybrid and "hybrid MBR type esp (ef)" in hybrid
    empty = plan_table("gpt", SIZE, []).describe()
    assert "no partitions" in empty


# ------------------------------------------------------------ serializing

def all_tables():
    return [
        plan_table("gpt", SIZE, GPT_LAYOUT),
        plan_table("gpt", SIZE, [{"size": "1MiB", "name": "Ünïcödé \U0001F600", "bootable": True, "attributes": [0, 48, 63]},
                                 {"size": "3MiB", "type": "swap"}, {"start": "1GiB", "type": "lvm"}]),
        plan_table("gpt", SIZE, []),
        plan_table("msdos", SIZE, MSDOS_LAYOUT, disk_id="0x1a2b3c4d"),
        plan_table("msdos", SIZE, [{"start": "100MiB", "size": "1MiB"}, {"start": "1MiB", "size": "1MiB", "bootable": True}]),
        plan_table("msdos", SIZE, []),
        plan_table("hybrid", SIZE, GPT_LAYOUT),
        plan_table("hybrid", SIZE, [{"size": "1MiB", "type": "bios_grub"}, {"size": "256MiB", "type": "esp", "bootable": True, "hybrid": True},
                                    {"size": "512MiB", "type": "swap"}, {"type": "linux", "hybrid": True}]),
    ]


@pytest.mark.parametrize("table", all_tables(), ids=lambda table: f"{table.label}-{len(table.partitions)}")
def test_round_trip(table):
    assert disk_of(table).parse() == table


def test_writes_leave_boot_code_alone():
    for table in all_tables():
        writes = serialize(table)
        assert writes[0][0] == 0x1B8 and len(writes[0][1]) == 72 and writes[0][1].endswith(b"\x55\xaa")
        assert all(offset >= 0x1B8 for offset, _data in writes)
        disk = Disk().apply([(0, b"\xab" * 0x1B8)]).apply(writes)
        assert disk.read(0, 0x1B8) == b"\xab" * 0x1B8
        assert disk.parse() == table
    assert len(serialize(plan_table("msdos", SIZE, [{}]))) == 1


def test_gpt_structures_and_crcs():
    table = plan_table("gpt", SIZE, GPT_LAYOUT)
    writes = dict(serialize(table))
    assert sorted(writes) == [0x1B8, 512, 1024, (SECTORS - 33) * 512, (SECTORS - 1) * 512]
    entries = writes[1024]
    assert len(entries) == 128 * 128 and writes[(SECTORS - 33) * 512] == entries
    for lba, alternate, entries_lba in ((1, SECTORS - 1, 2), (SECTORS - 1, 1, SECTORS - 33)):
        header = writes[lba * 512]
        assert len(header) == 512 and header[92:] == bytes(420)
        fields = struct.unpack_from("<8sIIIIQQQQ16sQIII", header)
        assert fields[:3] == (b"EFI PART", 0x00010000, 92)
        check = bytearray(header[:92])
        check[16:20] = bytes(4)
        assert fields[3] == zlib.crc32(bytes(check))
        assert fields[5:9] == (lba, alternate, 34, SECTORS - 34)
        assert uuid.UUID(bytes_le=fields[9]) == uuid.UUID(table.disk_id)
        assert fields[10:13] == (entries_lba, 128, 128)
        assert fields[13] == zlib.crc32(entries)
    type_le, uuid_le, first, last, attrs, name = struct.unpack_from("<16s16sQQQ72s", entries, 128)
    assert (uuid.UUID(bytes_le=type_le), first, last, attrs) == (uuid.UUID(ESP), 4096, 528383, 0)
    assert uuid.UUID(bytes_le=uuid_le) == uuid.UUID(table.partitions[1].uuid)
    assert name == "esp".encode("utf-16-le").ljust(72, b"\0")
    assert entries[3 * 128:] == bytes(125 * 128)


def test_protective_mbr():
    tail = serialize(plan_table("gpt", SIZE, []))[0][1]
    assert tail[:6] == bytes(6)
    assert tail[6:22] == bytes.fromhex("00 000200 ee 155005 01000000 ffff3f00")  # as sgdisk -o writes it
    assert tail[22:70] == bytes(48)
    big = serialize(plan_table("gpt", 10 * GiB, []))[0][1]
    assert big[6:22] == bytes.fromhex("00 000200 ee ffffff 01000000") + struct.pack("<I", 10 * GiB // 512 - 1)
    huge = serialize(plan_table("gpt", 3 * 1024 ** 4, []))[0][1]
    assert huge[6:22] == bytes.fromhex("00 000200 ee ffffff 01000000 ffffffff")


def test_hybrid_mbr_layout():
    table = plan_table("hybrid", SIZE, [{"size": "1MiB", "type": "bios_grub"}, {"size": "256MiB", "type": "esp", "bootable": True}, {}])
    tail = serialize(table)[0][1]
    assert tail[:4] == bytes.fromhex(table.mbr_disk_id[2:])[::-1] and tail[4:6] == bytes(2)
    ee, esp, root, empty = (tail[6 + 16 * i:22 + 16 * i] for i in range(4))
    assert ee == bytes.fromhex("00 000200 ee 410100 01000000 ff0f0000")  # 0xEE first, LBA 1 to the first mirrored one - 1
    assert esp == bytes.fromhex("80 410200 ef e30320 00100000 00000800")
    assert root[4] == 0x83 and struct.unpack_from("<II", root, 8) == (528384, 3663872)
    assert empty == bytes(16)


@pytest.mark.parametrize("lba, chs", [
    (0, "000100"), (1, "000200"), (62, "003f00"), (63, "010100"), (2048, "202100"), (16065, "000101"),
    (1023 * 16065, "00c1ff"), (1024 * 16065 - 1, "feffff"), (1024 * 16065, "feffff"), (1 << 40, "feffff"),
])
def test_chs(lba, chs):
    assert _chs(lba) == bytes.fromhex(chs)


@pytest.mark.parametrize("table", [
    PartitionTable("msdos", "0x1", 100, (Partition(5, 1, 1, "83"),), 1, 99),
    PartitionTable("msdos", "nope", 100, (Partition(1, 1, 1, "83"),), 1, 99),
    PartitionTable("msdos", "0x1", 100, (Partition(1, 1, 1, "linux"),), 1, 99),
    PartitionTable("msdos", "0x1", 1 << 40, (Partition(1, 1 << 33, 1, "83"),), 1, 99),
    PartitionTable("gpt", "not-a-guid", 1000, (), 34, 966),
    PartitionTable("gpt", LINUX, 1000, (Partition(129, 34, 1, LINUX, uuid=ESP),), 34, 966),
    PartitionTable("gpt", LINUX, 1000, (Partition(1, 34, 1, "83", uuid=ESP),), 34, 966),
    PartitionTable("gpt", LINUX, 50, (), 34, 966),
    PartitionTable("hybrid", LINUX, 1000, (Partition(1, 34, 1, LINUX, uuid=ESP),), 34, 966, "0x1"),
    PartitionTable("zfs", LINUX, 1000, (), 34, 966),
])
def test_serialize_refuses_impossible_tables(table):
    with expect_error(None, "cannot be written"):
        serialize(table)


# ---------------------------------------------------------------- parsing

def test_parse_no_table():
    assert Disk().parse() is None
    assert Disk().apply([(0, b"\x01" * 510)]).parse() is None
    assert parse(Disk(100).read, 100) is None


def test_parse_empty_mbr():
    table = Disk().apply([(0x1B8, b"\x4d\x3c\x2b\x1a"), (510, b"\x55\xaa")]).parse()
    assert table == PartitionTable("msdos", "0x1a2b3c4d", SECTORS, (), 1, SECTORS - 1)


def mbr_entry(status: int, type_byte: int, start: int, sectors: int) -> bytes:
    return struct.pack("<B3sB3sII", status, b"\0\0\0", type_byte, b"\0\0\0", start, sectors)


@pytest.mark.parametrize("type_byte", [0x05, 0x0F, 0x85])
def test_parse_extended_unsupported(type_byte):
    disk = Disk().apply([(0x1BE, mbr_entry(0, 0x83, 2048, 2048) + mbr_entry(0, type_byte, 4096, 8192)), (510, b"\x55\xaa")])
    with expect_error(None, "extended/logical partitions are not supported"):
        disk.parse()


def test_parse_bad_status_byte():
    disk = Disk().apply([(0x1BE, mbr_entry(0x12, 0x83, 2048, 2048)), (510, b"\x55\xaa")])
    with expect_error(None, "status"):
        disk.parse()


def test_parse_msdos_slots_with_gaps():
    disk = Disk().apply([(0x1B8, b"\x01\0\0\0"), (0x1BE + 32, mbr_entry(0x80, 0x07, 2048, 4096)), (510, b"\x55\xaa")])
    table = disk.parse()
    assert table.partitions == (Partition(3, 2048, 4096, "7", "", "00000001-03", True, 0, None),)


def test_parse_ee_not_at_lba1_is_msdos():
    # libfdisk only takes a GPT when the 0xEE entry starts at LBA 1.
    table = plan_table("gpt", SIZE, [{}])
    disk = disk_of(table).apply([(0x1BE, mbr_entry(0, 0xEE, 2, SECTORS - 2))])
    parsed = disk.parse()
    assert parsed.label == "msdos" and parsed.partitions[0].type == "ee"


def test_parse_falls_back_to_backup_header():
    table = plan_table("gpt", SIZE, GPT_LAYOUT)
    assert disk_of(table).apply([(512 + 20, b"\xff")]).parse() == table  # header field changed, CRC no longer matches
    assert disk_of(table).apply([(1024 + 200, b"\xff")]).parse() == table  # entry array changed
    assert disk_of(table).apply([(512, bytes(512))]).parse() == table  # primary header wiped
    hybrid = plan_table("hybrid", SIZE, GPT_LAYOUT)
    assert disk_of(hybrid).apply([(512, bytes(512))]).parse() == hybrid


def test_parse_both_headers_bad():
    table = plan_table("gpt", SIZE, GPT_LAYOUT)
    disk = disk_of(table).apply([(512 + 20, b"\xff"), ((SECTORS - 1) * 512 + 20, b"\xff")])
    with expect_error(None, "both", "CRC"):
        disk.parse()


def test_parse_hybrid_entry_without_gpt_partition():
    table = plan_table("hybrid", SIZE, GPT_LAYOUT)
    disk = disk_of(table).apply([(0x1BE + 48, mbr_entry(0, 0x83, 100000, 100))])
    with expect_error(None, "does not mirror a GPT partition"):
        disk.parse()


def test_parse_hybrid_flag_needs_both_bits():
    table = plan_table("hybrid", SIZE, [{"size": "1MiB", "bootable": True}, {}])
    # Clear the MBR's active flag: the partition is no longer bootable as a whole, the GPT bit stays.
    parsed = disk_of(table).apply([(0x1BE + 16, b"\x00")]).parse()
    assert (parsed.partitions[0].bootable, parsed.partitions[0].attributes) == (False, 4)


def test_parse_short_reads():
    table = plan_table("gpt", SIZE, GPT_LAYOUT)
    disk = disk_of(table)
    # A short read is padded with zeros, as a sparse disk would read: half a sector 0 has no 55 AA.
    assert parse(lambda offset, length: disk.read(offset, length)[: length // 2], SIZE) is None
    with pytest.raises(BuildError):
        parse(lambda offset, length: disk.read(offset, length) if offset == 0 else b"", SIZE)


def test_parse_disk_grown_after_writing():
    table = plan_table("gpt", SIZE, GPT_LAYOUT)
    grown = Disk(SIZE + 100 * MiB).apply(serialize(table)).parse()
    assert grown.partitions == table.partitions and grown.last_lba == table.last_lba
    assert grown.disk_sectors == SECTORS + 204800


# Random sectors must never make parse raise anything but BuildError.
def _garbage_disk(sector0: bytes, header: bytes, entries: bytes, backup: bytes, size: int) -> Disk:
    return Disk(size).apply([(0, sector0), (512, header), (1024, entries), (size - 512, backup)])


def _with_crc(header: bytes, entries: bytes) -> bytes:
    raw = bytearray(header.ljust(512, b"\0"))
    raw[0:8] = b"EFI PART"
    raw[12:16] = struct.pack("<I", 92 + raw[12] % 64)
    raw[24:32] = struct.pack("<Q", 1)
    raw[72:80] = struct.pack("<Q", 2)
    raw[80:88] = struct.pack("<II", 1 + raw[80] % 160, 128 * (1 + raw[84] % 2))
    raw[88:92] = struct.pack("<I", zlib.crc32(entries[:struct.unpack_from("<I", raw, 80)[0] * struct.unpack_from("<I", raw, 84)[0]])
                             if len(entries) else 0)
    raw[16:20] = bytes(4)
    size = struct.unpack_from("<I", raw, 12)[0]
    raw[16:20] = struct.pack("<I", zlib.crc32(bytes(raw[:size])))
    return bytes(raw)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sector0=st.binary(min_size=0, max_size=512),
    signature=st.booleans(),
    protective=st.booleans(),
    header=st.binary(min_size=0, max_size=512),
    entries=st.binary(min_size=0, max_size=4096),
    valid_crc=st.booleans(),
    size=st.sampled_from([0, 511, 512, 40 * 512, 1 * MiB, SIZE]),
)
def test_parse_garbage_only_raises_build_error(sector0, signature, protective, header, entries, valid_crc, size):
    sector0 = bytearray(sector0.ljust(512, b"\0"))
    if signature:
        sector0[510:512] = b"\x55\xaa"
    if protective:
        sector0[0x1BE:0x1CE] = mbr_entry(sector0[0x1BE] & 0x80, 0xEE, 1, max(1, size // 512 - 1))
    if valid_crc:
        header = _with_crc(header, entries.ljust(4096, b"\0"))
    disk = _garbage_disk(bytes(sector0), header, entries, header, max(size, 2048))
    try:
        table = parse(disk.read, size)
    except BuildError:
        return
    if table is not None:
        table.describe()
        json.dumps(table.as_dict())


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 32 - 1)),
                        min_size=4, max_size=4))
def test_parse_random_mbr_entries(entries):
    tail = b"".join(mbr_entry(*entry) for entry in entries) + b"\x55\xaa"
    disk = Disk().apply([(0x1BE, tail)])
    try:
        table = disk.parse()
    except BuildError:
        return
    assert table.label in ("msdos", "gpt", "hybrid")
    table.describe()


# ---------------------------------------------------------- clear_writes

def test_clear_writes():
    gpt = plan_table("gpt", SIZE, GPT_LAYOUT)
    msdos = plan_table("msdos", SIZE, [{}])
    hybrid = plan_table("hybrid", SIZE, GPT_LAYOUT)
    writes = clear_writes(gpt, SIZE)
    assert writes == [(512, bytes(33 * 512)), ((SECTORS - 33) * 512, bytes(33 * 512))]
    assert clear_writes(hybrid, SIZE, msdos) == writes
    assert clear_writes(gpt, SIZE, gpt) == [] and clear_writes(gpt, SIZE, hybrid) == []
    assert clear_writes(msdos, SIZE) == [] and clear_writes(None, SIZE) == []
    disk = disk_of(gpt).apply(clear_writes(gpt, SIZE, msdos)).apply(serialize(msdos))
    assert disk.parse() == msdos
    assert disk.read(512, 33 * 512) == bytes(33 * 512) and disk.read(SIZE - 33 * 512, 33 * 512) == bytes(33 * 512)
    assert clear_writes(gpt, 1024) == [(512, bytes(512))]


# ------------------------------------------------------------ real tools

def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not path:
        pytest.fail(f"{name} is needed by this test and is not installed (apt-get install fdisk gdisk parted util-linux)")
    return path


def run(name: str, *args: str, check: bool = True) -> str:
    proc = subprocess.run([tool(name), *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{name} {' '.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def make_image(path, size: int = SIZE, writes: list[tuple[int, bytes]] | None = None) -> str:
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset, data in writes or []:
            handle.seek(offset)
            handle.write(data)
    return str(path)


def apply_writes(path: str, writes: list[tuple[int, bytes]]) -> None:
    with open(path, "r+b") as handle:
        for offset, data in writes:
            handle.seek(offset)
            handle.write(data)


def file_reader(path: str):
    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(length)
    return read


def read_bytes(path: str, offset: int, length: int) -> bytes:
    return file_reader(path)(offset, length)


def sfdisk_json(path: str, *extra: str) -> dict:
    return json.loads(run("sfdisk", "--json", *extra, path))["partitiontable"]


def sfdisk_view(table: PartitionTable) -> list[dict]:
    """The partitions as `sfdisk --json` prints them for ``table``."""
    out = []
    for part in table.partitions:
        entry = {"start": part.start_sector, "size": part.sectors, "type": part.type}
        if table.label != "msdos":
            entry["uuid"] = part.uuid
            if part.name:
                entry["name"] = part.name
        elif part.bootable:
            entry["bootable"] = True
        out.append(entry)
    return out


def strip_nodes(partitions: list[dict]) -> list[dict]:
    return [{key: value for key, value in part.items() if key not in ("node", "attrs")} for part in partitions]


def check_parted(path: str, names: list[str]) -> str:
    out = run("parted", "-s", path, "unit", "s", "print")
    assert "Error" not in out and "Warning" not in out, out
    for name in names:
        assert name in out
    return out


def test_gpt_read_by_tools(tmp_path):
    table = plan_table("gpt", SIZE, [dict(GPT_LAYOUT[0]), dict(GPT_LAYOUT[1], bootable=True), dict(GPT_LAYOUT[2], attributes=[60, 63])])
    path = make_image(tmp_path / "gpt.img", writes=serialize(table))
    info = sfdisk_json(path)
    assert (info["label"], info["id"], info["firstlba"], info["lastlba"], info["sectorsize"]) == ("gpt", table.disk_id, 34, SECTORS - 34, 512)
    assert strip_nodes(info["partitions"]) == sfdisk_view(table)
    assert [p.get("attrs") for p in info["partitions"]] == [None, "LegacyBIOSBootable", "GUID:60,63"]
    assert [(p["start"], p["size"]) for p in info["partitions"]] == [(2048, 2048), (4096, 524288), (528384, 3663872)]
    assert "No problems found" in run("sgdisk", "-v", path)
    out = check_parted(path, ["bios", "esp", "root"])
    assert "Partition Table: gpt" in out and "2048s" in out and "528384s" in out and "4192255s" in out
    assert parse(file_reader(path), SIZE) == table


def test_gpt_bytes_identical_to_sgdisk(tmp_path):
    table = plan_table("gpt", SIZE, [dict(GPT_LAYOUT[0]), dict(GPT_LAYOUT[1], bootable=True), dict(GPT_LAYOUT[2], attributes=[60, 63])])
    path = make_image(tmp_path / "sgdisk.img")
    args = ["-o", "-U", table.disk_id]
    for part, code in zip(table.partitions, ("ef02", "ef00", "8304")):
        args += [f"-n{part.number}:{part.start_sector}:{part.end_sector}", f"-t{part.number}:{code}", f"-c{part.number}:{part.name}",
                 f"-u{part.number}:{part.uuid}"]
    args += ["-A2:set:2", "-A3:set:60", "-A3:set:63"]
    run("sgdisk", *args, path)
    mine = Disk().apply(serialize(table))
    for offset, length in ((0x1B8, 72), (512, 33 * 512), (SIZE - 33 * 512, 33 * 512)):
        assert read_bytes(path, offset, length) == mine.read(offset, length), hex(offset)


def test_msdos_read_by_tools(tmp_path):
    table = plan_table("msdos", SIZE, MSDOS_LAYOUT, disk_id="0x1a2b3c4d")
    path = make_image(tmp_path / "msdos.img", writes=serialize(table))
    info = sfdisk_json(path)
    assert (info["label"], info["id"]) == ("dos", "0x1a2b3c4d")
    assert strip_nodes(info["partitions"]) == sfdisk_view(table)
    # sfdisk --json shows no msdos partition uuids; libblkid (partx) makes them "<disk id>-<NN>".
    partx = run("partx", "-g", "-o", "NR,START,SECTORS,UUID,FLAGS", "-s", path).split("\n")
    rows = [line.split() for line in partx if line.strip()]
    assert [row[3] for row in rows] == [p.uuid for p in table.partitions]
    assert [row[4] for row in rows] == ["0x80", "0x0", "0x0", "0x0"]
    out = check_parted(path, ["boot", "lvm"])
    assert "Partition Table: msdos" in out and "616448s" in out and "4194303s" in out
    # sfdisk writes the very same 72 bytes (CHS fields included) for the same layout.
    ref = make_image(tmp_path / "ref.img")
    run_input("sfdisk", "label: dos\nlabel-id: 0x1a2b3c4d\nstart=2048, size=100MiB, type=83, bootable\nsize=100MiB, type=82\n"
                        "size=100MiB, type=ef\ntype=8e\n", "-q", ref)
    assert read_bytes(ref, 0x1B8, 72) == serialize(table)[0][1]


def run_input(name: str, stdin: str, *args: str) -> str:
    proc = subprocess.run([tool(name), *args], input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{name} {' '.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc.stdout


def test_hybrid_read_by_tools(tmp_path):
    table = plan_table("hybrid", SIZE, [dict(GPT_LAYOUT[0]), dict(GPT_LAYOUT[1], bootable=True), dict(GPT_LAYOUT[2])])
    path = make_image(tmp_path / "hybrid.img", writes=serialize(table))
    info = sfdisk_json(path)
    assert (info["label"], info["id"], info["firstlba"], info["lastlba"]) == ("gpt", table.disk_id, 34, SECTORS - 34)
    assert strip_nodes(info["partitions"]) == sfdisk_view(table)
    verify = run("sgdisk", "-v", path)
    assert "No problems found" in verify
    # The MBR half: fdisk -t dos / sfdisk --label-nested dos read sector 0 of a GPT disk.
    mbr = sfdisk_json(path, "--label-nested", "dos")
    assert (mbr["label"], mbr["id"]) == ("dos", table.mbr_disk_id)
    assert strip_nodes(mbr["partitions"]) == [
        {"start": 1, "size": 4095, "type": "ee"},
        {"start": 4096, "size": 524288, "type": "ef", "bootable": True},
        {"start": 528384, "size": 3663872, "type": "83"},
    ]
    fdisk = run("fdisk", "-l", "-t", "dos", path)
    assert "Disklabel type: dos" in fdisk and " ee GPT" in fdisk and "not in disk order" not in fdisk
    out = check_parted(path, ["bios", "esp", "root"])
    assert "Partition Table: gpt" in out
    assert parse(file_reader(path), SIZE) == table


def test_hybrid_mbr_identical_to_sgdisk(tmp_path):
    table = plan_table("hybrid", SIZE, GPT_LAYOUT)
    path = make_image(tmp_path / "sgdisk.img", writes=serialize(plan_table("gpt", SIZE, GPT_LAYOUT)))
    run("sgdisk", "-h", "2:3", path)
    assert read_bytes(path, 0x1BE, 66) == serialize(table)[0][1][6:]


@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_fill_matches_sfdisk(tmp_path, label):
    for extra in (0, 100, 2047, 2100):
        size = SIZE + extra * SECTOR_SIZE
        ref = make_image(tmp_path / f"{label}-{extra}.img", size)
        run_input("sfdisk", f"label: {label}\nsize=100MiB\nsize=50MiB\n,\n", "-q", ref)
        want = [(p["start"], p["size"]) for p in sfdisk_json(ref)["partitions"]]
        mine = plan_table("msdos" if label == "dos" else "gpt", size, [{"size": "100MiB"}, {"size": "50MiB"}, {}])
        assert [(p.start_sector, p.sectors) for p in mine.partitions] == want, extra


def test_parse_sfdisk_msdos(tmp_path):
    path = make_image(tmp_path / "dos.img")
    run_input("sfdisk", "label: dos\nlabel-id: 0xdeadbeef\nstart=2048, size=64MiB, type=c, bootable\nsize=64MiB, type=82\n"
                        "start=400MiB, type=83\n", "-q", path)
    table = parse(file_reader(path), SIZE)
    info = sfdisk_json(path)
    assert (table.label, table.disk_id) == ("msdos", info["id"])
    assert sfdisk_view(table) == strip_nodes(info["partitions"])
    assert [p.uuid for p in table.partitions] == ["deadbeef-01", "deadbeef-02", "deadbeef-03"]
    # A table sfdisk wrote is also one we write identically.
    assert read_bytes(path, 0x1B8, 72) == serialize(table)[0][1]


def test_parse_sfdisk_gpt(tmp_path):
    path = make_image(tmp_path / "gpt.img")
    run_input("sfdisk", "label: gpt\nlabel-id: 11111111-2222-3333-4444-555555555555\n"
                        "size=1MiB, type=21686148-6449-6E6F-744E-656564454649, name=bios\n"
                        "size=256MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"EFI system\", attrs=\"LegacyBIOSBootable GUID:60\"\n"
                        "name=root, uuid=6b376f71-d030-4e8f-a7a8-11c5f2898e28\n", "-q", path)
    table = parse(file_reader(path), SIZE)
    info = sfdisk_json(path)
    assert (table.label, table.disk_id, table.first_lba, table.last_lba) == ("gpt", info["id"], info["firstlba"], info["lastlba"])
    assert sfdisk_view(table) == strip_nodes(info["partitions"])
    assert [p.attributes for p in table.partitions] == [0, 4 | 1 << 60, 0]
    assert [p.bootable for p in table.partitions] == [False, True, False]
    assert table.partitions[2].uuid == "6B376F71-D030-4E8F-A7A8-11C5F2898E28"


def test_parse_sgdisk_hybrid(tmp_path):
    path = make_image(tmp_path / "hybrid.img")
    run("sgdisk", "-o", "-n1:2048:+1M", "-t1:ef02", "-c1:bios", "-n2:0:+256M", "-t2:ef00", "-c2:esp", "-n3:0:0", "-t3:8304", "-c3:root",
        "-h2:3:EE", path)
    run("sfdisk", "--label-nested", "dos", "--activate", path, "2")  # MBR slot 2 mirrors GPT partition 3
    run("sgdisk", "-A3:set:2", path)
    table = parse(file_reader(path), SIZE)
    info = sfdisk_json(path)
    assert (table.label, table.disk_id, table.first_lba, table.last_lba) == ("hybrid", info["id"], info["firstlba"], info["lastlba"])
    assert sfdisk_view(table) == strip_nodes(info["partitions"])
    mbr = sfdisk_json(path, "--label-nested", "dos")
    assert table.mbr_disk_id == mbr["id"]
    mirrored = {(p["start"], p["size"]): p for p in mbr["partitions"] if p["type"] != "ee"}
    assert [p.mbr_type for p in table.partitions] == [None] + [mirrored[(p.start_sector, p.sectors)]["type"] for p in table.partitions[1:]]
    assert [p.bootable for p in table.partitions] == [False, False, True]


def test_msdos_replacing_gpt_leaves_no_stale_gpt(tmp_path):
    gpt = plan_table("gpt", SIZE, GPT_LAYOUT)
    msdos = plan_table("msdos", SIZE, [{"size": "100MiB"}, {}])
    path = make_image(tmp_path / "img", writes=serialize(gpt))
    old = parse(file_reader(path), SIZE)
    apply_writes(path, clear_writes(old, SIZE, msdos) + serialize(msdos))
    signatures = run("wipefs", "-n", "--output", "TYPE", path).split()
    assert signatures[1:] == ["dos"], signatures
    assert sfdisk_json(path)["label"] == "dos"
    assert parse(file_reader(path), SIZE) == msdos
