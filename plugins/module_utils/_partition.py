# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""MBR (``msdos``), GPT and hybrid partition tables: plan, serialize, parse and describe them.

Only 512-byte sectors. The bytes written are those ``sfdisk`` and ``sgdisk`` would write
for the same table (``sgdisk``'s CHS conventions, ``sfdisk``'s way of filling the disk),
so ``sfdisk --json``, ``sgdisk -v`` and ``parted`` read the result as planned.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import re
import struct
import typing as t
import uuid as uuidlib
import zlib
from dataclasses import dataclass
from decimal import Decimal

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._sizes import (
    align_down, align_up, format_size, parse_percent, parse_size,
)

SECTOR_SIZE = 512
LABELS = ("msdos", "gpt", "hybrid")

# alias -> (GPT type GUID, MBR type byte or None); GUIDs as `sfdisk --list-types -X gpt` prints them.
TYPE_ALIASES: dict[str, tuple[str, str | None]] = {
    "linux": ("0FC63DAF-8483-4772-8E79-3D69D8477DE4", "83"),
    "esp": ("C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "ef"),
    "bios_grub": ("21686148-6449-6E6F-744E-656564454649", None),
    "swap": ("0657FD6D-A4AB-43C4-84E5-0933C84B4F4F", "82"),
    "linux-root-x86-64": ("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "83"),
    "xbootldr": ("BC13C2FF-59E6-4262-A352-B275FD6F7172", "ea"),
    "lvm": ("E6D6D379-F507-44C2-A23C-238F2A3DF928", "8e"),
}

# Changing this changes every derived disk id and partition GUID of every build.
NAMESPACE = uuidlib.uuid5(uuidlib.NAMESPACE_URL, "https://osimage.builder/")
DEFAULT_SEED = "osimage.builder"

GPT_SIGNATURE = b"EFI PART"
GPT_REVISION = 0x00010000
GPT_HEADER_SIZE = 92
GPT_ENTRIES = 128
GPT_ENTRY_SIZE = 128
GPT_ENTRIES_SECTORS = GPT_ENTRIES * GPT_ENTRY_SIZE // SECTOR_SIZE
# MBR, header, entries: the first LBA a partition may use (sgdisk's default).
GPT_FIRST_USABLE = 2 + GPT_ENTRIES_SECTORS
# Backup entries and backup header at the end of the disk.
GPT_BACKUP_SECTORS = GPT_ENTRIES_SECTORS + 1
GPT_MIN_SECTORS = GPT_FIRST_USABLE + GPT_BACKUP_SECTORS + 1
GPT_NAME_UNITS = 36

MBR_TAIL_OFFSET = 0x1B8
MBR_ENTRIES_OFFSET = 0x1BE
MBR_MAX = 0xFFFFFFFF
MBR_MAX_PRIMARY = 4
HYBRID_MAX_MIRRORED = 3
MBR_EXTENDED = (0x05, 0x0F, 0x85)
MBR_PROTECTIVE = 0xEE
MBR_ACTIVE = 0x80
ATTR_LEGACY_BOOTABLE = 1 << 2

_CHS_HEADS = 255
_CHS_SECTORS = 63
_CHS_LIMIT = 1024 * _CHS_HEADS * _CHS_SECTORS

# A foreign GPT may use another entry count; anything past these bounds is garbage, not a table.
_GPT_MAX_ARRAY_BYTES = 4 * 1024 * 1024
_GPT_MAX_ENTRY_SIZE = 4096

_PARTITION_KEYS = ("name", "type", "size", "start", "bootable", "uuid", "attributes", "hybrid", "mbr_type")
_GUID_RE = re.compile(r"^\{?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}?$")
_HEX_BYTE_RE = re.compile(r"^(?:0[xX])?([0-9a-fA-F]{1,2})$")
_MBR_ID_RE = re.compile(r"^0[xX]([0-9a-fA-F]{1,8})$")
_ZERO_GUID = "00000000-0000-0000-0000-000000000000"
_ATTR_NAMES = {0: "RequiredPartition", 1: "NoBlockIOProtocol", 2: "LegacyBIOSBootable"}

_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
_MBR_ENTRY = struct.Struct("<B3sB3sII")


@dataclass(frozen=True)
class Partition:
    """One partition; ``type``/``uuid`` are spelled the way ``sfdisk --json`` spells them.

    msdos: ``number`` is the MBR slot, ``type`` the type byte without leading zero ("83", "c"), ``uuid``
    the PARTUUID libblkid derives ("1a2b3c4d-01"). gpt/hybrid: upper-case GUIDs; ``bootable`` is
    attribute bit 2 (and, on a partition a hybrid MBR mirrors, also that entry's 0x80 flag);
    ``mbr_type`` is the mirrored entry's type byte on hybrid, else None.
    """

    number: int
    start_sector: int
    sectors: int
    type: str
    name: str = ""
    uuid: str = ""
    bootable: bool = False
    attributes: int = 0
    mbr_type: str | None = None

    @property
    def end_sector(self) -> int:
        return self.start_sector + self.sectors - 1

    def as_dict(self) -> dict[str, t.Any]:
        return {
            "number": self.number,
            "name": self.name,
            "type": self.type,
            "start": self.start_sector * SECTOR_SIZE,
            "size": self.sectors * SECTOR_SIZE,
            "start_sector": self.start_sector,
            "sectors": self.sectors,
            "uuid": self.uuid,
            "bootable": self.bootable,
            "attributes": self.attributes,
        }


@dataclass(frozen=True)
class PartitionTable:
    """A whole table. ``first_lba``/``last_lba`` are what ``sfdisk --json`` reports as firstlba/lastlba on GPT;
    on msdos 1 and the last sector an MBR can address (the disk's last, below 2 TiB).

    ``mbr_disk_id`` is the disk signature of a hybrid MBR (``0x...``); None for msdos (it is
    ``disk_id`` there) and gpt (whose protective MBR carries 0, as sfdisk and sgdisk write it).
    """

    label: str
    disk_id: str
    disk_sectors: int
    partitions: tuple[Partition, ...]
    first_lba: int
    last_lba: int
    mbr_disk_id: str | None = None

    def as_dict(self) -> dict[str, t.Any]:
        return {
            "label": self.label,
            "disk_id": self.disk_id,
            "sector_size": SECTOR_SIZE,
            "partitions": [part.as_dict() for part in self.partitions],
        }

    def describe(self) -> str:
        size = self.disk_sectors * SECTOR_SIZE
        lines = [f"label: {self.label}, disk id: {self.disk_id}, {self.disk_sectors} sectors of {SECTOR_SIZE} bytes ({format_size(size)})"]
        if self.label != "msdos":
            lines.append(f"usable sectors: {self.first_lba}-{self.last_lba}")
        if self.mbr_disk_id is not None:
            lines.append(f"hybrid MBR disk id: {self.mbr_disk_id}")
        if not self.partitions:
            lines.append("no partitions")
        for part in self.partitions:
            text = (f"{part.number:>3}: sectors {part.start_sector}-{part.end_sector} ({part.sectors} sectors, "
                    f"{format_size(part.sectors * SECTOR_SIZE)}), type {_type_text(part.type)}")
            if part.name:
                text += f", name {_quote(part.name)}"
            text += f", uuid {part.uuid}"
            flags = []
            if part.bootable:
                flags.append("bootable")
            other = part.attributes & ~ATTR_LEGACY_BOOTABLE if part.bootable else part.attributes
            if other:
                flags.append(f"attrs \"{_attribute_text(part.attributes)}\"")
            if part.mbr_type is not None:
                flags.append(f"hybrid MBR type {_type_text(part.mbr_type)}")
            if flags:
                text += ", " + ", ".join(flags)
            lines.append(text)
        return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _alias_of(value: str) -> str | None:
    for alias, (guid, mbr) in TYPE_ALIASES.items():
        if value in (guid, mbr):
            return alias
    return None


def _type_text(value: str) -> str:
    alias = _alias_of(value)
    return f"{alias} ({value})" if alias else value


def _attribute_text(attributes: int) -> str:
    """The attributes the way ``sfdisk -d`` writes them: ``LegacyBIOSBootable GUID:60,63``."""
    words = [_ATTR_NAMES[bit] for bit in sorted(_ATTR_NAMES) if attributes >> bit & 1]
    reserved = [str(bit) for bit in range(3, 48) if attributes >> bit & 1]
    if reserved:
        words.append("bits:" + ",".join(reserved))
    guid_bits = [str(bit) for bit in range(48, 64) if attributes >> bit & 1]
    if guid_bits:
        words.append("GUID:" + ",".join(guid_bits))
    return " ".join(words)


# ----------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------

def _aliases_text() -> str:
    return ", ".join(TYPE_ALIASES)


def _norm_alias(value: str) -> str:
    return value.strip().lower().replace("-", "_")


_ALIAS_BY_NORM = {_norm_alias(alias): alias for alias in TYPE_ALIASES}


def _lookup_alias(value: str) -> str | None:
    return _ALIAS_BY_NORM.get(_norm_alias(value))


def _check_mbr_byte(byte: int, option: str, what: str) -> str:
    if byte == 0:
        raise BuildError(f"{what} 00 marks an unused MBR entry; use a real type such as 83 (linux) or ef (esp)", option=option)
    if byte in MBR_EXTENDED:
        raise BuildError(f"{what} {byte:02x} is an extended partition; extended/logical partitions are not supported, "
                         "use at most 4 primary partitions or label gpt", option=option)
    if byte == MBR_PROTECTIVE:
        raise BuildError(f"{what} ee is the GPT protective type; use label gpt or hybrid instead of writing it by hand", option=option)
    return f"{byte:x}"


def _mbr_type(value: object, option: str) -> str:
    """An MBR type byte from an alias or hex text, as sfdisk prints it: "83", "ef", "c" (no leading zero)."""
    if not isinstance(value, str) or not value.strip():
        raise BuildError(f"{value!r} is not a partition type; quote a hex byte ('83', '0xef') or use an alias: {_aliases_text()}",
                         option=option)
    alias = _lookup_alias(value)
    if alias is not None:
        mbr = TYPE_ALIASES[alias][1]
        if mbr is None:
            raise BuildError(f"{alias} has no MBR type: on msdos GRUB embeds core.img in the gap after the MBR, so drop this "
                             "partition, or use label gpt or hybrid", option=option)
        return mbr
    match = _HEX_BYTE_RE.match(value.strip())
    if match:
        return _check_mbr_byte(int(match.group(1), 16), option, "type")
    if _GUID_RE.match(value.strip()):
        raise BuildError(f"{value} is a GPT type GUID, but an MBR partition takes a type byte; use an alias "
                         f"({_aliases_text()}) or a hex byte such as 83", option=option)
    raise BuildError(f"{value!r} is not a known partition type; use an alias ({_aliases_text()}) or a hex byte such as 83",
                     option=option)


def _gpt_type(value: object, option: str) -> tuple[str, str | None]:
    """(GPT type GUID, MBR byte of the alias or None) from an alias or a raw GUID."""
    if not isinstance(value, str) or not value.strip():
        raise BuildError(f"{value!r} is not a partition type; use an alias ({_aliases_text()}) or a type GUID", option=option)
    alias = _lookup_alias(value)
    if alias is not None:
        return TYPE_ALIASES[alias]
    text = value.strip()
    if _GUID_RE.match(text):
        guid = str(uuidlib.UUID(text)).upper()
        if guid == _ZERO_GUID:
            raise BuildError("the all-zero GUID marks an unused GPT entry; use a real type GUID or an alias", option=option)
        return guid, None
    match = _HEX_BYTE_RE.match(text)
    if match:
        byte = f"{int(match.group(1), 16):x}"
        hints = [alias for alias, (_guid, mbr) in TYPE_ALIASES.items() if mbr == byte]
        hint = f" (for {byte} use {' or '.join(hints)})" if hints else ""
        raise BuildError(f"{value!r} is an MBR type byte, but a GPT partition takes a type GUID; use an alias{hint} "
                         f"or a GUID. Aliases: {_aliases_text()}", option=option)
    raise BuildError(f"{value!r} is not a known partition type; use an alias ({_aliases_text()}) or a type GUID "
                     "such as 0FC63DAF-8483-4772-8E79-3D69D8477DE4", option=option)


def _guid(value: object, option: str, what: str) -> str:
    if not isinstance(value, str) or not _GUID_RE.match(value.strip()):
        raise BuildError(f"{value!r} is not a GUID; write {what} like 1B33BF68-7C68-4B25-BE50-57C2F4DB6724", option=option)
    guid = str(uuidlib.UUID(value.strip())).upper()
    if guid == _ZERO_GUID:
        raise BuildError(f"the all-zero GUID is not a valid {what}; leave it unset to derive one from seed", option=option)
    return guid


def _msdos_disk_id(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= MBR_MAX:
            return value
        raise BuildError(f"{value} does not fit the 32-bit MBR disk signature; use 0x followed by 8 hex digits, e.g. 0x1a2b3c4d",
                         option="disk_id")
    if isinstance(value, str):
        match = _MBR_ID_RE.match(value.strip())
        if match:
            return int(match.group(1), 16)
    raise BuildError(f"{value!r} is not an MBR disk id; write 0x followed by 8 hex digits, e.g. 0x1a2b3c4d "
                     "(a GUID is a disk id for label gpt or hybrid)", option="disk_id")


def _derived_uuid(seed: str, what: str) -> uuidlib.UUID:
    return uuidlib.uuid5(NAMESPACE, f"{seed}/{what}")


def _derived_mbr_id(seed: str, what: str) -> int:
    # Windows and blkid treat signature 0 as "none", so skip it should the hash ever give it.
    name = f"{seed}/{what}"
    counter = 0
    while True:
        value = int.from_bytes(uuidlib.uuid5(NAMESPACE, name).bytes[:4], "big")
        if value:
            return value
        counter += 1
        name = f"{seed}/{what}/{counter}"


def _attributes(value: object, option: str) -> int:
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < 1 << 64:
            return value
        raise BuildError(f"{value} does not fit the 64-bit GPT attribute field; give an integer 0..2**64-1 or a list of bit numbers 0-63",
                         option=option)
    if isinstance(value, (list, tuple)):
        bits = 0
        for bit in value:
            if isinstance(bit, str) and bit.strip().isdigit():
                bit = int(bit.strip())
            if isinstance(bit, bool) or not isinstance(bit, int) or not 0 <= bit <= 63:
                raise BuildError(f"{bit!r} is not a GPT attribute bit; list bit numbers 0-63 (2 = legacy BIOS bootable)", option=option)
            bits |= 1 << bit
        return bits
    raise BuildError(f"{value!r} is not GPT attributes; give an integer or a list of bit numbers 0-63, e.g. [0, 60]", option=option)


def _bool(value: object, option: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    raise BuildError(f"{value!r} is not a boolean; write true or false", option=option)


def _name(value: object, option: str, label: str) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise BuildError(f"{value!r} is not a partition name; quote it as a string", option=option)
    if label == "msdos":
        raise BuildError("MBR partitions have no names; remove name (refer to the partition by number) or use label gpt or hybrid",
                         option=option)
    if "\x00" in value:
        raise BuildError("a GPT partition name cannot contain a NUL character", option=option)
    try:
        units = len(value.encode("utf-16-le")) // 2
    except UnicodeEncodeError:
        raise BuildError(f"{value!r} cannot be stored as UTF-16; use ordinary characters", option=option)
    if units > GPT_NAME_UNITS:
        raise BuildError(f"the name is {units} UTF-16 code units long, but a GPT name holds at most {GPT_NAME_UNITS}; shorten it",
                         option=option)
    return value


def _sector_bytes(value: int, option: str, what: str) -> int:
    if value % SECTOR_SIZE:
        lower, upper = align_down(value, SECTOR_SIZE), align_up(value, SECTOR_SIZE)
        raise BuildError(f"{what} {value} bytes is not a whole number of {SECTOR_SIZE}-byte sectors; use {lower} or {upper}",
                         option=option)
    return value // SECTOR_SIZE


@dataclass
class _Spec:
    index: int
    raw: dict[str, t.Any]
    start: int = 0
    sectors: int = 0
    explicit_start: bool = False

    @property
    def end(self) -> int:
        return self.start + self.sectors - 1

    def opt(self, key: str | None = None) -> str:
        return f"partitions[{self.index}]" + (f".{key}" if key else "")


def _given(raw: dict[str, t.Any], key: str) -> bool:
    return raw.get(key) is not None


def _disk_too_small(need_sectors: int, trailing: int) -> str:
    need = (need_sectors + trailing) * SECTOR_SIZE
    return f"the disk must be at least {need} bytes ({format_size(need)}): grow the image (disk_image size) or make the partitions smaller"


def _place(specs: list[_Spec], label: str, disk_size: int, disk_sectors: int, first_lba: int, last_lba: int, align: int) -> None:
    trailing = GPT_BACKUP_SECTORS if label != "msdos" else 0
    prev_end = first_lba - 1
    for pos, spec in enumerate(specs):
        raw = spec.raw
        if _given(raw, "start"):
            start_bytes = parse_size(raw["start"], spec.opt("start"))
            spec.start = _sector_bytes(start_bytes, spec.opt("start"), "start")
            spec.explicit_start = True
            if spec.start < first_lba:
                where = "the GPT header and entries end at sector 33" if label != "msdos" else "sector 0 holds the MBR"
                raise BuildError(f"the partition starts at sector {spec.start}, before the first usable sector {first_lba} ({where}); "
                                 f"give a start of at least {first_lba * SECTOR_SIZE} bytes, or leave start unset", option=spec.opt("start"))
        else:
            spec.start = align_up(prev_end + 1, align)
        if spec.start > last_lba:
            raise BuildError(f"the partition would start at sector {spec.start}, past the last usable sector {last_lba}; "
                             + _disk_too_small(spec.start + 1, trailing), option=spec.opt("start" if spec.explicit_start else "size"))
        last = pos == len(specs) - 1
        if not _given(raw, "size"):
            if not last:
                raise BuildError("size is required on every partition but the last (which fills the rest of the disk); give a size "
                                 "such as 512MiB or 25%", option=spec.opt("size"))
            end = last_lba
            if label != "msdos":
                # sfdisk ends a GPT disk's last partition on an alignment boundary; on msdos it runs to the last sector.
                aligned = align_down(last_lba + 1, align) - 1
                if aligned >= spec.start:
                    end = aligned
            spec.sectors = end - spec.start + 1
        else:
            percent = parse_percent(raw["size"])
            if percent is not None:
                if percent <= 0 or percent > 100:
                    raise BuildError(f"{raw['size']!r} is not a percentage of the disk between 0% and 100%", option=spec.opt("size"))
                sectors = int(Decimal(disk_size) * percent / 100) // SECTOR_SIZE
                # Round to the alignment so the next partition starts right after this one.
                spec.sectors = align_down(sectors, align) if sectors >= align else sectors
            else:
                spec.sectors = _sector_bytes(parse_size(raw["size"], spec.opt("size")), spec.opt("size"), "size")
            if spec.sectors <= 0:
                raise BuildError("the partition size is 0; give a positive size such as 512MiB, or omit size on the last partition "
                                 "to fill the disk", option=spec.opt("size"))
            if spec.end > last_lba:
                if label == "msdos" and disk_sectors > MBR_MAX:
                    raise BuildError(f"the partition ends at sector {spec.end}, but an MBR addresses at most {MBR_MAX + 1} sectors "
                                     "(2 TiB); make it smaller or use label gpt", option=spec.opt("size"))
                raise BuildError(f"the partition ends at sector {spec.end}, past the last usable sector {last_lba}; "
                                 + _disk_too_small(spec.end + 1, trailing), option=spec.opt("size"))
        prev_end = spec.end


def _check_overlaps(specs: list[_Spec]) -> None:
    ordered = sorted(specs, key=lambda spec: (spec.start, spec.index))
    for before, after in zip(ordered, ordered[1:]):
        if after.start <= before.end:
            later, other = (after, before) if after.index > before.index else (before, after)
            raise BuildError(f"partitions[{later.index}] (sectors {later.start}-{later.end}) overlaps partitions[{other.index}] "
                             f"(sectors {other.start}-{other.end}); give partitions[{later.index}] a start outside sectors "
                             f"{other.start}-{other.end}, or resize partitions[{other.index}]", option=later.opt("start"))


def plan_table(label: str, disk_size: int, partitions: list[dict[str, t.Any]], alignment: object = "1MiB",
               disk_id: str | int | None = None, seed: str = DEFAULT_SEED) -> PartitionTable:
    """The table the user asked for on a disk of ``disk_size`` bytes; BuildError naming the option at fault otherwise."""
    if label not in LABELS:
        raise BuildError(f"{label!r} is not a partition table label; use msdos, gpt or hybrid", option="label")
    if not isinstance(seed, str) or not seed:
        raise BuildError(f"{seed!r} is not a seed; give a non-empty string", option="seed")
    align_bytes = parse_size(alignment, "alignment")
    if align_bytes <= 0 or align_bytes % SECTOR_SIZE:
        raise BuildError(f"{alignment!r} is not a positive multiple of {SECTOR_SIZE} bytes; use e.g. 1MiB (the default) or 4KiB",
                         option="alignment")
    align = align_bytes // SECTOR_SIZE
    if isinstance(disk_size, bool) or not isinstance(disk_size, int) or disk_size < 0:
        raise BuildError(f"{disk_size!r} is not a disk size in bytes", option="image")
    disk_sectors = disk_size // SECTOR_SIZE
    if label == "msdos":
        if disk_sectors < 2:
            raise BuildError(f"the image has {disk_size} bytes, too small for an MBR and a partition; grow it (disk_image size)",
                             option="image")
        first_lba, last_lba = 1, min(disk_sectors, MBR_MAX + 1) - 1
    else:
        if disk_sectors < GPT_MIN_SECTORS:
            need = GPT_MIN_SECTORS * SECTOR_SIZE
            raise BuildError(f"the image has {disk_size} bytes, too small for the GPT structures (MBR, 2 headers, 2 x 32 sectors of "
                             f"entries) which need at least {need} bytes; grow it (disk_image size), e.g. to 1MiB or more", option="image")
        first_lba, last_lba = GPT_FIRST_USABLE, disk_sectors - 1 - GPT_BACKUP_SECTORS

    if partitions is None:
        partitions = []
    if not isinstance(partitions, (list, tuple)):
        raise BuildError("partitions must be a list of partitions (dicts with size, type, name, ...)", option="partitions")
    if label == "msdos" and len(partitions) > MBR_MAX_PRIMARY:
        raise BuildError(f"{len(partitions)} partitions asked for, but an MBR holds at most {MBR_MAX_PRIMARY} primary partitions; "
                         "extended/logical partitions are not supported: use label gpt", option="partitions")
    if label != "msdos" and len(partitions) > GPT_ENTRIES:
        raise BuildError(f"{len(partitions)} partitions asked for, but the GPT holds at most {GPT_ENTRIES}", option="partitions")

    specs = []
    for index, raw in enumerate(partitions, start=1):
        if not isinstance(raw, dict):
            raise BuildError(f"{raw!r} is not a partition; give a dict with size, type, name, ...", option=f"partitions[{index}]")
        for key in raw:
            if key not in _PARTITION_KEYS:
                raise BuildError(f"unknown key {key!r}; a partition takes {', '.join(_PARTITION_KEYS)}", option=f"partitions[{index}].{key}")
        # Ansible fills every unset suboption with None: None means "not given".
        specs.append(_Spec(index=index, raw={key: value for key, value in raw.items() if value is not None}))

    _place(specs, label, disk_size, disk_sectors, first_lba, last_lba, align)
    _check_overlaps(specs)
    if label == "msdos":
        return _plan_msdos(specs, disk_id, seed, disk_sectors, first_lba, last_lba)
    return _plan_gpt(specs, label, disk_id, seed, disk_sectors, first_lba, last_lba)


def _plan_msdos(specs: list[_Spec], disk_id: object, seed: str, disk_sectors: int, first_lba: int, last_lba: int) -> PartitionTable:
    signature = _derived_mbr_id(seed, "disk") if disk_id is None else _msdos_disk_id(disk_id)
    parts = []
    for spec in specs:
        raw = spec.raw
        if _given(raw, "hybrid") and raw["hybrid"] is not False:
            raise BuildError("hybrid only applies to label hybrid; an msdos table is all MBR already, so remove hybrid",
                             option=spec.opt("hybrid"))
        if _given(raw, "mbr_type"):
            raise BuildError("mbr_type only applies to label hybrid; on msdos set the MBR type with type", option=spec.opt("mbr_type"))
        _name(raw.get("name"), spec.opt("name"), "msdos")
        if _attributes(raw.get("attributes"), spec.opt("attributes")):
            raise BuildError("MBR partitions have no attribute bits; remove attributes (use bootable for the active flag) or use label gpt",
                             option=spec.opt("attributes"))
        part_uuid = f"{signature:08x}-{spec.index:02x}"
        if _given(raw, "uuid") and str(raw["uuid"]).strip().lower() != part_uuid:
            raise BuildError(f"on msdos a partition's uuid is the disk id and the partition number ({part_uuid}); remove uuid, "
                             "or set disk_id to change it", option=spec.opt("uuid"))
        parts.append(Partition(
            number=spec.index,
            start_sector=spec.start,
            sectors=spec.sectors,
            type=_mbr_type(raw.get("type", "linux"), spec.opt("type")),
            uuid=part_uuid,
            bootable=_bool(raw.get("bootable"), spec.opt("bootable")),
        ))
    return PartitionTable("msdos", f"0x{signature:08x}", disk_sectors, tuple(parts), first_lba, last_lba)


def _plan_gpt(specs: list[_Spec], label: str, disk_id: object, seed: str, disk_sectors: int, first_lba: int,
              last_lba: int) -> PartitionTable:
    disk_guid = str(_derived_uuid(seed, "disk")).upper() if disk_id is None else _guid(disk_id, "disk_id", "a disk id")
    hybrid = label == "hybrid"
    names: dict[str, _Spec] = {}
    uuids: dict[str, str] = {disk_guid: "disk_id"}
    resolved = []
    for spec in specs:
        raw = spec.raw
        if not hybrid:
            if _given(raw, "hybrid") and raw["hybrid"] is not False:
                raise BuildError("hybrid only applies to label hybrid; use label: hybrid to mirror partitions in the MBR",
                                 option=spec.opt("hybrid"))
            if _given(raw, "mbr_type"):
                raise BuildError("mbr_type only applies to label hybrid; remove it or use label: hybrid", option=spec.opt("mbr_type"))
        name = _name(raw.get("name"), spec.opt("name"), label)
        if name and name in names:
            raise BuildError(f"the name {name!r} is already used by partitions[{names[name].index}]; give each partition its own name",
                             option=spec.opt("name"))
        if name:
            names[name] = spec
        part_uuid = (_guid(raw["uuid"], spec.opt("uuid"), "a partition uuid") if _given(raw, "uuid")
                     else str(_derived_uuid(seed, f"partition/{spec.index}")).upper())
        if part_uuid in uuids:
            raise BuildError(f"the uuid {part_uuid} is already used by {uuids[part_uuid]}; every GUID on a disk must be unique",
                             option=spec.opt("uuid"))
        uuids[part_uuid] = spec.opt()
        type_guid, alias_mbr = _gpt_type(raw.get("type", "linux"), spec.opt("type"))
        bootable = _bool(raw.get("bootable"), spec.opt("bootable"))
        attributes = _attributes(raw.get("attributes"), spec.opt("attributes"))
        if bootable:
            attributes |= ATTR_LEGACY_BOOTABLE
        resolved.append((spec, name, part_uuid, type_guid, alias_mbr, attributes))

    mirrored: dict[int, str] = {}
    mbr_disk_id = None
    if hybrid:
        mirrored = _hybrid_mirrors(resolved)
        mbr_disk_id = f"0x{_derived_mbr_id(seed, 'mbr'):08x}"
    parts = []
    for spec, name, part_uuid, type_guid, _alias_mbr, attributes in resolved:
        parts.append(Partition(
            number=spec.index,
            start_sector=spec.start,
            sectors=spec.sectors,
            type=type_guid,
            name=name,
            uuid=part_uuid,
            bootable=bool(attributes & ATTR_LEGACY_BOOTABLE),
            attributes=attributes,
            mbr_type=mirrored.get(spec.index),
        ))
    return PartitionTable(label, disk_guid, disk_sectors, tuple(parts), first_lba, last_lba, mbr_disk_id)


def _hybrid_mirrors(resolved: list[tuple[_Spec, str, str, str, str | None, int]]) -> dict[int, str]:
    """Partition number -> MBR type byte for the partitions the hybrid MBR mirrors."""
    chosen = [item for item in resolved if _bool(item[0].raw.get("hybrid"), item[0].opt("hybrid"))]
    explicit = bool(chosen)
    if not explicit:
        bios_grub = TYPE_ALIASES["bios_grub"][0]
        chosen = [item for item in resolved if item[3] != bios_grub and item[0].raw.get("hybrid") is not False][:HYBRID_MAX_MIRRORED]
    if len(chosen) > HYBRID_MAX_MIRRORED:
        raise BuildError(f"{len(chosen)} partitions have hybrid: true, but a hybrid MBR mirrors at most {HYBRID_MAX_MIRRORED} "
                         "(its fourth entry is the 0xEE protective one); set hybrid: false on the others",
                         option=chosen[HYBRID_MAX_MIRRORED][0].opt("hybrid"))
    if not chosen:
        raise BuildError("a hybrid MBR needs at least one mirrored partition (bios_grub partitions are not mirrored by default); "
                         "set hybrid: true on one, or use label gpt", option="partitions")
    numbers = {item[0].index for item in chosen}
    mirrored = {}
    for spec, _name_, _uuid, _type, alias_mbr, _attrs in resolved:
        if spec.index not in numbers:
            if _given(spec.raw, "mbr_type"):
                raise BuildError("mbr_type is set but this partition is not mirrored in the hybrid MBR; set hybrid: true on it "
                                 "or remove mbr_type", option=spec.opt("mbr_type"))
            continue
        if _given(spec.raw, "mbr_type"):
            mbr = _mbr_type(spec.raw["mbr_type"], spec.opt("mbr_type"))
        elif alias_mbr is not None:
            mbr = alias_mbr
        else:
            why = "" if explicit else " (by default the first three partitions that are not bios_grub are)"
            raise BuildError(f"this partition is mirrored in the hybrid MBR{why} but its type has no MBR type byte; set mbr_type "
                             "(e.g. '83'), or choose the mirrored partitions with hybrid: true", option=spec.opt("mbr_type"))
        if spec.start > MBR_MAX or spec.sectors > MBR_MAX:
            raise BuildError("the partition lies beyond the 2 TiB an MBR entry can address, so it cannot be mirrored in the hybrid MBR; "
                             "set hybrid: false on it", option=spec.opt("hybrid"))
        mirrored[spec.index] = mbr
    return mirrored


# ----------------------------------------------------------------------------
# Serialization
# ----------------------------------------------------------------------------

def _chs(lba: int) -> bytes:
    """CHS bytes for an LBA with 255 heads and 63 sectors per track, capped at (1023, 254, 63) like fdisk and gdisk."""
    if lba >= _CHS_LIMIT:
        return b"\xfe\xff\xff"
    cylinder, rest = divmod(lba, _CHS_HEADS * _CHS_SECTORS)
    head, sector = divmod(rest, _CHS_SECTORS)
    return bytes((head, (sector + 1) | (cylinder >> 8) << 6, cylinder & 0xFF))


def _mbr_entry(status: int, type_byte: int, start: int, sectors: int, whole_disk_protective: bool = False) -> bytes:
    end = _chs(start + sectors - 1)
    if whole_disk_protective and start + sectors - 1 >= _CHS_LIMIT:
        # The UEFI spec wants FF FF FF here for a protective MBR (gdisk writes it; sfdisk always does).
        end = b"\xff\xff\xff"
    return _MBR_ENTRY.pack(status, _chs(start), type_byte, end, start, sectors)


def _mbr_tail(signature: int, entries: list[bytes]) -> bytes:
    entries = entries + [bytes(16)] * (MBR_MAX_PRIMARY - len(entries))
    return struct.pack("<IH", signature, 0) + b"".join(entries) + b"\x55\xaa"


def _hex_byte(value: str | None, what: str) -> int:
    if value is None or not re.match(r"^[0-9a-f]{1,2}$", value):
        raise BuildError(f"{what} {value!r} is not an MBR type byte like '83'; the table cannot be written")
    return int(value, 16)


def _check_mbr_range(part: Partition) -> None:
    if not (0 < part.start_sector <= MBR_MAX and 0 < part.sectors <= MBR_MAX):
        raise BuildError(f"partition {part.number} (sectors {part.start_sector}-{part.end_sector}) does not fit an MBR entry "
                         "(32-bit start and size); the table cannot be written")


def _msdos_signature(table: PartitionTable) -> int:
    if table.label == "gpt":
        return 0
    value = table.mbr_disk_id if table.label == "hybrid" else table.disk_id
    if value is None:
        return 0
    match = _MBR_ID_RE.match(value)
    if not match:
        raise BuildError(f"{value!r} is not an MBR disk id like 0x1a2b3c4d; the table cannot be written")
    return int(match.group(1), 16)


def _gpt_entries(table: PartitionTable) -> bytes:
    array = bytearray(GPT_ENTRIES * GPT_ENTRY_SIZE)
    for part in table.partitions:
        if not 1 <= part.number <= GPT_ENTRIES:
            raise BuildError(f"partition number {part.number} does not fit a GPT of {GPT_ENTRIES} entries; the table cannot be written")
        try:
            type_guid = uuidlib.UUID(part.type)
            part_guid = uuidlib.UUID(part.uuid)
            name = part.name.encode("utf-16-le")
        except (ValueError, UnicodeEncodeError):
            raise BuildError(f"partition {part.number} has a type, uuid or name a GPT cannot hold; the table cannot be written")
        if len(name) > GPT_NAME_UNITS * 2 or part.sectors <= 0 or not 0 <= part.attributes < 1 << 64:
            raise BuildError(f"partition {part.number} has a name, size or attributes a GPT cannot hold; the table cannot be written")
        offset = (part.number - 1) * GPT_ENTRY_SIZE
        array[offset:offset + GPT_ENTRY_SIZE] = _GPT_ENTRY.pack(
            type_guid.bytes_le, part_guid.bytes_le, part.start_sector, part.end_sector, part.attributes, name)
    return bytes(array)


def _gpt_header(table: PartitionTable, my_lba: int, alternate_lba: int, entries_lba: int, entries_crc: int) -> bytes:
    disk_guid = uuidlib.UUID(table.disk_id)
    fields = [GPT_SIGNATURE, GPT_REVISION, GPT_HEADER_SIZE, 0, 0, my_lba, alternate_lba, table.first_lba, table.last_lba,
              disk_guid.bytes_le, entries_lba, GPT_ENTRIES, GPT_ENTRY_SIZE, entries_crc]
    header = _GPT_HEADER.pack(*fields)
    fields[3] = zlib.crc32(header)
    return _GPT_HEADER.pack(*fields).ljust(SECTOR_SIZE, b"\0")


def _hybrid_mbr_entries(table: PartitionTable) -> list[bytes]:
    mirrored = [part for part in table.partitions if part.mbr_type is not None]
    if not mirrored or len(mirrored) > HYBRID_MAX_MIRRORED:
        raise BuildError(f"a hybrid MBR mirrors 1 to {HYBRID_MAX_MIRRORED} partitions, this table has {len(mirrored)}; "
                         "the table cannot be written")
    first = min(part.start_sector for part in mirrored)
    if first < 2:
        raise BuildError("a mirrored partition starts before sector 2; the table cannot be written")
    # gdisk's layout (sgdisk -h): the 0xEE entry first, covering the GPT up to the first mirrored partition.
    entries = [_mbr_entry(0, MBR_PROTECTIVE, 1, first - 1)]
    for part in mirrored:
        _check_mbr_range(part)
        status = MBR_ACTIVE if part.bootable else 0
        entries.append(_mbr_entry(status, _hex_byte(part.mbr_type, "mbr_type"), part.start_sector, part.sectors))
    return entries


def serialize(table: PartitionTable) -> list[tuple[int, bytes]]:
    """The (byte offset, bytes) writes that put ``table`` on a disk; the MBR boot code (bytes 0-0x1B7) is never written."""
    if table.label == "msdos":
        slots: dict[int, bytes] = {}
        for part in table.partitions:
            if not 1 <= part.number <= MBR_MAX_PRIMARY or part.number in slots:
                raise BuildError(f"partition number {part.number} is not a free MBR slot 1-4; the table cannot be written")
            _check_mbr_range(part)
            status = MBR_ACTIVE if part.bootable else 0
            slots[part.number] = _mbr_entry(status, _hex_byte(part.type, "type"), part.start_sector, part.sectors)
        entries = [slots.get(number, bytes(16)) for number in range(1, MBR_MAX_PRIMARY + 1)]
        return [(MBR_TAIL_OFFSET, _mbr_tail(_msdos_signature(table), entries))]
    if table.label not in ("gpt", "hybrid"):
        raise BuildError(f"{table.label!r} is not a partition table label; the table cannot be written")
    if table.disk_sectors < GPT_MIN_SECTORS:
        raise BuildError(f"a disk of {table.disk_sectors} sectors cannot hold a GPT; the table cannot be written")
    last = table.disk_sectors - 1
    backup_entries_lba = last - GPT_ENTRIES_SECTORS
    try:
        uuidlib.UUID(table.disk_id)
    except ValueError:
        raise BuildError(f"{table.disk_id!r} is not a disk GUID; the table cannot be written")
    if table.label == "hybrid":
        mbr_entries = _hybrid_mbr_entries(table)
    else:
        mbr_entries = [_mbr_entry(0, MBR_PROTECTIVE, 1, min(table.disk_sectors - 1, MBR_MAX), whole_disk_protective=True)]
    array = _gpt_entries(table)
    crc = zlib.crc32(array)
    return [
        (MBR_TAIL_OFFSET, _mbr_tail(_msdos_signature(table), mbr_entries)),
        (SECTOR_SIZE, _gpt_header(table, 1, last, 2, crc)),
        (2 * SECTOR_SIZE, array),
        (backup_entries_lba * SECTOR_SIZE, array),
        (last * SECTOR_SIZE, _gpt_header(table, last, 1, backup_entries_lba, crc)),
    ]


def clear_writes(old: PartitionTable | None, disk_size: int, new: PartitionTable | None = None) -> list[tuple[int, bytes]]:
    """Zero writes that erase ``old``'s GPT structures (LBA 1-33 and the last 33 sectors), to apply before ``serialize(new)``.

    Only a GPT or hybrid table that is replaced by an msdos one needs this: an MBR
    leaves those sectors alone, so a stale backup GPT would remain for tools to
    find. When ``new`` is given and is itself a GPT, nothing is returned, because
    its own writes replace the same sectors and a rerun must find nothing to do.
    """
    if old is None or old.label == "msdos":
        return []
    if new is not None and new.label != "msdos":
        return []
    disk_sectors = disk_size // SECTOR_SIZE
    if disk_sectors < 2:
        return []
    primary = min(GPT_FIRST_USABLE - 1, disk_sectors - 1)
    writes = [(SECTOR_SIZE, bytes(primary * SECTOR_SIZE))]
    backup_start = max(1 + primary, disk_sectors - GPT_BACKUP_SECTORS)
    if backup_start < disk_sectors:
        writes.append((backup_start * SECTOR_SIZE, bytes((disk_sectors - backup_start) * SECTOR_SIZE)))
    return writes


# ----------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------

def _read(read: t.Callable[[int, int], bytes], offset: int, length: int) -> bytes:
    data = read(offset, length)
    if not isinstance(data, (bytes, bytearray)):
        raise BuildError("the image could not be read")
    data = bytes(data[:length])
    # Past the end of a short file reads come back short; the missing bytes are zeros on a sparse disk.
    return data.ljust(length, b"\0")


@dataclass(frozen=True)
class _MbrEntry:
    slot: int
    status: int
    type: int
    start: int
    sectors: int


def _mbr_entries(sector: bytes) -> list[_MbrEntry]:
    entries = []
    for slot in range(MBR_MAX_PRIMARY):
        status, _chs_start, type_byte, _chs_end, start, sectors = _MBR_ENTRY.unpack_from(sector, MBR_ENTRIES_OFFSET + 16 * slot)
        # An entry with no sectors is unused whatever else it holds (the kernel and libfdisk agree).
        if sectors:
            entries.append(_MbrEntry(slot + 1, status, type_byte, start, sectors))
    return entries


@dataclass(frozen=True)
class _GptHeader:
    my_lba: int
    alternate_lba: int
    first_lba: int
    last_lba: int
    disk_guid: str
    entries: bytes
    entry_size: int


def _read_gpt_header(read: t.Callable[[int, int], bytes], lba: int, disk_sectors: int) -> _GptHeader | None:
    """The header at ``lba`` and its entry array, or None when either is missing or damaged."""
    if not 0 < lba < disk_sectors:
        return None
    raw = _read(read, lba * SECTOR_SIZE, SECTOR_SIZE)
    (signature, _revision, header_size, crc, _reserved, my_lba, alternate_lba, first_lba, last_lba, disk_guid,
     entries_lba, count, entry_size, entries_crc) = _GPT_HEADER.unpack_from(raw)
    if signature != GPT_SIGNATURE or not GPT_HEADER_SIZE <= header_size <= SECTOR_SIZE:
        return None
    check = bytearray(raw[:header_size])
    check[16:20] = bytes(4)
    if zlib.crc32(bytes(check)) != crc or my_lba != lba:
        return None
    if not 0 < first_lba <= last_lba + 1 or last_lba >= disk_sectors:
        return None
    if entry_size < GPT_ENTRY_SIZE or entry_size % 8 or entry_size > _GPT_MAX_ENTRY_SIZE:
        return None
    if count < 1 or count * entry_size > _GPT_MAX_ARRAY_BYTES:
        return None
    array_sectors = -(-count * entry_size // SECTOR_SIZE)
    if not 0 < entries_lba or entries_lba + array_sectors > disk_sectors:
        return None
    entries = _read(read, entries_lba * SECTOR_SIZE, count * entry_size)
    if zlib.crc32(entries) != entries_crc:
        return None
    return _GptHeader(my_lba, alternate_lba, first_lba, last_lba, str(uuidlib.UUID(bytes_le=disk_guid)).upper(), entries, entry_size)


def _gpt_name(raw: bytes) -> str:
    units = raw
    for pos in range(0, len(raw), 2):
        if raw[pos:pos + 2] == b"\0\0":
            units = raw[:pos]
            break
    return units.decode("utf-16-le", errors="replace")


def _gpt_partitions(header: _GptHeader) -> list[Partition]:
    parts = []
    for index in range(len(header.entries) // header.entry_size):
        offset = index * header.entry_size
        type_le, uuid_le, first, last, attributes, name = _GPT_ENTRY.unpack_from(header.entries, offset)
        if type_le == bytes(16):
            continue
        number = index + 1
        if number > GPT_ENTRIES:
            raise BuildError(f"the GPT uses entry {number}, but this module models GPTs of {GPT_ENTRIES} entries")
        if last < first:
            raise BuildError(f"GPT partition {number} ends (sector {last}) before it starts (sector {first}); the table is damaged")
        parts.append(Partition(
            number=number,
            start_sector=first,
            sectors=last - first + 1,
            type=str(uuidlib.UUID(bytes_le=type_le)).upper(),
            name=_gpt_name(name),
            uuid=str(uuidlib.UUID(bytes_le=uuid_le)).upper(),
            bootable=bool(attributes & ATTR_LEGACY_BOOTABLE),
            attributes=attributes,
        ))
    return parts


def _parse_msdos(signature: int, entries: list[_MbrEntry], disk_sectors: int) -> PartitionTable:
    parts = []
    for entry in entries:
        if entry.type in MBR_EXTENDED:
            raise BuildError(f"MBR partition {entry.slot} is an extended partition (type {entry.type:02x}); extended/logical "
                             "partitions are not supported")
        parts.append(Partition(
            number=entry.slot,
            start_sector=entry.start,
            sectors=entry.sectors,
            type=f"{entry.type:x}",
            uuid=f"{signature:08x}-{entry.slot:02x}",
            bootable=entry.status == MBR_ACTIVE,
        ))
    return PartitionTable("msdos", f"0x{signature:08x}", disk_sectors, tuple(parts), 1, min(disk_sectors, MBR_MAX + 1) - 1)


def _parse_hybrid(parts: list[Partition], entries: list[_MbrEntry]) -> list[Partition]:
    by_extent = {(part.start_sector, part.sectors): pos for pos, part in enumerate(parts)}
    for entry in entries:
        if entry.type == MBR_PROTECTIVE:
            continue
        if entry.type in MBR_EXTENDED:
            raise BuildError(f"hybrid MBR entry {entry.slot} is an extended partition (type {entry.type:02x}); extended/logical "
                             "partitions are not supported")
        pos = by_extent.get((entry.start, entry.sectors))
        if pos is None or parts[pos].mbr_type is not None:
            raise BuildError(f"hybrid MBR entry {entry.slot} (sectors {entry.start}-{entry.start + entry.sectors - 1}) does not "
                             "mirror a GPT partition; this module cannot model such a disk")
        part = parts[pos]
        parts[pos] = Partition(part.number, part.start_sector, part.sectors, part.type, part.name, part.uuid,
                               part.bootable and entry.status == MBR_ACTIVE, part.attributes, f"{entry.type:x}")
    return parts


def parse(read: t.Callable[[int, int], bytes], disk_size: int) -> PartitionTable | None:
    """The table on a disk of ``disk_size`` bytes, read through ``read(offset, length)``; None when there is none.

    Decides MBR versus GPT the way libfdisk does: a GPT counts only when sector 0
    has an 0xEE entry starting at LBA 1. A damaged primary GPT falls back to the
    backup at the last sector. Raises BuildError (never anything else) for a table
    it cannot model.
    """
    disk_sectors = disk_size // SECTOR_SIZE if isinstance(disk_size, int) else 0
    if disk_sectors < 1:
        return None
    mbr = _read(read, 0, SECTOR_SIZE)
    if mbr[510:512] != b"\x55\xaa":
        return None
    signature = struct.unpack_from("<I", mbr, MBR_TAIL_OFFSET)[0]
    statuses = mbr[MBR_ENTRIES_OFFSET:MBR_ENTRIES_OFFSET + 64:16]
    if any(status not in (0, MBR_ACTIVE) for status in statuses):
        raise BuildError("sector 0 ends with the 55 AA boot signature but its partition entries have invalid status bytes: "
                         "it is no partition table this module reads (perhaps a filesystem boot sector, or damage)")
    entries = _mbr_entries(mbr)
    if not any(entry.type == MBR_PROTECTIVE and entry.start == 1 for entry in entries):
        return _parse_msdos(signature, entries, disk_sectors)

    header = _read_gpt_header(read, 1, disk_sectors) or _read_gpt_header(read, disk_sectors - 1, disk_sectors)
    if header is None:
        raise BuildError("sector 0 announces a GPT (0xEE entry) but both the primary and the backup GPT header are missing "
                         "or fail their CRC check; the table is damaged")
    parts = _gpt_partitions(header)
    others = [entry for entry in entries if entry.type != MBR_PROTECTIVE]
    if others:
        parts = _parse_hybrid(parts, others)
        return PartitionTable("hybrid", header.disk_guid, disk_sectors, tuple(parts), header.first_lba, header.last_lba,
                              f"0x{signature:08x}")
    return PartitionTable("gpt", header.disk_guid, disk_sectors, tuple(parts), header.first_lba, header.last_lba)
