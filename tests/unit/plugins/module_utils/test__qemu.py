# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from ansible_collections.osimage.builder.plugins.module_utils import _qemu as q
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError

CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
VARS = "/w/OVMF_VARS-0.fd"
TAIL = ["-display", "none", "-vga", "std", "-serial", "file:/w/serial.log", "-monitor", "none", "-nic", "none", "-no-reboot"]


def argv(**kwargs):
    args = {"image": "/img/disk.raw", "fmt": "raw", "serial_log": "/w/serial.log", "accel": "tcg"}
    args.update(kwargs)
    return q.qemu_argv(**args)


# ---------------------------------------------------------------- argv, argument by argument

def test_argv_bios_tcg():
    assert argv() == [
        "qemu-system-x86_64", "-nodefaults",
        "-accel", "tcg",
        "-m", "1024",
        "-drive", "file=/img/disk.raw,format=raw,if=ide,media=disk,snapshot=on",
    ] + TAIL


def test_argv_bios_kvm_uses_host_cpu():
    assert argv(accel="kvm", memory=512) == [
        "qemu-system-x86_64", "-nodefaults",
        "-accel", "kvm", "-cpu", "host",
        "-m", "512",
        "-drive", "file=/img/disk.raw,format=raw,if=ide,media=disk,snapshot=on",
    ] + TAIL


def test_argv_qcow2():
    assert argv(image="/img/disk.qcow2", fmt="qcow2")[7] == "file=/img/disk.qcow2,format=qcow2,if=ide,media=disk,snapshot=on"


def test_argv_uefi():
    assert argv(firmware="uefi", ovmf_code=CODE, ovmf_vars=VARS) == [
        "qemu-system-x86_64", "-nodefaults",
        "-accel", "tcg",
        "-m", "1024",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={VARS}",
        "-drive", "file=/img/disk.raw,format=raw,if=ide,media=disk,snapshot=on",
    ] + TAIL


def test_argv_secure_boot():
    code = "/usr/share/OVMF/OVMF_CODE_4M.ms.fd"
    assert argv(firmware="uefi", secure_boot=True, accel="kvm", ovmf_code=code, ovmf_vars=VARS) == [
        "qemu-system-x86_64", "-nodefaults",
        "-machine", "q35,smm=on",
        "-global", "driver=cfi.pflash01,property=secure,value=on",
        "-accel", "kvm", "-cpu", "host",
        "-m", "1024",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={VARS}",
        "-drive", "file=/img/disk.raw,format=raw,if=ide,media=disk,snapshot=on",
    ] + TAIL


def test_argv_extra_args_come_last_and_commas_are_escaped():
    result = argv(image="/img/a,b.raw", extra_args=["-smp", 2], qemu="/opt/qemu/bin/qemu-system-x86_64")
    assert result[0] == "/opt/qemu/bin/qemu-system-x86_64"
    assert "file=/img/a,,b.raw,format=raw,if=ide,media=disk,snapshot=on" in result
    assert result[-2:] == ["-smp", "2"]


def test_firmware_files():
    assert q.firmware_files(False) == ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd")
    assert q.firmware_files(True, "/x") == ("/x/OVMF_CODE_4M.ms.fd", "/x/OVMF_VARS_4M.ms.fd")


@pytest.mark.parametrize("kwargs, option", [
    ({"fmt": "qed"}, "format"),
    ({"firmware": "coreboot"}, "firmware"),
    ({"secure_boot": True}, "secure_boot"),
    ({"memory": 0}, "memory"),
    ({"memory": True}, "memory"),
])
def test_argv_errors(kwargs, option):
    with pytest.raises(BuildError) as info:
        argv(**kwargs)
    assert info.value.option == option


def test_argv_needs_a_concrete_accel_and_ovmf_files():
    with pytest.raises(ValueError):
        argv(accel="auto")
    with pytest.raises(ValueError):
        argv(firmware="uefi")


# ---------------------------------------------------------------- format sniffing

def test_sniff_synthetic_headers():
    vdi = bytearray(512)
    vdi[0x40:0x44] = (0xBEDA107F).to_bytes(4, "little")
    assert q.sniff_format(b"QFI\xfb\x00\x00\x00\x03") == "qcow2"
    assert q.sniff_format(b"KDMV\x01\x00\x00\x00") == "vmdk"
    assert q.sniff_format(b"# Disk DescriptorFile\nversion=1\n") == "vmdk"
    assert q.sniff_format(bytes(vdi)) == "vdi"
    assert q.sniff_format(b"vhdxfile") == "vhdx"
    assert q.sniff_format(b"conectix\x00\x00\x00\x02") == "vpc"
    assert q.sniff_format(bytes(512), b"conectix" + bytes(504)) == "vpc"
    assert q.sniff_format(bytes(512), bytes(512)) == "raw"
    assert q.sniff_format(b"\xeb\x63\x90" + bytes(509)) == "raw"  # an MBR
    assert q.sniff_format(b"") == "raw"


QEMU_IMG = shutil.which("qemu-img") or "qemu-img"  # missing: the test fails with FileNotFoundError
REAL_FORMATS = [
    ("qcow2", [], "qcow2"),
    ("vmdk", [], "vmdk"),
    ("vmdk", ["-o", "subformat=streamOptimized"], "vmdk"),
    ("vmdk", ["-o", "subformat=monolithicFlat"], "vmdk"),  # a text descriptor + a -flat.vmdk extent
    ("vdi", [], "vdi"),
    ("vhdx", [], "vhdx"),
    ("vpc", [], "vpc"),  # dynamic: footer copy at the start
    ("vpc", ["-o", "subformat=fixed"], "vpc"),  # fixed: footer only at the end
    ("raw", [], "raw"),
]


@pytest.mark.parametrize("fmt, options, expected", REAL_FORMATS, ids=[f"{case[0]}{'-' + case[1][1] if case[1] else ''}" for case in REAL_FORMATS])
def test_detect_format_of_qemu_img_files(tmp_path, fmt, options, expected):
    path = str(tmp_path / f"disk.{fmt}")
    subprocess.run([QEMU_IMG, "create", "-q", "-f", fmt] + options + [path, "16M"], check=True)
    assert q.detect_format(path) == expected
    info = subprocess.run([QEMU_IMG, "info", "--output=json", path], check=True, stdout=subprocess.PIPE, universal_newlines=True).stdout
    if options == ["-o", "subformat=fixed"]:
        # qemu's own probe looks for "conectix" at offset 0 only, so it calls a fixed VHD raw
        # (which boots too: a fixed VHD is the raw disk plus a 512-byte footer).
        assert '"format": "raw"' in info
    else:
        assert f'"format": "{expected}"' in info


def test_detect_format_of_small_and_empty_files(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    small = tmp_path / "small"
    small.write_bytes(b"QFI\xfb")
    assert q.detect_format(str(empty)) == "raw"
    assert q.detect_format(str(small)) == "qcow2"


# ---------------------------------------------------------------- the default expect regex

# What Debian 12's serial-getty@ttyS0 (agetty) printed at the end of a real boot
# under QEMU, byte for byte: systemd status lines, the issue file, the prompt.
DEBIAN_12_TAIL = (
    b"[\x1b[0;32m  OK  \x1b[0m] Finished \x1b[0;1;39msystemd-update-ut\xe2\x80\xa6 - Record Runlevel Change in UTMP.\r\r\n"
    b"\r\r\n"
    b"Debian GNU/Linux 12 debian ttyS0\r\n"
    b"\r\n"
    b"debian login: "
)


def console(data: bytes) -> str:
    return q.ConsoleText().feed(data, final=True)


@pytest.mark.parametrize("text", [
    console(DEBIAN_12_TAIL),
    "debian login: ",
    "\ndebian login: ",
    "Debian GNU/Linux 12 debian ttyS0\n\nbuild-01.example.org login: ",
    "debian login: [   15.271820] random: crng init done\n",  # a kernel message right after the prompt
    "localhost login: ",
    "ubuntu-2204_x login: ",
])
def test_default_expect_matches_getty_prompts(text):
    assert q.compile_expect(None).search(text)


@pytest.mark.parametrize("text", [
    "Last login: Mon Jan  1 00:00:00 UTC 2024 on ttyS0",
    " login: ",
    "login: ",
    "debian login:",  # agetty always prints the space; a bare colon is something else
    "Login incorrect",
    "[  OK  ] Started systemd-logind.service - User Login Management.",
    "Jan 01 00:00:00 debian login[301]: pam_unix(login:session): session opened",
    "Starting getty on debian login: soon",  # not at the start of a line
])
def test_default_expect_ignores_other_lines(text):
    assert not q.compile_expect(None).search(text)


def test_compile_expect_errors_name_the_option():
    for bad in ("(unclosed", "", "*x"):
        with pytest.raises(BuildError) as info:
            q.compile_expect(bad)
        assert info.value.option == "expect"
    assert q.compile_expect("SMOKE-OK").pattern == "SMOKE-OK"


# ---------------------------------------------------------------- console text

def test_console_text_removes_escapes_and_crs():
    raw = b"\x1b[H\x1b[J\x1b[1;1HSMOKE-OK root=hd0,msdos1\n\r\x1b]0;title\x07done\x1b(B\x1b=\r\n"
    assert console(raw) == "SMOKE-OK root=hd0,msdos1\ndone\n"


def test_console_text_joins_escapes_and_utf8_split_between_chunks():
    raw = b"\x1b[0;32m  OK  \x1b[0m] caf\xc3\xa9 \xe2\x80\xa6 end\r\n"
    for cut in range(1, len(raw)):
        feeder = q.ConsoleText()
        text = feeder.feed(raw[:cut]) + feeder.feed(raw[cut:]) + feeder.feed(b"", final=True)
        assert text == "  OK  ] caf\u00e9 \u2026 end\n", cut


def test_console_text_invalid_utf8_and_final_flush():
    feeder = q.ConsoleText()
    assert feeder.feed(b"a\xff b\x1b[") == "a\ufffd b"
    assert feeder.feed(b"", final=True) == "\x1b["


def test_tail_lines():
    text = "".join(f"line {i}\n" for i in range(100))
    tail = q.tail_lines(text)
    assert tail.split("\n") == [f"line {i}" for i in range(60, 100)]
    assert len(q.tail_lines("x" * 10000)) == 4096
    assert q.tail_lines("") == ""


def test_default_expect_is_the_documented_one():
    # The module's DOCUMENTATION repeats the default; keep them equal.
    here = os.path.dirname(os.path.abspath(q.__file__))
    with open(os.path.join(here, "..", "modules", "boot_test.py")) as f:
        doc = f.read()
    assert f"default: '{q.DEFAULT_EXPECT}'" in doc
    assert re.compile(q.DEFAULT_EXPECT).flags & re.MULTILINE
