# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Command lines of mke2fs, mkfs.fat and mtools, and the FAT geometry for a partition size.

Pure: nothing here runs a program or touches a file. The one place that knows
these tools' flags.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import re
import typing as t
import uuid as uuidlib
from dataclasses import dataclass

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._sizes import format_size

EXT_TYPES = ("ext2", "ext3", "ext4")
FSTYPES = EXT_TYPES + ("vfat",)
SECTOR = 512

# ----------------------------------------------------------------------------
# Versions


def parse_version(text: str, program: str) -> tuple[int, ...]:
    """The version of ``program`` in its banner (``mke2fs 1.47.0 (5-Feb-2023)``), or ()."""
    match = re.search(re.escape(program) + r"[^\n0-9]*?([0-9]+(?:\.[0-9]+)+)", text)
    if not match:
        return ()
    return tuple(int(part) for part in match.group(1).split("."))


# ----------------------------------------------------------------------------
# Labels and identifiers

# Characters a FAT short name (and so a volume label) may hold besides A-Z and 0-9.
_FAT_LABEL_EXTRA = set(" !#$%&'()-@^_`{}~")
_FAT_VOLID_RE = re.compile(r"^(?:0[xX])?([0-9a-fA-F]{4})-?([0-9a-fA-F]{4})$")


def check_label(fstype: str, label: str | None) -> str:
    """The label as it will be written; BuildError naming ``label`` when it cannot be.

    FAT labels are stored upper-case (as DOS and Windows store them): at most 11
    characters from A-Z, 0-9, space and ``!#$%&'()-@^_`{}~``. ext labels are at
    most 16 bytes of UTF-8.
    """
    if label is None:
        return ""
    if not isinstance(label, str):
        raise BuildError(f"{label!r} is not a label; give a string", option="label")
    if fstype == "vfat":
        upper = label.upper()
        if len(upper) > 11:
            raise BuildError(f"{label!r} has {len(upper)} characters; a FAT label holds at most 11", option="label")
        bad = sorted({char for char in upper if not (char.isascii() and char.isalnum()) and char not in _FAT_LABEL_EXTRA})
        if bad:
            raise BuildError(f"{label!r} contains {''.join(bad)!r}; a FAT label may only hold A-Z, 0-9, space and "
                             "!#$%&'()-@^_`{}~", option="label")
        if upper.startswith(" "):
            raise BuildError(f"{label!r} starts with a space, which FAT does not allow", option="label")
        return upper.rstrip(" ")
    data = label.encode("utf-8")
    if len(data) > 16:
        raise BuildError(f"{label!r} is {len(data)} bytes long; an ext label holds at most 16 bytes", option="label")
    if "\0" in label:
        raise BuildError(f"{label!r} contains a NUL character", option="label")
    return label


def check_uuid(fstype: str, value: str | None) -> str | None:
    """The normalised filesystem identifier the user gave, or None; BuildError naming ``uuid``."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    if fstype == "vfat":
        match = _FAT_VOLID_RE.match(text)
        if not match:
            raise BuildError(f"{value!r} is not a FAT volume id; give 8 hex digits, e.g. 1A2B-3C4D", option="uuid")
        return f"{match.group(1)}-{match.group(2)}".upper()
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        raise BuildError(f"{value!r} is not a UUID; give one like 0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", option="uuid")


def fat_volume_id(derived: uuidlib.UUID) -> str:
    """A FAT volume id (``ABCD-1234``) from a derived UUID; never 0000-0000."""
    value = int.from_bytes(derived.bytes[:4], "big") or 1
    return f"{value >> 16:04X}-{value & 0xFFFF:04X}"


# ----------------------------------------------------------------------------
# mkfs_options

# getopt strings of the tools (mke2fs 1.47, mkfs.fat 4.2): letters followed by ':' take a value.
_MKE2FS_GETOPT = "b:cd:e:g:i:jl:m:no:qr:s:t:vC:DE:FG:I:J:KL:M:N:O:R:ST:U:Vz:"
_MKFS_FAT_GETOPT = "aAb:cCf:D:F:g:h:Ii:l:m:M:n:r:R:s:S:v"
_MKFS_FAT_LONG = {"invariant": False, "offset": True, "mbr": None, "codepage": True, "variant": True, "help": False}

# Options the module sets itself (from its own options) or that would break the build.
_MKE2FS_MANAGED = {
    "d": "the tree comes from the source option",
    "L": "use the label option",
    "U": "use the uuid option",
    "t": "use the fstype option",
    "n": "a dry run builds nothing",
    "S": "it writes only superblocks over an existing filesystem",
    "V": "it only prints the version",
    "c": "there is no device to scan for bad blocks",
    "l": "there is no device to scan for bad blocks",
    "z": "an undo file is of no use on a temporary file",
}
_MKE2FS_MANAGED_E = {
    "hash_seed": "it derives from seed",
    "offset": "the filesystem is built in a file of the partition's size",
    "root_owner": "the root directory is owned by the owner of source",
}
_MKFS_FAT_MANAGED = {
    "i": "use the uuid option",
    "n": "use the label option",
    "C": "the filesystem is built in a file of the partition's size",
    "c": "there is no device to scan for bad blocks",
    "l": "there is no device to scan for bad blocks",
    "offset": "the filesystem is built in a file of the partition's size",
    "invariant": "it is always set",
    "help": "it only prints the usage",
}


def _split(argv: list[str], getopt: str, long_options: dict[str, bool | None] | None) -> list[tuple[str, str | None, list[str]]]:
    """Split ``argv`` like getopt would: ``[(option, value, original args)]``; BuildError on anything else."""
    takes = {}
    for index, char in enumerate(getopt):
        if char != ":":
            takes[char] = index + 1 < len(getopt) and getopt[index + 1] == ":"
    result = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if not isinstance(arg, str) or not arg:
            raise BuildError(f"{arg!r} is not a command line option", option="mkfs_options")
        if arg.startswith("--") and long_options is not None and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            if name not in long_options:
                raise BuildError(f"{arg!r} is not an option of this mkfs; see its manual page", option="mkfs_options")
            needs = long_options[name]
            if needs is True and not eq:
                if index + 1 >= len(argv):
                    raise BuildError(f"{arg!r} needs a value", option="mkfs_options")
                index += 1
                result.append((name, argv[index], [arg, argv[index]]))
            elif needs is False and eq:
                raise BuildError(f"{arg!r} takes no value", option="mkfs_options")
            else:
                result.append((name, value if eq else None, [arg]))
            index += 1
            continue
        if not arg.startswith("-") or arg == "-" or arg.startswith("--"):
            raise BuildError(f"{arg!r} is not an option; mkfs_options takes options only (the device and its size come "
                             "from the partition), one per list item with its value as the next item or attached: "
                             "['-b', '4096'] or ['-b4096']", option="mkfs_options")
        pos = 1
        while pos < len(arg):
            char = arg[pos]
            if char not in takes:
                raise BuildError(f"{arg!r}: -{char} is not an option of this mkfs; see its manual page", option="mkfs_options")
            if takes[char]:
                if pos + 1 < len(arg):
                    result.append((char, arg[pos + 1:], [arg]))
                else:
                    if index + 1 >= len(argv):
                        raise BuildError(f"-{char} needs a value", option="mkfs_options")
                    index += 1
                    result.append((char, argv[index], [arg, argv[index]]))
                break
            result.append((char, None, [f"-{char}"]))
            pos += 1
        index += 1
    return result


@dataclass(frozen=True)
class MkfsOptions:
    """The user's mkfs_options, checked: plain arguments to pass through, ``-E`` settings to merge."""

    args: tuple[str, ...] = ()
    extended: tuple[str, ...] = ()  # mke2fs -E items, in order
    features: tuple[str, ...] = ()  # mke2fs -O items
    block_size: int | None = None  # mke2fs -b
    fat_size: int | None = None  # mkfs.fat -F
    cluster_sectors: int | None = None  # mkfs.fat -s
    sector_size: int | None = None  # mkfs.fat -S
    hidden_sectors: bool = False  # mkfs.fat -h given


def check_mkfs_options(fstype: str, options: list[str] | None) -> MkfsOptions:
    """Validate ``mkfs_options`` for ``fstype``; BuildError naming ``mkfs_options``."""
    if not options:
        return MkfsOptions()
    if not isinstance(options, (list, tuple)):
        raise BuildError("mkfs_options must be a list of strings, e.g. ['-b', '4096']", option="mkfs_options")
    if fstype == "vfat":
        return _check_fat_options(list(options))
    return _check_ext_options(list(options))


def _int_value(option: str, value: str | None) -> int:
    try:
        return int(str(value), 0)
    except ValueError:
        raise BuildError(f"-{option} {value!r} is not a number", option="mkfs_options")


def _check_ext_options(options: list[str]) -> MkfsOptions:
    args: list[str] = []
    extended: list[str] = []
    features: list[str] = []
    block_size = None
    for name, value, original in _split(options, _MKE2FS_GETOPT, None):
        if name in _MKE2FS_MANAGED:
            raise BuildError(f"-{name} cannot be given in mkfs_options: {_MKE2FS_MANAGED[name]}", option="mkfs_options")
        if name == "E":
            # mke2fs keeps only the last -E, so the module merges them into its own.
            for item in str(value).split(","):
                key = item.split("=", 1)[0].strip()
                if not key:
                    continue
                if key in _MKE2FS_MANAGED_E:
                    raise BuildError(f"-E {key} cannot be given in mkfs_options: {_MKE2FS_MANAGED_E[key]}", option="mkfs_options")
                extended.append(item.strip())
            continue
        if name == "O":
            features.extend(item.strip() for item in str(value).split(",") if item.strip())
        if name == "b":
            block_size = _int_value(name, value)
            if block_size not in (1024, 2048, 4096, 8192, 16384, 32768, 65536):
                raise BuildError(f"-b {value} is not an ext block size; use 1024, 2048 or 4096", option="mkfs_options")
        args.extend(original)
    return MkfsOptions(args=tuple(args), extended=tuple(extended), features=tuple(features), block_size=block_size)


def _check_fat_options(options: list[str]) -> MkfsOptions:
    args: list[str] = []
    fat_size = cluster_sectors = sector_size = None
    hidden = False
    for name, value, original in _split(options, _MKFS_FAT_GETOPT, _MKFS_FAT_LONG):
        if name in _MKFS_FAT_MANAGED:
            shown = f"--{name}" if len(name) > 1 else f"-{name}"
            raise BuildError(f"{shown} cannot be given in mkfs_options: {_MKFS_FAT_MANAGED[name]}", option="mkfs_options")
        if name == "F":
            fat_size = _int_value(name, value)
            if fat_size not in (12, 16, 32):
                raise BuildError(f"-F {value} is not a FAT size; use 12, 16 or 32", option="mkfs_options")
        elif name == "s":
            cluster_sectors = _int_value(name, value)
            if cluster_sectors not in (1, 2, 4, 8, 16, 32, 64, 128):
                raise BuildError(f"-s {value} is not a power of two from 1 to 128", option="mkfs_options")
        elif name == "S":
            sector_size = _int_value(name, value)
        elif name == "h":
            hidden = True
        args.extend(original)
    return MkfsOptions(args=tuple(args), fat_size=fat_size, cluster_sectors=cluster_sectors, sector_size=sector_size,
                       hidden_sectors=hidden)


# ----------------------------------------------------------------------------
# mke2fs


def mke2fs_extended(hash_seed: str, root_owner: tuple[int, int], version: tuple[int, ...],
                    user: t.Sequence[str] = ()) -> str:
    """The ``-E`` value: fixed hash seed and root owner, no discard, and tables known to be zero.

    The temporary file mke2fs writes into is fresh and sparse, so it reads as zeros:
    ``assume_storage_prezeroed`` (e2fsprogs 1.47) marks the inode tables zeroed
    without writing them, the same on every host. Older mke2fs zero the tables
    (``lazy_itable_init=0``), which is slower but equally deterministic; left to
    itself mke2fs decides from /sys/fs/ext4 of the build host's kernel.
    """
    items = [f"hash_seed={hash_seed}", f"root_owner={root_owner[0]}:{root_owner[1]}", "nodiscard"]
    if version >= (1, 47, 0):
        items.append("assume_storage_prezeroed=1")
    else:
        items.extend(["lazy_itable_init=0", "lazy_journal_init=0"])
    items.extend(user)
    return ",".join(items)


def mke2fs_argv(program: str, fstype: str, target: str, uuid: str, hash_seed: str, label: str,
                root_owner: tuple[int, int], source: str | None, options: MkfsOptions,
                version: tuple[int, ...]) -> list[str]:
    """``mke2fs -F -q -t TYPE -U UUID -E ... [-L LABEL] [USER OPTIONS] [-d SOURCE] TARGET``."""
    argv = [program, "-F", "-q", "-t", fstype, "-U", uuid,
            "-E", mke2fs_extended(hash_seed, root_owner, version, options.extended)]
    if label:
        argv += ["-L", label]
    argv += list(options.args)
    if source is not None:
        argv += ["-d", source]
    argv.append(target)
    return argv


def mke2fs_env(base: t.Mapping[str, str], epoch: int) -> dict[str, str]:
    """The environment of mke2fs: the build's timestamp instead of the clock, C collation."""
    env = dict(base)
    env.update({
        "E2FSPROGS_FAKE_TIME": str(max(int(epoch), 1)),  # 0 would mean "use the clock"
        "SOURCE_DATE_EPOCH": str(max(int(epoch), 1)),
        "LC_ALL": "C",  # scandir's alphasort collates with strcoll
        "TZ": "UTC",
    })
    env.pop("MKE2FS_SYNC", None)
    env.pop("MKE2FS_FIRST_META_BG", None)
    env.pop("MKE2FS_DEVICE_SECTSIZE", None)
    env.pop("MKE2FS_DEVICE_PHYS_SECTSIZE", None)
    return env


# ----------------------------------------------------------------------------
# FAT geometry

FAT12_MAX_CLUSTERS = 4084  # a FAT with fewer than 4085 clusters is FAT12, whatever its BPB says
FAT16_MIN_CLUSTERS = 4085
FAT16_MAX_CLUSTERS = 65524
FAT32_MIN_CLUSTERS = 65525
FAT32_MAX_CLUSTERS = 0x0FFFFFF5
# Stay this many clusters away from a threshold: tools differ slightly in how they
# count, and a FAT near a threshold is misdetected by some of them.
_MARGIN = 64

# Microsoft's fatgen103 tables: (up to this many sectors, sectors per cluster).
_FAT16_TABLE = ((32680, 2), (262144, 4), (524288, 8), (1048576, 16), (2097152, 32), (4194304, 64))
_FAT32_TABLE = ((532480, 1), (16777216, 8), (33554432, 16), (67108864, 32), (0xFFFFFFFF, 64))


@dataclass(frozen=True)
class FatGeometry:
    fat_bits: int
    sectors_per_cluster: int
    clusters: int  # the module's own count; mkfs.fat's may differ by a few
    reserved_sectors: int
    root_entries: int
    fat_sectors: int

    @property
    def cluster_size(self) -> int:
        return self.sectors_per_cluster * SECTOR


def _align(value: int, to: int) -> int:
    return -(-value // to) * to


def _fat_layout(sectors: int, fat_bits: int, per_cluster: int) -> FatGeometry:
    """Clusters and FAT length for one choice, counted like mkfs.fat (structures aligned to clusters)."""
    reserved = 32 if fat_bits == 32 else 1
    root_entries = 0 if fat_bits == 32 else 512
    root_sectors = _align(root_entries * 32 // SECTOR, per_cluster) if root_entries else 0
    data = max(sectors - _align(reserved, per_cluster) - root_sectors, 0)
    # First guess from the space one cluster and its two FAT entries take, then the FAT
    # length that guess needs (aligned), then what really remains for clusters.
    clusters = (data * SECTOR * 8 + 2 * 2 * fat_bits) // (per_cluster * SECTOR * 8 + 2 * fat_bits)
    fat_sectors = _align(-(-((clusters + 2) * fat_bits) // (8 * SECTOR)), per_cluster)
    clusters = max((data - 2 * fat_sectors) // per_cluster, 0)
    return FatGeometry(fat_bits, per_cluster, clusters, reserved, root_entries, fat_sectors)


def _from_table(table: tuple[tuple[int, int], ...], sectors: int) -> int:
    for limit, per_cluster in table:
        if sectors <= limit:
            return per_cluster
    return table[-1][1]


def _fits(geometry: FatGeometry) -> bool:
    low, high = {
        12: (1, FAT12_MAX_CLUSTERS - _MARGIN),
        16: (FAT16_MIN_CLUSTERS + _MARGIN, FAT16_MAX_CLUSTERS - _MARGIN),
        32: (FAT32_MIN_CLUSTERS + _MARGIN, FAT32_MAX_CLUSTERS - _MARGIN),
    }[geometry.fat_bits]
    return low <= geometry.clusters <= high


def fat_geometry(size: int) -> FatGeometry:
    """The FAT type and cluster size for a partition of ``size`` bytes (512-byte sectors).

    FAT32 whenever the partition holds enough clusters for a real FAT32 (65525 and
    more: about 33 MiB with 512-byte clusters), which is what UEFI firmware expects
    of an ESP on a fixed disk; cluster sizes from Microsoft's table (512 bytes up to
    260 MiB, 4 KiB up to 8 GiB, ...). Smaller partitions get FAT16 (from about 2.1 MiB),
    then FAT12. The cluster count always lies well inside the range of the chosen
    type, so no reader misdetects it.
    """
    sectors = size // SECTOR
    if sectors > 0xFFFFFFFF:
        raise BuildError(f"the partition is {format_size(size)}; FAT with 512-byte sectors holds at most 2 TiB",
                         option="partition")
    per_cluster = _from_table(_FAT32_TABLE, sectors)
    while per_cluster >= 1:
        geometry = _fat_layout(sectors, 32, per_cluster)
        if _fits(geometry):
            return geometry
        if geometry.clusters > FAT32_MAX_CLUSTERS - _MARGIN:
            break
        per_cluster //= 2
    per_cluster = _from_table(_FAT16_TABLE, sectors)
    for candidate in sorted({per_cluster, 1, 2, 4, 8, 16, 32, 64}, key=lambda value: (value != per_cluster, value)):
        geometry = _fat_layout(sectors, 16, candidate)
        if _fits(geometry):
            return geometry
    for candidate in (1, 2, 4, 8, 16, 32, 64):
        geometry = _fat_layout(sectors, 12, candidate)
        if geometry.clusters >= 16 and _fits(geometry):
            return geometry
    raise BuildError(f"the partition is {format_size(size)} ({size} bytes), too small for a FAT filesystem", option="partition")


def mkfs_fat_argv(program: str, target: str, volume_id: str, label: str, hidden_sectors: int,
                  geometry: FatGeometry | None, options: MkfsOptions, version: tuple[int, ...]) -> list[str]:
    """``mkfs.fat --invariant -i ID [-n LABEL] -h HIDDEN [-F BITS -s SPC] [USER OPTIONS] TARGET``.

    ``--invariant`` comes first (it also sets a volume id, which ``-i`` then
    replaces) and fixes the creation time of the label entry (1426325213, as
    dosfstools defines it): mkfs.fat 4.2 reads the clock, not SOURCE_DATE_EPOCH.
    The geometry is left out when the user sets ``-F``, ``-s`` or ``-S``.
    """
    argv = [program, "--invariant", "-i", volume_id.replace("-", "")]
    if version >= (4, 2):
        argv.append("--mbr=n")
    if label:
        argv += ["-n", label]
    if not options.hidden_sectors:
        argv += ["-h", str(hidden_sectors)]
    if geometry is not None and options.fat_size is None and options.cluster_sectors is None and options.sector_size is None:
        argv += ["-F", str(geometry.fat_bits), "-s", str(geometry.sectors_per_cluster)]
    argv += list(options.args)
    argv.append(target)
    return argv


# ----------------------------------------------------------------------------
# mtools


def mtools_env(base: t.Mapping[str, str], epoch: int, home: str) -> dict[str, str]:
    """mtools settings that do not depend on the build host's mtools.conf or ~/.mtoolsrc."""
    env = {key: value for key, value in base.items() if not key.startswith("MTOOLS")}
    env.update({
        "HOME": home,  # no ~/.mtoolsrc
        "MTOOLSRC": "/dev/null",
        "MTOOLS_SKIP_CHECK": "1",
        "MTOOLS_NO_VFAT": "0",
        "MTOOLS_LOWER_CASE": "0",
        "MTOOLS_NAME_NUMERIC_TAIL": "1",
        "MTOOLS_FAT_COMPATIBILITY": "0",
        "MTOOLS_DOTTED_DIR": "0",
        "SOURCE_DATE_EPOCH": str(max(int(epoch), 1)),  # "now" for new directories
        "TZ": "UTC",  # FAT stores local time: make it UTC
        "LC_ALL": "C.UTF-8",  # long names are UTF-8 on the host side
    })
    return env


def _chunks(items: list[t.Any], budget: int = 64 * 1024, most: int = 512) -> t.Iterator[list[t.Any]]:
    chunk: list[t.Any] = []
    used = 0
    for item in items:
        size = len(item) + 1
        if chunk and (used + size > budget or len(chunk) >= most):
            yield chunk
            chunk, used = [], 0
        chunk.append(item)
        used += size
    if chunk:
        yield chunk


def dos_path(relative: bytes) -> bytes:
    """``::/a/b`` for a path relative to the filesystem root."""
    return b"::/" + relative


def mmd_argv(program: str, image: str, directories: list[bytes]) -> list[list[bytes | str]]:
    """``mmd -i IMAGE ::/a ::/a/b ...``, split so no command line grows too long; parents come first."""
    return [[program, "-i", image] + [dos_path(path) for path in chunk] for chunk in _chunks(directories)]


def mcopy_argv(program: str, image: str, files: list[bytes], directory: bytes) -> list[list[bytes | str]]:
    """``mcopy -m -Q -D o -i IMAGE FILE... ::/DIR/``: keep mtimes, stop at the first error, never ask."""
    target = dos_path(directory + b"/" if directory else b"")
    return [[program, "-m", "-Q", "-D", "o", "-i", image] + chunk + [target] for chunk in _chunks(files)]
