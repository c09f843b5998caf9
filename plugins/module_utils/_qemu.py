# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The one place that knows qemu-system-x86_64's command line, for boot tests.

Pure helpers: the QEMU argv for a boot test, the image format from an image's
first (and last) bytes, the default login-prompt regex, and the cleaning of
serial console text before it is matched (carriage returns and terminal escape
sequences removed).

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import re
import struct
import typing as t

from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError

QEMU = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"  # Debian/Ubuntu; qemu-kvm on RHEL/Fedora

FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx")
FIRMWARES = ("bios", "uefi")
ACCELS = ("auto", "kvm", "tcg")

# OVMF from Debian's "ovmf" package (2 MiB code + 528 KiB vars "4M" layout).
# The .ms variant is the Secure Boot capable build whose VARS template has
# Microsoft's KEK/db and the distribution keys enrolled and Secure Boot on.
OVMF_PACKAGE = "ovmf"
OVMF_DIR = "/usr/share/OVMF"
OVMF_FILES = {
    False: ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
    True: ("OVMF_CODE_4M.ms.fd", "OVMF_VARS_4M.ms.fd"),
}

# agetty on a Debian 12 serial console (serial-getty@ttyS0) prints the issue
# file, an empty line, then "HOSTNAME login: " with no newline after it. The
# matched text has CRs and escape sequences removed, and kernel messages may
# follow the prompt on the same line, so nothing is required after ": ".
# Hostnames are letters, digits, '-', '.' and '_' (RFC 1123 plus what systemd allows);
# "Last login: <date>", printed after a login, is not a prompt.
DEFAULT_EXPECT = r"(?m)^(?!Last login)[A-Za-z0-9][A-Za-z0-9._-]* login: "

# Magic bytes (qemu's block/*.c probe functions use the same ones).
QCOW2_MAGIC = b"QFI\xfb"
VMDK_SPARSE_MAGIC = b"KDMV"
VMDK_DESCRIPTOR = b"# Disk DescriptorFile"
VDI_SIGNATURE_OFFSET = 0x40
VDI_SIGNATURE = 0xBEDA107F
VHDX_MAGIC = b"vhdxfile"
VPC_MAGIC = b"conectix"  # the VHD footer's cookie
VPC_FOOTER_SIZE = 512
SNIFF_BYTES = 1024

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ESC \), charset and other two-byte escapes.
_ESCAPE_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[()*+][0-9A-Za-z]|[=>78cDEHMNOZ])")
# An escape sequence that may still be incomplete at the end of a chunk.
_PARTIAL_ESCAPE_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*|[()*+])?\Z")


def sniff_format(head: bytes, tail: bytes = b"") -> str:
    """Return the image format from its first bytes (and its last 512 for fixed VHD).

    qcow2 ``QFI\\xfb``, VMDK ``KDMV`` (sparse and streamOptimized) or a text
    descriptor, VDI signature 0xbeda107f at 0x40, VHDX ``vhdxfile``, VHD
    (qemu's ``vpc``) ``conectix`` at the start (dynamic) or in the footer at
    the end (fixed); anything else is raw.
    """
    if head.startswith(QCOW2_MAGIC):
        return "qcow2"
    if head.startswith(VMDK_SPARSE_MAGIC) or head.startswith(VMDK_DESCRIPTOR):
        return "vmdk"
    if len(head) >= VDI_SIGNATURE_OFFSET + 4 and struct.unpack_from("<I", head, VDI_SIGNATURE_OFFSET)[0] == VDI_SIGNATURE:
        return "vdi"
    if head.startswith(VHDX_MAGIC):
        return "vhdx"
    if head.startswith(VPC_MAGIC) or tail[-VPC_FOOTER_SIZE:].startswith(VPC_MAGIC):
        return "vpc"
    return "raw"


def detect_format(path: str) -> str:
    """Read the bytes sniff_format needs from ``path`` (a file or block device)."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
        tail = b""
        size = f.seek(0, 2)
        if size >= VPC_FOOTER_SIZE:
            f.seek(size - VPC_FOOTER_SIZE)
            tail = f.read(VPC_FOOTER_SIZE)
    return sniff_format(head, tail)


def compile_expect(expect: str | None) -> t.Pattern[str]:
    """Compile the ``expect`` option (None: the login prompt) or raise BuildError naming it."""
    text = DEFAULT_EXPECT if expect is None else expect
    if not isinstance(text, str) or text == "":
        raise BuildError("must be a non-empty regular expression", option="expect")
    try:
        return re.compile(text)
    except re.error as exc:
        raise BuildError(f"{text!r} is not a valid Python regular expression: {exc}", option="expect") from None


class ConsoleText:
    """Turns serial console bytes into matchable text, chunk by chunk.

    Decodes UTF-8 (invalid bytes become U+FFFD), drops carriage returns, NULs
    and terminal escape sequences, and holds back a multi-byte character or an
    escape sequence split between two chunks until the rest arrives.
    """

    def __init__(self) -> None:
        self._pending_bytes = b""
        self._pending_text = ""

    def feed(self, data: bytes, final: bool = False) -> str:
        data = self._pending_bytes + data
        cut = len(data) if final else _utf8_complete(data)
        self._pending_bytes = data[cut:]
        text = self._pending_text + data[:cut].decode("utf-8", errors="replace")
        self._pending_text = ""
        if not final:
            partial = _PARTIAL_ESCAPE_RE.search(text[-64:])
            if partial and partial.group(0):
                keep = len(partial.group(0))
                text, self._pending_text = text[:-keep], text[-keep:]
        return clean_console(text)


def _utf8_complete(data: bytes) -> int:
    """Length of ``data`` without a trailing, possibly incomplete UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)
        if byte >= 0xC0:  # a lead byte: complete if enough continuation bytes follow
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)


def clean_console(text: str) -> str:
    """Remove escape sequences, CRs and NULs from console text."""
    return _ESCAPE_RE.sub("", text).replace("\r", "").replace("\x00", "")


def tail_lines(text: str, lines: int = 40, max_chars: int = 4096) -> str:
    """The last ``lines`` lines of ``text``, at most ``max_chars`` characters."""
    text = text.rstrip("\n")
    result = "\n".join(text.split("\n")[-lines:])
    return result[-max_chars:]


def firmware_files(secure_boot: bool, ovmf_dir: str = OVMF_DIR) -> tuple[str, str]:
    """(code, vars template) paths of the OVMF build for ``secure_boot``."""
    code, variables = OVMF_FILES[bool(secure_boot)]
    return (f"{ovmf_dir}/{code}", f"{ovmf_dir}/{variables}")


def _drive_value(value: str) -> str:
    # QEMU's option parser splits on ',' and takes ',,' as a literal comma.
    return value.replace(",", ",,")


def qemu_argv(
    image: str,
    fmt: str,
    serial_log: str,
    accel: str,
    firmware: str = "bios",
    secure_boot: bool = False,
    memory: int = 1024,
    ovmf_code: str | None = None,
    ovmf_vars: str | None = None,
    extra_args: t.Sequence[str] = (),
    qemu: str = QEMU,
) -> list[str]:
    """Return the qemu-system-x86_64 argv of one boot attempt.

    ``accel`` is the accelerator to use now (``kvm`` or ``tcg``, not ``auto``).
    The image is attached with ``snapshot=on``: QEMU opens it read-only and
    sends every guest write to a temporary overlay, so the image never changes.
    UEFI takes OVMF as two pflash drives: the code read-only, and
    ``ovmf_vars``, which must be a private copy of the VARS template because the
    firmware writes to it. Secure Boot needs the q35 machine with SMM and the
    secure pflash so that the guest cannot write the variable store directly.
    The serial console goes to ``serial_log``; there is no display, monitor,
    network or reboot (a guest reset makes QEMU exit).
    """
    if fmt not in FORMATS:
        raise BuildError(f"{fmt!r} is not one of {', '.join(FORMATS)}", option="format")
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be kvm or tcg at this point, got {accel!r}")
    if firmware not in FIRMWARES:
        raise BuildError(f"{firmware!r} is not one of {', '.join(FIRMWARES)}", option="firmware")
    if secure_boot and firmware != "uefi":
        raise BuildError("Secure Boot needs firmware=uefi", option="secure_boot")
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 16:
        raise BuildError(f"{memory!r} is not a memory size in MiB (16 or more)", option="memory")
    # -nodefaults: no default CD-ROM, floppy, NIC, parallel port or monitor; what is needed is added below.
    argv = [qemu, "-nodefaults"]
    if secure_boot:
        argv += ["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on"]
    argv += ["-accel", accel]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    argv += ["-m", str(memory)]
    if firmware == "uefi":
        if not ovmf_code or not ovmf_vars:
            raise ValueError("firmware=uefi needs ovmf_code and ovmf_vars")
        argv += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_drive_value(ovmf_code)}",
            "-drive", f"if=pflash,format=raw,unit=1,file={_drive_value(ovmf_vars)}",
        ]
    argv += [
        "-drive", f"file={_drive_value(image)},format={fmt},if=ide,media=disk,snapshot=on",
        "-display", "none",
        "-vga", "std",
        "-serial", f"file:{serial_log}",
        "-monitor", "none",
        "-nic", "none",
        "-no-reboot",
    ]
    argv += [str(arg) for arg in extra_args]
    return argv
