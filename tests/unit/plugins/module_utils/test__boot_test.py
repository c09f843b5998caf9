# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Real boots of GRUB smoke images (smoke_image.py) in QEMU, and the module's wiring.

Needs qemu-system-x86_64, grub-pc-bin, sfdisk and mke2fs; the UEFI tests also
need OVMF and grub-efi-amd64-bin. A missing tool fails the tests. Booting
Debian's signed chain under Secure Boot belongs to the UEFI work (the signed
files come from the tree the rootfs role builds); smoke_image.py can already
build such an image from them (--signed-root).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ansible_collections.osimage.builder.plugins.module_utils import _boot_test as bt
from ansible_collections.osimage.builder.plugins.module_utils import _qemu as q
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.tests.unit.plugins.module_utils import smoke_image as si

QEMU = shutil.which(q.QEMU)
HAVE_BIOS_TOOLS = all(shutil.which(t) for t in ("sfdisk", "mke2fs", "grub-mkimage")) and os.path.isdir(si.GRUB_PC_DIR)
HAVE_UEFI_TOOLS = all(shutil.which(t) for t in ("mkfs.vfat", "mmd", "mcopy")) and os.path.isdir(si.GRUB_EFI_DIR) \
    and all(os.path.isfile(p) for p in q.firmware_files(False) + q.firmware_files(True))
KVM_USABLE, KVM_WHY = bt.kvm_usable()
BIOS_TOOLS_MISSING = "needs qemu-system-x86_64 (qemu-system-x86), grub-pc-bin, sfdisk and mke2fs: run scripts/install-system-packages"
UEFI_TOOLS_MISSING = "needs qemu-system-x86, ovmf, grub-efi-amd64-bin and dosfstools/mtools: run scripts/install-system-packages"


@pytest.fixture(scope="session")
def bios_tools():
    if QEMU is None or not HAVE_BIOS_TOOLS:
        pytest.fail(BIOS_TOOLS_MISSING)


@pytest.fixture(scope="session")
def uefi_tools():
    if QEMU is None or not HAVE_UEFI_TOOLS:
        pytest.fail(UEFI_TOOLS_MISSING)


needs_qemu = pytest.mark.usefixtures("bios_tools")
needs_uefi = pytest.mark.usefixtures("uefi_tools")

MARKER = "SMOKE-OK"


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def qemu_processes(path) -> list:
    """PIDs of QEMU processes whose command line names ``path`` (pgrep -f)."""
    pattern = f"qemu-system-x86_64 .*{re.escape(str(path))}"
    proc = subprocess.run(["pgrep", "-f", pattern], stdout=subprocess.PIPE, universal_newlines=True, check=False)
    return [int(pid) for pid in proc.stdout.split()]


def wait_no_qemu(path, seconds=10.0) -> list:
    deadline = time.monotonic() + seconds
    while qemu_processes(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    return qemu_processes(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The smoke images, built once; each under a unique name that pgrep can find."""
    if QEMU is None or not HAVE_BIOS_TOOLS:
        pytest.fail(BIOS_TOOLS_MISSING)
    base = tmp_path_factory.mktemp("smoke")
    built = {
        "msdos": si.build_smoke_image(str(base / "smoke-msdos.img"), "msdos", MARKER),
        "gpt": si.build_smoke_image(str(base / "smoke-gpt.img"), "gpt", MARKER),
        "hang": si.build_smoke_image(str(base / "smoke-hang.img"), "msdos", MARKER, after="hang"),
        "broken": si.build_smoke_image(str(base / "smoke-broken.img"), "msdos", MARKER, boot_code=False),
    }
    return built


@pytest.fixture(scope="module")
def uefi_image(tmp_path_factory):
    if QEMU is None or not HAVE_UEFI_TOOLS:
        pytest.fail(UEFI_TOOLS_MISSING)
    base = tmp_path_factory.mktemp("smoke-uefi")
    return si.build_smoke_image(str(base / "smoke-uefi.img"), "gpt", MARKER, firmware="uefi")


# ---------------------------------------------------------------- BIOS boots under TCG

@needs_qemu
@pytest.mark.parametrize("label, root", [("msdos", "hd0,msdos1"), ("gpt", "hd0,gpt2")])
def test_smoke_image_boots_under_tcg(images, label, root):
    path = images[label]
    before = sha256(path)
    result = bt.boot_test(path, expect=MARKER, accel="tcg", timeout=60)
    assert result["booted"] is True
    assert result["changed"] is False
    assert result["accel"] == "tcg"
    assert result["format"] == "raw"
    assert result["seconds"] < 30
    assert f"{MARKER} root={root}" in result["log_tail"]
    assert "fallback_reason" not in result
    assert result["secure_boot_enabled"] is None
    assert sha256(path) == before  # snapshot=on: the guest never writes the image
    assert wait_no_qemu(path) == []


@needs_qemu
def test_marker_then_hang_returns_at_once_and_kills_qemu(images):
    path = images["hang"]
    start = time.monotonic()
    result = bt.boot_test(path, expect=MARKER, accel="tcg", timeout=120)
    assert result["booted"] is True
    assert result["seconds"] < 30
    assert time.monotonic() - start < 30  # not the timeout, not GRUB's hour-long sleep
    assert qemu_processes(path) == []  # stopped before boot_test returned


@needs_qemu
def test_broken_image_times_out_with_the_log_tail(images):
    path = images["broken"]
    start = time.monotonic()
    with pytest.raises(BuildError) as info:
        bt.boot_test(path, expect=MARKER, accel="tcg", timeout=3)
    assert time.monotonic() - start < 15
    err = info.value
    assert str(err).startswith("timed out: no match for expect 'SMOKE-OK' within 3 s (TCG)")
    assert "nothing at all reached the serial console" in str(err)
    assert err.details["log_tail"] == ""
    assert err.details["booted"] is False
    assert err.details["accel"] == "tcg"
    assert qemu_processes(path) == []


@needs_qemu
def test_guest_powering_off_before_the_match_fails_at_once(images):
    with pytest.raises(BuildError) as info:
        bt.boot_test(images["msdos"], expect="NEVER-PRINTED", accel="tcg", timeout=60)
    assert "the guest powered off or reset under TCG" in str(info.value)
    assert info.value.details["seconds"] < 30
    assert MARKER in info.value.details["log_tail"]


@needs_qemu
def test_expect_regex_with_anchors_sees_clean_lines(images):
    # GRUB writes "\e[H\e[J\e[1;1HSMOKE-OK ...\n\r"; the escapes and CRs are gone before matching.
    result = bt.boot_test(images["msdos"], expect=r"(?m)^SMOKE-OK root=hd0,msdos1$", accel="tcg", timeout=60)
    assert result["booted"] is True


@needs_qemu
def test_log_is_kept_raw_and_not_in_check_mode(images, tmp_path):
    log = tmp_path / "serial.log"
    result = bt.boot_test(images["msdos"], expect=MARKER, accel="tcg", timeout=60, log=str(log))
    assert result["log"] == str(log)
    raw = log.read_bytes()
    assert b"\x1b[" in raw and b"SMOKE-OK root=hd0,msdos1" in raw
    log2 = tmp_path / "check.log"
    result = bt.boot_test(images["msdos"], expect=MARKER, accel="tcg", timeout=60, log=str(log2), check_mode=True)
    assert result["booted"] is True and "log" not in result
    assert not log2.exists()


@needs_qemu
def test_log_is_kept_on_failure(images, tmp_path):
    log = tmp_path / "fail.log"
    with pytest.raises(BuildError):
        bt.boot_test(images["msdos"], expect="NEVER-PRINTED", accel="tcg", timeout=60, log=str(log))
    assert b"SMOKE-OK" in log.read_bytes()


@needs_qemu
def test_qcow2_is_detected_and_booted(images, tmp_path):
    path = str(tmp_path / "smoke.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", images["msdos"], path], check=True)
    before = sha256(path)
    result = bt.boot_test(path, expect=MARKER, accel="tcg", timeout=60)
    assert result["booted"] is True and result["format"] == "qcow2"
    assert "format=qcow2" in " ".join(result["cmd"])
    assert sha256(path) == before


@needs_qemu
def test_relative_image_path(images, monkeypatch):
    monkeypatch.chdir(os.path.dirname(images["msdos"]))
    result = bt.boot_test(os.path.basename(images["msdos"]), expect=MARKER, accel="tcg", timeout=60)
    assert result["booted"] is True
    assert f"file={images['msdos']},format=raw" in " ".join(result["cmd"])


@needs_qemu
def test_bad_extra_args_report_qemu_stderr(images):
    with pytest.raises(BuildError) as info:
        bt.boot_test(images["msdos"], expect=MARKER, accel="tcg", timeout=30, extra_args=["-no-such-option"])
    assert "QEMU exited with rc=1" in str(info.value)
    assert "no-such-option" in str(info.value)


# ---------------------------------------------------------------- KVM and the fallback

@needs_qemu
def test_auto_boots_with_kvm_or_falls_back_to_tcg(images):
    path = images["gpt"]
    result = bt.boot_test(path, expect=MARKER, timeout=120)
    assert result["booted"] is True
    assert result["accel"] in ("kvm", "tcg")
    if result["accel"] == "tcg":
        assert result["fallback_reason"]
    else:
        assert "fallback_reason" not in result
    assert wait_no_qemu(path) == []


@needs_qemu
def test_auto_with_a_short_probe(images):
    # On this project's nested-KVM machines BIOS GRUB needs ~18 s under KVM before it
    # prints anything (0.4 s under TCG), so a 2 s probe falls back; a healthy KVM prints at once.
    result = bt.boot_test(images["msdos"], expect=MARKER, timeout=120, kvm_probe_seconds=2)
    assert result["booted"] is True
    if KVM_USABLE and result["accel"] == "tcg":
        assert result["fallback_reason"] == "no serial output within kvm_probe_seconds=2 under KVM"
    assert result["seconds"] < 30


@needs_qemu
def test_silence_probe_counts_from_the_last_output(images, tmp_path):
    # The probe logic does not depend on the accelerator: the hang image prints the marker
    # at once and then sleeps, so a 2 s gap ends the run ~2 s after the marker.
    argv = q.qemu_argv(images["hang"], "raw", str(tmp_path / "serial.log"), "tcg")
    attempt = bt.run_attempt(argv, str(tmp_path / "serial.log"), str(tmp_path), q.compile_expect("NEVER-PRINTED"),
                             timeout=60, probe_seconds=2, accel="tcg")
    assert attempt.outcome == "silent"
    assert attempt.raw_bytes > 0 and MARKER in attempt.text
    assert 2 <= attempt.seconds - attempt.silent_since < 3
    assert attempt.seconds < 30
    assert qemu_processes(images["hang"]) == []


@needs_qemu
def test_auto_without_kvm_uses_tcg_and_says_why(images, tmp_path):
    result = bt.boot_test(images["msdos"], expect=MARKER, kvm_device=str(tmp_path / "no-kvm"))
    assert result["accel"] == "tcg" and result["booted"] is True
    assert result["fallback_reason"].startswith("KVM is not usable (")


@needs_qemu
def test_kvm_required_but_not_usable(images, tmp_path):
    with pytest.raises(BuildError) as info:
        bt.boot_test(images["msdos"], expect=MARKER, accel="kvm", kvm_device=str(tmp_path / "no-kvm"))
    assert info.value.option == "accel"


@needs_qemu
def test_kvm_forced(images):
    if not KVM_USABLE:
        with pytest.raises(BuildError, match="KVM"):
            bt.boot_test(images["msdos"], expect=MARKER, accel="kvm", timeout=120)
        return
    # Works here, slowly: under nested KVM the real-mode boot stages are emulated.
    result = bt.boot_test(images["msdos"], expect=MARKER, accel="kvm", timeout=120)
    assert result["booted"] is True and result["accel"] == "kvm"
    assert "-cpu" in result["cmd"] and "kvm" in result["cmd"]


# ---------------------------------------------------------------- UEFI

@needs_uefi
def test_uefi_smoke_image_boots_under_tcg(uefi_image):
    before = sha256(uefi_image)
    result = bt.boot_test(uefi_image, expect=MARKER, firmware="uefi", accel="tcg", timeout=120)
    assert result["booted"] is True and result["firmware"] == "uefi"
    assert "SMOKE-OK root=hd0,gpt1" in result["log_tail"]
    assert result["seconds"] < 60
    assert sha256(uefi_image) == before
    assert any("OVMF_CODE_4M.fd" in arg for arg in result["cmd"])
    assert wait_no_qemu(uefi_image) == []


@needs_uefi
def test_uefi_auto(uefi_image):
    # OVMF stops with "KVM internal error" at once under nested KVM here: auto must fall back.
    result = bt.boot_test(uefi_image, expect=MARKER, firmware="uefi", timeout=120)
    assert result["booted"] is True
    if result["accel"] == "tcg" and KVM_USABLE:
        assert result["fallback_reason"]


@needs_uefi
def test_secure_boot_refuses_an_unsigned_boot_loader_quickly(uefi_image):
    start = time.monotonic()
    with pytest.raises(BuildError) as info:
        bt.boot_test(uefi_image, expect=MARKER, firmware="uefi", secure_boot=True, accel="tcg", timeout=120)
    assert time.monotonic() - start < 60  # OVMF's "No bootable option" ends the run, not the timeout
    assert "the firmware found nothing it could boot" in str(info.value)
    assert "Access Denied" in info.value.details["log_tail"]
    assert "q35,smm=on" in info.value.details["cmd"]


# ---------------------------------------------------------------- errors and check mode

def test_check_mode_on_a_missing_image(tmp_path):
    result = bt.boot_test(str(tmp_path / "not-built-yet.img"), check_mode=True)
    assert result["booted"] is None and result["changed"] is False
    assert "does not exist" in result["skipped_reason"]


def test_missing_image_fails_outside_check_mode(tmp_path):
    with pytest.raises(BuildError) as info:
        bt.boot_test(str(tmp_path / "nope.img"))
    assert info.value.option == "image"


def test_bad_regex_names_expect(tmp_path):
    with pytest.raises(BuildError) as info:
        bt.boot_test(str(tmp_path / "nope.img"), expect="(")
    assert info.value.option == "expect"


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(BuildError) as info:
        bt.boot_test(str(tmp_path))
    assert info.value.option == "image"


@pytest.mark.parametrize("kwargs, option", [
    ({"timeout": 0}, "timeout"),
    ({"kvm_probe_seconds": -1}, "kvm_probe_seconds"),
    ({"accel": "hvf"}, "accel"),
    ({"firmware": "coreboot"}, "firmware"),
    ({"secure_boot": True}, "secure_boot"),
])
def test_option_errors(tmp_path, kwargs, option):
    image = tmp_path / "x.img"
    image.write_bytes(bytes(1024))
    with pytest.raises(BuildError) as info:
        bt.boot_test(str(image), **kwargs)
    assert info.value.option == option


def test_qemu_missing_names_the_package(tmp_path):
    image = tmp_path / "x.img"
    image.write_bytes(bytes(1024))
    with pytest.raises(BuildError, match="install the qemu-system-x86 package"):
        bt.boot_test(str(image), qemu="qemu-system-x86_64-not-installed")


def test_ovmf_missing_names_the_package(tmp_path):
    image = tmp_path / "x.img"
    image.write_bytes(bytes(1024))
    fake_qemu = tmp_path / "qemu-system-x86_64"
    fake_qemu.write_text("#!/bin/sh\nexit 1\n")
    fake_qemu.chmod(0o755)
    for secure_boot, option, name in ((False, "firmware", "OVMF_CODE_4M.fd"), (True, "secure_boot", "OVMF_CODE_4M.ms.fd")):
        with pytest.raises(BuildError, match="install the ovmf package") as info:
            bt.boot_test(str(image), firmware="uefi", secure_boot=secure_boot, qemu=str(fake_qemu), ovmf_dir=str(tmp_path))
        assert info.value.option == option and name in str(info.value)


def test_kvm_fallback_reasons():
    attempt = bt.Attempt("kvm", [])
    attempt.outcome, attempt.seconds = "kvm_error", 0.2
    attempt.stderr = "warning: host doesn't support requested feature\nKVM internal error. Suberror: 1\nRAX=0\n"
    assert bt._kvm_fallback_reason(attempt, 20) == "KVM could not run the guest (KVM internal error. Suberror: 1) after 0.2 s"
    attempt.outcome = "silent"
    assert bt._kvm_fallback_reason(attempt, 20) == "no serial output within kvm_probe_seconds=20 under KVM"
    attempt.raw_bytes, attempt.silent_since = 21, 18.4
    assert bt._kvm_fallback_reason(attempt, 20) == (
        "the serial console went silent under KVM for kvm_probe_seconds=20 (after 21 bytes, 18.4 s into the boot)")
    attempt.raw_bytes = 0
    attempt.outcome, attempt.returncode, attempt.stderr = "exited", 1, "qemu-system-x86_64: failed to initialize kvm: Permission denied\n"
    assert "rc=1 under KVM before any serial output (qemu-system-x86_64: failed to initialize kvm" in bt._kvm_fallback_reason(attempt, 20)
    attempt.raw_bytes = 10  # the guest printed something, then QEMU ended: a real failure
    assert bt._kvm_fallback_reason(attempt, 20) is None
    attempt.outcome = "timeout"
    assert bt._kvm_fallback_reason(attempt, 20) is None


# ---------------------------------------------------------------- no QEMU left behind when the caller dies

def _collections_root() -> str:
    here = os.path.dirname(os.path.abspath(bt.__file__))  # .../ansible_collections/osimage/builder/plugins/module_utils
    return os.path.abspath(os.path.join(here, "..", "..", "..", "..", ".."))


@needs_qemu
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_qemu_dies_with_the_caller(images, tmp_path, sig):
    path = str(tmp_path / f"smoke-hang-{sig.name}.img")
    shutil.copyfile(images["hang"], path)
    code = ("import sys; from ansible_collections.osimage.builder.plugins.module_utils._boot_test import boot_test; "
            "boot_test(sys.argv[1], expect='NEVER-PRINTED', accel='tcg', timeout=600)")
    env = dict(os.environ, PYTHONPATH=_collections_root())
    caller = subprocess.Popen([sys.executable, "-c", code, path], env=env)  # pylint: disable=consider-using-with
    workdir = None
    try:
        deadline = time.monotonic() + 30
        while not qemu_processes(path) and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = qemu_processes(path)
        assert pids, "QEMU did not start"
        with open(f"/proc/{pids[0]}/cmdline", "rb") as f:
            serial = [a for a in f.read().decode().split("\0") if a.startswith("file:")][0]
        workdir = os.path.dirname(serial[len("file:"):])
        time.sleep(1)  # GRUB is sleeping by now
        caller.send_signal(sig)
        caller.wait(timeout=30)
        assert wait_no_qemu(path) == []
        if sig == signal.SIGTERM:
            assert not os.path.exists(workdir)  # the finally blocks ran
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)  # SIGKILL leaves the temp dir (QEMU itself is gone)


# ---------------------------------------------------------------- the module, end to end

def _run_module(args, capsys, check_mode=False):
    from ansible.module_utils.testing import patch_module_args  # pylint: disable=import-outside-toplevel

    from ansible_collections.osimage.builder.plugins.modules import boot_test as module  # pylint: disable=import-outside-toplevel

    if check_mode:
        args = dict(args, _ansible_check_mode=True)
    with patch_module_args(args):
        with pytest.raises(SystemExit) as exc:
            module.main()
    return exc.value.code, json.loads(capsys.readouterr().out)


@needs_qemu
def test_module_success_and_failure(images, capsys):
    rc, result = _run_module({"image": images["gpt"], "expect": MARKER, "accel": "tcg", "timeout": 60}, capsys)
    assert rc == 0 and result["booted"] is True and result["changed"] is False and result["accel"] == "tcg"
    rc, result = _run_module({"image": images["broken"], "expect": MARKER, "accel": "tcg", "timeout": 2}, capsys)
    assert rc == 1 and result["failed"] is True
    assert result["msg"].startswith("timed out")
    assert result["log_tail"] == "" and result["booted"] is False


def test_module_check_mode_on_a_missing_image(tmp_path, capsys):
    rc, result = _run_module({"image": str(tmp_path / "later.img")}, capsys, check_mode=True)
    assert rc == 0 and result["booted"] is None and result["changed"] is False and result["skipped_reason"]


def test_module_bad_regex(tmp_path, capsys):
    rc, result = _run_module({"image": str(tmp_path / "later.img"), "expect": "(("}, capsys)
    assert rc == 1 and result["option"] == "expect" and result["msg"].startswith("expect: ")
