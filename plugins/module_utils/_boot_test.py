# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Boot an image in QEMU and wait for a regex on its serial console.

QEMU runs with the image attached ``snapshot=on`` (never written), the serial
console going to a file in a private temp dir, no display, network or reboot.
The log is polled every ``POLL_SECONDS``; QEMU is stopped (SIGTERM, then
SIGKILL) as soon as the regex matches, on timeout and on every error path.

``accel=auto`` rule: KVM is tried only when ``/dev/kvm`` opens read-write.
The KVM attempt is abandoned and the boot started again under TCG when QEMU
reports a KVM failure on stderr (e.g. ``KVM internal error``, which is what
OVMF hits under nested KVM on some hosts), when QEMU exits before the guest
printed anything, or when the serial console stays silent for
``kvm_probe_seconds`` before the match: from QEMU's start, or since the
guest's last output. Under nested KVM, real-mode code (SeaBIOS, GRUB's BIOS
stages and its INT 13h disk reads) is emulated instruction by instruction and
can be slower than TCG by orders of magnitude: measured on the project's
machines, BIOS GRUB printed after ~18 s under KVM (0.4 s under TCG) and then
needed minutes to read a Debian kernel and initrd, which TCG booted to the
login prompt in 30 s. A silence gap catches both the hang-like start and the
stall later on.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import typing as t

from ansible_collections.osimage.builder.plugins.module_utils import _qemu
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._image import atomic_output, image_kind

KVM_DEVICE = "/dev/kvm"
POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 5.0
SEARCH_OVERLAP = 64 * 1024  # a match may start this far before the newest output
MAX_TEXT = 8 * 1024 * 1024  # console text kept in memory for matching
READ_CHUNK = 1024 * 1024
# What QEMU prints on stderr when KVM cannot run (or start) the guest.
KVM_FAILURE_RE = re.compile(
    r"KVM internal error|kvm run failed|failed to initialize kvm|Could not access KVM kernel module"
    r"|KVM_[A-Z_]+ failed|kvm_init_vcpu failed|error: failed to set MSR",
    re.IGNORECASE,
)
# KVM's CPUID warnings and QEMU's note that we stopped it.
_STDERR_NOISE = re.compile(r"host doesn't support requested feature|terminating on signal")
# Firmware messages after which nothing will ever boot: OVMF waits for a key press forever.
DEAD_END_RE = re.compile(r"BdsDxe: No bootable option or device was found")
REFUSED_RE = re.compile(r"Access Denied|Security Violation")
SECURE_BOOT_RE = re.compile(r"Secure boot (enabled|disabled)", re.IGNORECASE)
NO_OUTPUT_HINT = (
    "; nothing at all reached the serial console: the boot loader and the OS must write to the first serial port"
    " (GRUB: serial --unit=0 and terminal_output serial; Linux: console=ttyS0,115200)"
)


class Attempt:
    """The outcome of one QEMU run."""

    def __init__(self, accel: str, argv: list[str]) -> None:
        self.accel = accel
        self.argv = argv
        self.outcome = ""  # matched, exited, timeout, silent, kvm_error, dead_end
        self.seconds = 0.0
        self.returncode: int | None = None
        self.raw_bytes = 0
        self.silent_since = 0.0
        self.text = ""
        self.stderr = ""
        self.serial_log = ""


def kvm_usable(device: str = KVM_DEVICE) -> tuple[bool, str]:
    """(True, "") when ``device`` opens read-write, else (False, why)."""
    try:
        fd = os.open(device, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return False, f"{device}: {exc.strerror or exc}"
    os.close(fd)
    return True, ""


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Have the kernel kill QEMU if this process dies (even by SIGKILL)."""
    try:
        import ctypes  # pylint: disable=import-outside-toplevel

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # pylint: disable=broad-except
        pass


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM QEMU's process group, then SIGKILL; always reap it."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


class _TermAsExit:
    """Turn SIGTERM into SystemExit while QEMU runs, so ``finally`` stops it."""

    def __init__(self) -> None:
        self.previous: t.Any = None
        self.installed = False

    def __enter__(self) -> "_TermAsExit":
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handler)
            self.installed = True
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous)


def _read_new(path: str, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(READ_CHUNK)
    except FileNotFoundError:
        return b""


def run_attempt(
    argv: list[str],
    serial_log: str,
    workdir: str,
    pattern: t.Pattern[str],
    timeout: float,
    probe_seconds: float | None = None,
    watch_kvm_errors: bool = False,
    accel: str = "tcg",
) -> Attempt:
    """Run QEMU once and watch ``serial_log`` until a match, exit, timeout or failed probe."""
    attempt = Attempt(accel, argv)
    attempt.serial_log = serial_log
    stderr_path = os.path.join(workdir, f"qemu-{accel}.stderr")
    console = _qemu.ConsoleText()
    text = ""
    offset = 0
    search_from = 0
    last_output = 0.0
    env = dict(os.environ, TMPDIR=workdir, LC_ALL="C")
    with open(stderr_path, "wb") as err, _TermAsExit():
        start = time.monotonic()
        # Not module.run_command: QEMU must run in the background while its serial log is polled.
        proc = subprocess.Popen(  # pylint: disable=consider-using-with,ansible-bad-function
            argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=workdir, env=env,
            start_new_session=True, preexec_fn=_set_pdeathsig, close_fds=True,
        )
        try:
            while True:
                returncode = proc.poll()
                # Read after poll(): once QEMU has exited, everything it wrote is in the file.
                while True:
                    chunk = _read_new(serial_log, offset)
                    if not chunk:
                        break
                    offset += len(chunk)
                    text += console.feed(chunk)
                    if len(chunk) < READ_CHUNK:
                        break
                if returncode is not None:
                    text += console.feed(b"", final=True)
                if len(text) > MAX_TEXT:
                    cut = len(text) - MAX_TEXT // 2
                    text = text[cut:]
                    search_from = max(0, search_from - cut)
                elapsed = time.monotonic() - start
                attempt.seconds = elapsed
                if offset > attempt.raw_bytes:
                    last_output = elapsed
                    attempt.raw_bytes = offset
                new_from = max(0, search_from - SEARCH_OVERLAP)
                match = pattern.search(text, new_from)
                dead_end = DEAD_END_RE.search(text, new_from)
                search_from = len(text)
                if match:
                    attempt.outcome = "matched"
                    break
                if dead_end:
                    attempt.outcome = "dead_end"
                    break
                if returncode is not None:
                    attempt.outcome = "exited"
                    attempt.returncode = returncode
                    break
                if watch_kvm_errors and KVM_FAILURE_RE.search(_read_text(stderr_path)):
                    attempt.outcome = "kvm_error"
                    break
                if probe_seconds is not None and elapsed - last_output >= probe_seconds:
                    attempt.outcome = "silent"
                    attempt.silent_since = last_output
                    break
                if elapsed >= timeout:
                    attempt.outcome = "timeout"
                    break
                time.sleep(POLL_SECONDS)
        finally:
            _stop(proc)
    attempt.text = text
    attempt.stderr = _read_text(stderr_path)
    return attempt


def _read_text(path: str, limit: int = 64 * 1024) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _stderr_summary(stderr: str) -> str:
    """QEMU's stderr without the noise of KVM's CPUID warnings, last lines only."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not _STDERR_NOISE.search(line)]
    for index, line in enumerate(lines):
        if KVM_FAILURE_RE.search(line):
            # "KVM internal error. Suberror: 1" is followed by a register dump; the first line says it all.
            return " | ".join(lines[index:index + 1])[-1000:]
    return " | ".join(lines[-6:])[-1000:]


def _secure_boot_state(text: str) -> bool | None:
    found = SECURE_BOOT_RE.findall(text)
    if not found:
        return None
    return found[-1].lower() == "enabled"


def _check_number(value: object, option: str, minimum: float, allow_equal: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BuildError(f"{value!r} is not a number", option=option)
    if value < minimum or (value == minimum and not allow_equal):
        raise BuildError(f"must be {'at least' if allow_equal else 'more than'} {minimum}, got {value}", option=option)
    return float(value)


def _qemu_binary(name: str) -> str:
    path = shutil.which(name) if os.sep not in name else (name if os.access(name, os.X_OK) else None)
    if not path:
        raise BuildError(
            f"{name} was not found on the build host; install the {_qemu.QEMU_PACKAGE} package"
            " (Debian/Ubuntu; qemu-kvm on RHEL/Fedora)",
        )
    return path


def _firmware(firmware: str, secure_boot: bool, ovmf_dir: str) -> tuple[str | None, str | None]:
    if firmware != "uefi":
        return None, None
    code, variables = _qemu.firmware_files(secure_boot, ovmf_dir)
    missing = [p for p in (code, variables) if not os.path.isfile(p)]
    if missing:
        raise BuildError(
            f"UEFI firmware {', '.join(missing)} is missing; install the {_qemu.OVMF_PACKAGE} package",
            option="secure_boot" if secure_boot else "firmware",
        )
    return code, variables


def _write_log(src: str, dest: str) -> None:
    with atomic_output(dest) as tmp:
        if os.path.exists(src):
            shutil.copyfile(src, tmp)


def _failure_message(attempt: Attempt, timeout: float, expect_text: str) -> str:
    where = f"under {attempt.accel.upper()} after {attempt.seconds:.1f} s"
    hint = NO_OUTPUT_HINT if attempt.raw_bytes == 0 else ""
    if attempt.outcome == "timeout":
        return (f"timed out: no match for expect {expect_text!r} within {timeout:g} s ({attempt.accel.upper()});"
                f" the serial console printed {attempt.raw_bytes} bytes{hint}")
    if attempt.outcome == "dead_end":
        refused = ""
        if REFUSED_RE.search(attempt.text):
            refused = ("; the firmware refused to start a boot loader (Access Denied / Security Violation):"
                       " with Secure Boot on it must be signed with a key in the firmware's db, e.g. shim signed by Microsoft")
        return f"the firmware found nothing it could boot {where}{refused}"
    if attempt.outcome == "kvm_error":
        return (f"KVM could not run the guest {where}: {_stderr_summary(attempt.stderr)}; use accel=tcg"
                " (or auto, which falls back to TCG)")
    if attempt.returncode == 0:
        return (f"the guest powered off or reset {where} before the serial console matched expect {expect_text!r}"
                f" ({attempt.raw_bytes} bytes printed){hint}")
    return f"QEMU exited with rc={attempt.returncode} {where}: {_stderr_summary(attempt.stderr) or 'no message'}"


def boot_test(
    image: str,
    fmt: str | None = None,
    firmware: str = "bios",
    secure_boot: bool = False,
    expect: str | None = None,
    timeout: float = 300,
    accel: str = "auto",
    memory: int = 1024,
    extra_args: t.Sequence[str] | None = None,
    log: str | None = None,
    kvm_probe_seconds: float = 20,
    check_mode: bool = False,
    qemu: str = _qemu.QEMU,
    ovmf_dir: str = _qemu.OVMF_DIR,
    kvm_device: str = KVM_DEVICE,
) -> dict:
    """Boot ``image`` and wait for ``expect``; return the module result or raise BuildError."""
    pattern = _qemu.compile_expect(expect)
    expect_text = pattern.pattern
    timeout = _check_number(timeout, "timeout", 0)
    kvm_probe_seconds = _check_number(kvm_probe_seconds, "kvm_probe_seconds", 0, allow_equal=True)
    if accel not in _qemu.ACCELS:
        raise BuildError(f"{accel!r} is not one of {', '.join(_qemu.ACCELS)}", option="accel")
    if firmware not in _qemu.FIRMWARES:
        raise BuildError(f"{firmware!r} is not one of {', '.join(_qemu.FIRMWARES)}", option="firmware")
    if secure_boot and firmware != "uefi":
        raise BuildError("Secure Boot needs firmware=uefi", option="secure_boot")
    extra = [str(arg) for arg in (extra_args or [])]

    if image_kind(image, option="image", allow_block_device=True) is None:
        if check_mode:
            return {"changed": False, "booted": None, "accel": None, "seconds": None, "log_tail": "",
                    "skipped_reason": f"{image} does not exist (yet); in check mode it is not booted"}
        raise BuildError(f"{image} does not exist", option="image")
    image = os.path.abspath(image)  # QEMU runs in the temp dir; an absolute path also never looks like "proto:..."
    fmt = fmt or _qemu.detect_format(image)
    if fmt not in _qemu.FORMATS:
        raise BuildError(f"{fmt!r} is not one of {', '.join(_qemu.FORMATS)}", option="format")
    qemu_path = _qemu_binary(qemu)
    ovmf_code, ovmf_vars_template = _firmware(firmware, secure_boot, ovmf_dir)

    plan: list[tuple[str, float | None]] = []  # (accel, silence probe seconds)
    fallback_reason = None
    if accel == "tcg":
        plan = [("tcg", None)]
    else:
        usable, why = kvm_usable(kvm_device)
        if accel == "kvm":
            if not usable:
                raise BuildError(f"KVM is not usable ({why}); use accel=tcg or auto", option="accel")
            plan = [("kvm", None)]
        elif usable:
            plan = [("kvm", kvm_probe_seconds or None), ("tcg", None)]
        else:
            plan = [("tcg", None)]
            fallback_reason = f"KVM is not usable ({why})"

    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="osimage-boot-test-")
    try:
        attempt = None
        for index, (use_accel, probe) in enumerate(plan):
            serial_log = os.path.join(workdir, f"serial-{index}-{use_accel}.log")
            ovmf_vars = None
            if ovmf_vars_template:
                # The firmware writes its variable store: every run gets a fresh private copy.
                ovmf_vars = os.path.join(workdir, f"OVMF_VARS-{index}.fd")
                shutil.copyfile(ovmf_vars_template, ovmf_vars)
            argv = _qemu.qemu_argv(image, fmt, serial_log, use_accel, firmware=firmware, secure_boot=secure_boot,
                                   memory=memory, ovmf_code=ovmf_code, ovmf_vars=ovmf_vars, extra_args=extra, qemu=qemu_path)
            is_fallible_kvm = use_accel == "kvm" and index + 1 < len(plan)
            attempt = run_attempt(argv, serial_log, workdir, pattern, timeout, probe_seconds=probe if is_fallible_kvm else None,
                                  watch_kvm_errors=use_accel == "kvm", accel=use_accel)
            if not is_fallible_kvm:
                break
            reason = _kvm_fallback_reason(attempt, probe)
            if reason is None:
                break
            fallback_reason = reason
        if log and not check_mode:
            _write_log(attempt.serial_log, log)
        tail = _qemu.tail_lines(attempt.text)
        result: dict[str, t.Any] = {
            "changed": False,
            "booted": attempt.outcome == "matched",
            "seconds": round(attempt.seconds, 2),
            "total_seconds": round(time.monotonic() - started, 2),
            "log_tail": tail,
            "accel": attempt.accel,
            "format": fmt,
            "firmware": firmware,
            "secure_boot_enabled": _secure_boot_state(attempt.text),
            "cmd": attempt.argv,
        }
        if fallback_reason:
            result["fallback_reason"] = fallback_reason
        if log and not check_mode:
            result["log"] = log
        if attempt.outcome != "matched":
            details = {k: v for k, v in result.items() if k not in ("changed",)}
            details["qemu_stderr"] = _stderr_summary(attempt.stderr)
            raise BuildError(_failure_message(attempt, timeout, expect_text), **details)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kvm_fallback_reason(attempt: Attempt, probe: float | None) -> str | None:
    """Why the KVM attempt says nothing about the guest (so TCG should try), or None."""
    if attempt.outcome == "kvm_error":
        return f"KVM could not run the guest ({_stderr_summary(attempt.stderr)}) after {attempt.seconds:.1f} s"
    if attempt.outcome == "silent":
        if attempt.raw_bytes == 0:
            return f"no serial output within kvm_probe_seconds={probe:g} under KVM"
        return (f"the serial console went silent under KVM for kvm_probe_seconds={probe:g}"
                f" (after {attempt.raw_bytes} bytes, {attempt.silent_since:.1f} s into the boot)")
    if attempt.outcome == "exited" and attempt.raw_bytes == 0 and attempt.returncode != 0:
        return f"QEMU exited with rc={attempt.returncode} under KVM before any serial output ({_stderr_summary(attempt.stderr)})"
    return None
