# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The one place that knows qemu-img's command line, for image conversion.

Pure helpers: checking a conversion request (format, compression, ``-o`` options),
the argv of ``qemu-img convert``, ``info``, ``--version`` and ``create -o help``,
and parsing their output. Nothing here runs a process.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import json
import re
import typing as t

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError

QEMU_IMG = "qemu-img"
QEMU_IMG_PACKAGE = "qemu-utils (Debian, Ubuntu) / qemu-img (Fedora, RHEL)"

FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx")
COMPRESSION_TYPES = ("zlib", "zstd")
# qemu-img's default compression type; passing it explicitly would fail on QEMU < 5.1,
# which does not know the compression_type option.
DEFAULT_COMPRESSION_TYPE = "zlib"

# VMDK subformats whose image is one file. The others (monolithicFlat, twoGbMaxExtent*)
# write a descriptor plus extent files that an atomic rename of one file cannot publish.
VMDK_SINGLE_FILE = ("monolithicSparse", "streamOptimized")
VMDK_STREAM = "streamOptimized"

# -o keys the module sets itself, or that would make the output more than one
# self-contained file: each with the reason given to the user.
RESERVED_OPTIONS = {
    "compression_type": "set it with the compression_type option",
    "size": "the virtual size is always the size of src",
    "backing_file": "a converted image stands alone, without a backing file",
    "backing_fmt": "a converted image stands alone, without a backing file",
    "data_file": "an external data file would be a second output file, which this module does not manage",
    "data_file_raw": "an external data file would be a second output file, which this module does not manage",
    "encryption": "encrypted images need secrets (qemu-img --object), which this module does not pass",
    "encrypt": "encrypted images need secrets (qemu-img --object), which this module does not pass",
}

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HELP_RE = re.compile(r"^\s+([A-Za-z0-9][A-Za-z0-9_.-]*)=<")
_VERSION_RE = re.compile(r"qemu-img version (\d+(?:\.\d+)+)")


# ----------------------------------------------------------------------------
# The request


def _value_text(key: str, value: object) -> str:
    """The text qemu-img gets for one -o value (YAML's ``on`` arrives as True)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    raise BuildError(f"the value of {key!r} must be a string, a number or a boolean, not {type(value).__name__}",
                     option="options")


def _checked_pair(key: object, value: object) -> tuple[str, str]:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise BuildError(f"{key!r} is not a qemu-img option name (letters, digits, '_', '.' and '-')", option="options")
    text = _value_text(key, value)
    if text == "":
        raise BuildError(f"{key!r} has an empty value", option="options")
    if "," in text:
        raise BuildError(f"the value of {key!r} contains a comma, which qemu-img -o would read as the start of "
                         "another option", option="options")
    if any(char in text for char in "\0\n\r"):
        raise BuildError(f"the value of {key!r} contains a NUL byte or a line break", option="options")
    base = key.split(".", 1)[0]
    reason = RESERVED_OPTIONS.get(key) or RESERVED_OPTIONS.get(base)
    if reason:
        raise BuildError(f"{key!r} cannot be given in options: {reason}", option="options")
    return key, text


def normalize_options(options: object) -> list[tuple[str, str]]:
    """``options`` (a dict, or a list of ``key=value`` strings) as sorted ``(key, value)`` pairs."""
    if options is None:
        return []
    pairs: list[tuple[str, str]] = []
    if isinstance(options, dict):
        for key, value in options.items():
            pairs.append(_checked_pair(key, value))
    elif isinstance(options, (list, tuple)):
        for item in options:
            if not isinstance(item, str) or "=" not in item:
                raise BuildError(f"{item!r} is not of the form key=value (for a boolean write e.g. force_size=on)",
                                 option="options")
            key, value = item.split("=", 1)
            pairs.append(_checked_pair(key.strip(), value.strip()))
    else:
        raise BuildError(f"must be a dict or a list of key=value strings, not {type(options).__name__}", option="options")
    keys = [key for key, value in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise BuildError(f"{', '.join(duplicates)} given more than once", option="options")
    return sorted(pairs)


def options_text(pairs: t.Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{key}={value}" for key, value in pairs)


def check_request(fmt: str, compress: bool, compression_type: str, pairs: t.Sequence[tuple[str, str]]) -> None:
    """Raise BuildError, naming the option, for a combination qemu-img cannot do (or does silently wrong)."""
    if fmt not in FORMATS:
        raise BuildError(f"{fmt!r} is not one of {', '.join(FORMATS)}", option="format")
    if compression_type not in COMPRESSION_TYPES:
        raise BuildError(f"{compression_type!r} is not one of {', '.join(COMPRESSION_TYPES)}", option="compression_type")
    given = dict(pairs)
    subformat = given.get("subformat")
    if fmt == "vmdk" and subformat is not None and subformat not in VMDK_SINGLE_FILE:
        raise BuildError(f"subformat={subformat} writes several files; use one of {', '.join(VMDK_SINGLE_FILE)}",
                         option="options")
    if compress:
        if fmt == "vmdk" and subformat != VMDK_STREAM:
            # qemu-img -c with a monolithicSparse vmdk succeeds but writes nothing compressed.
            raise BuildError("vmdk is compressed only as subformat=streamOptimized; "
                             "add options {subformat: streamOptimized}", option="compress")
        if fmt not in ("qcow2", "vmdk"):
            raise BuildError(f"qemu-img cannot compress {fmt} images; only qcow2 and vmdk (subformat=streamOptimized) "
                             "can be compressed", option="compress")
    if compression_type != DEFAULT_COMPRESSION_TYPE:
        if fmt != "qcow2":
            raise BuildError(f"compression_type={compression_type} applies to qcow2 only", option="compression_type")
        if not compress:
            raise BuildError(f"compression_type={compression_type} takes effect only with compress=true",
                             option="compression_type")


def effective_compression_type(fmt: str, compress: bool, compression_type: str) -> str | None:
    """The compression type the output really gets (None: nothing is compressed, or vmdk's deflate)."""
    if fmt == "qcow2" and compress:
        return compression_type
    return None


# ----------------------------------------------------------------------------
# argv


def convert_argv(qemu_img: str, src: str, dest: str, fmt: str, compress: bool = False,
                 compression_type: str = DEFAULT_COMPRESSION_TYPE,
                 pairs: t.Sequence[tuple[str, str]] = ()) -> list[str]:
    """``qemu-img convert`` from a raw ``src`` to ``dest`` in ``fmt``.

    Never ``-W``: out-of-order writes make the output differ from run to run.
    The cache mode stays qemu-img's default for convert (``unsafe``, no flushes):
    the caller fsyncs the finished file once, which is as fast and works on every
    filesystem (``-t none`` needs O_DIRECT, which tmpfs refuses).
    Paths must be absolute, so a name such as ``nbd:x`` or ``json:{}`` is never
    taken for a protocol.
    """
    argv = [qemu_img, "convert", "-f", "raw", "-O", fmt]
    if compress:
        argv.append("-c")
    wanted = list(pairs)
    if effective_compression_type(fmt, compress, compression_type) not in (None, DEFAULT_COMPRESSION_TYPE):
        wanted.append(("compression_type", compression_type))
    if wanted:
        argv += ["-o", options_text(sorted(wanted))]
    argv += [src, dest]
    return argv


def info_argv(qemu_img: str, path: str, fmt: str) -> list[str]:
    return [qemu_img, "info", "--output=json", "-f", fmt, path]


def version_argv(qemu_img: str) -> list[str]:
    return [qemu_img, "--version"]


def options_help_argv(qemu_img: str, fmt: str, target: str) -> list[str]:
    """List the -o options of ``fmt``; with a target path the protocol's options too. Creates nothing."""
    return [qemu_img, "create", "-f", fmt, "-o", "help", target]


# ----------------------------------------------------------------------------
# Output


def parse_version(text: str) -> str:
    """``7.2.22`` from ``qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7)``."""
    match = _VERSION_RE.search(text)
    if not match:
        raise BuildError(f"cannot read the qemu-img version from {text.strip()[:200]!r}", option="format")
    return match.group(1)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def parse_options_help(text: str) -> set[str]:
    """The option names listed by ``qemu-img create -f FMT -o help``."""
    return {match.group(1) for match in map(_HELP_RE.match, text.splitlines()) if match}


def check_supported(pairs: t.Sequence[tuple[str, str]], supported: set[str], fmt: str) -> None:
    unknown = [key for key, value in pairs if key not in supported]
    if unknown and supported:
        raise BuildError(f"{', '.join(unknown)}: not an option of {fmt} images for this qemu-img; "
                         f"it knows {', '.join(sorted(supported))}", option="options")


def parse_info(text: str) -> dict[str, t.Any]:
    """The parts of ``qemu-img info --output=json`` the module returns."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BuildError(f"qemu-img info printed something that is not JSON: {exc}", option="dest")
    if not isinstance(data, dict) or not isinstance(data.get("virtual-size"), int) or not isinstance(data.get("format"), str):
        raise BuildError("qemu-img info gave no virtual-size or format", option="dest")
    specific = data.get("format-specific")
    details = specific.get("data") if isinstance(specific, dict) and isinstance(specific.get("data"), dict) else {}
    actual = data.get("actual-size")
    return {
        "format": data["format"],
        "virtual_size": data["virtual-size"],
        "actual_size": actual if isinstance(actual, int) else None,
        "dirty": bool(data.get("dirty-flag", False)),
        "compression_type": details.get("compression-type"),
        "create_type": details.get("create-type"),
    }


def blame(stderr: str, pairs: t.Sequence[tuple[str, str]], compression_type: str | None, src: str = "") -> str:
    """The option a failed ``qemu-img convert`` most likely points at, from its message."""
    if src and f"'{src}'" in stderr:
        return "src"
    text = stderr.lower()
    if compression_type and compression_type != DEFAULT_COMPRESSION_TYPE and ("compression" in text or "zstd" in text):
        return "compression_type"
    if pairs and ("parameter" in text or "option" in text or any(key.lower() in text for key, value in pairs)):
        return "options"
    return "dest"
