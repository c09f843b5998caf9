# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""image_convert: the pure parts, then real conversions with qemu-img on small sparse images."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import uuid

import pytest

import ansible_collections.osimage.builder as collection
from ansible_collections.osimage.builder.plugins.module_utils import _commands
from ansible_collections.osimage.builder.plugins.module_utils import _image_convert as ic
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._state import STATE_SUFFIX, StateFile, state_path
from ansible_collections.osimage.builder.tests.unit.plugins.module_utils.processes import group_alive

MiB = 1024 * 1024
QEMU_IMG = shutil.which("qemu-img")
needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed")

# name: (format, keyword arguments of convert_image)
CASES = {
    "qcow2": ("qcow2", {}),
    "qcow2-zlib": ("qcow2", {"compress": True}),
    "qcow2-zstd": ("qcow2", {"compress": True, "compression_type": "zstd"}),
    "vmdk": ("vmdk", {}),
    "vmdk-stream": ("vmdk", {"options": {"subformat": "streamOptimized"}, "compress": True}),
    "vdi": ("vdi", {}),
    "vpc": ("vpc", {}),
    "vpc-fixed": ("vpc", {"options": ["subformat=fixed", "force_size=on"]}),
    "vhdx": ("vhdx", {}),
    "raw": ("raw", {}),
}


# ----------------------------------------------------------------------------
# Pure parts


def test_crc32c_known_values():
    assert ic.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert ic.crc32c(b"") == 0
    assert ic.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, B.4


def test_vpc_checksum_skips_its_own_field():
    footer = bytearray(512)
    footer[:8] = b"conectix"
    footer[64:68] = b"\xff\xff\xff\xff"
    assert ic.vpc_checksum(bytes(footer)) == ~sum(b"conectix") & 0xFFFFFFFF


PARTS = {"build": 1, "src_path": "/s", "src": {"size": 1}, "settings": {"format": "qcow2"}, "qemu_img": "7.2.0"}


def _record(**changes):
    record = {"version": ic.RECORD_VERSION, "inputs": "sha256:in", "parts": PARTS, "dest": {"ino": 5, "size": 9, "mtime_ns": 7, "dev": 1}}
    record.update(changes)
    return record


@pytest.mark.parametrize("record, inputs, dest_now, force, action, reason", [
    (None, "sha256:in", None, False, "convert", "does not exist"),
    (_record(), "sha256:in", None, False, "convert", "does not exist"),
    (None, "sha256:in", {"ino": 5, "size": 9, "mtime_ns": 7, "dev": 1}, False, "foreign", "not made by this module"),
    (None, "sha256:in", {"ino": 5, "size": 9, "mtime_ns": 7, "dev": 1}, True, "convert", "force=true"),
    (_record(), "sha256:in", {"ino": 5, "size": 9, "mtime_ns": 7, "dev": 1}, False, "keep", "up to date"),
    (_record(), "sha256:in", {"ino": 5, "size": 9, "mtime_ns": 7, "dev": 1}, True, "convert", "force=true"),
    (_record(), "sha256:in", {"ino": 5, "size": 9, "mtime_ns": 8, "dev": 1}, False, "convert", "changed or replaced"),
    (_record(), "sha256:in", {"ino": 6, "size": 9, "mtime_ns": 7, "dev": 1}, False, "convert", "changed or replaced"),
    (_record(), "sha256:in", {"ino": 5, "size": 10, "mtime_ns": 7, "dev": 1}, False, "convert", "changed or replaced"),
    (_record(), "sha256:other", {"ino": 5, "size": 9, "mtime_ns": 7, "dev": 1}, False, "convert", "changed"),
])
def test_decide(record, inputs, dest_now, force, action, reason):
    got_action, got_reason = ic.decide(record, inputs, PARTS, dest_now, force)
    assert got_action == action
    assert reason in got_reason


@pytest.mark.parametrize("key, value, reason", [
    ("src", {"size": 2}, "src changed"),
    ("src_path", "/t", "src is another file"),
    ("settings", {"format": "vdi"}, "settings changed"),
    ("qemu_img", "8.0.0", "qemu-img was upgraded"),
    ("build", 2, "writes images differently"),
])
def test_decide_says_what_changed(key, value, reason):
    now = dict(PARTS, **{key: value})
    action, why = ic.decide(_record(), "sha256:other", now, {"ino": 5, "size": 9, "mtime_ns": 7, "dev": 1}, False)
    assert action == "convert" and reason in why


def test_record_parts_only_hold_what_the_bytes_depend_on():
    def parts(fmt, **kw):
        args = dict(src="/s", src_id={"size": 1}, fmt=fmt, compress=False, compression_type="zlib", pairs=[], seed="a",
                    qemu_version="7.2.0", timestamp=100)
        args.update(kw)
        return ic.record_parts(**args)["settings"]
    assert "seed" not in parts("qcow2") and "seed" not in parts("raw")
    for fmt in ("vmdk", "vdi", "vpc", "vhdx"):
        assert parts(fmt)["seed"] == "a"
    assert parts("vpc")["timestamp"] == 100 and "timestamp" not in parts("vhdx")
    assert parts("qcow2", compress=True, compression_type="zstd")["compression_type"] == "zstd"
    assert parts("qcow2", compress=False, compression_type="zstd")["compression_type"] is None
    assert parts("vpc", pairs=[("force_size", "on")])["options"] == ["force_size=on"]


def test_identities():
    st = os.stat(__file__)
    assert set(ic.file_identity(st)) == {"dev", "ino", "size", "mtime_ns", "ctime_ns"}
    assert "ctime_ns" not in ic.dest_identity(st)  # chmod/chown of dest is no reason to convert again


def test_leftovers_match_only_our_temporaries(tmp_path):
    dest = str(tmp_path / "disk.qcow2")
    names = [".disk.qcow2.osimage-convert-ab_cd123", ".disk.qcow2.osimage-state.json.k2j4h5g6.tmp",
             ".disk.qcow2.osimage-convert.lock", "disk.qcow2", ".disk.qcow2.x1y2z3w4.tmp", ".disk.qcow.osimage-convert-abcdefgh",
             ".other.qcow2.osimage-convert-abcdefgh", ".disk.qcow2.osimage-convert-abc"]
    for name in names:
        (tmp_path / name).mkdir() if "convert-" in name else (tmp_path / name).write_bytes(b"")
    expected = [".disk.qcow2.osimage-convert-ab_cd123", ".disk.qcow2.osimage-state.json.k2j4h5g6.tmp"]
    assert [os.path.basename(p) for p in ic.leftovers(dest)] == expected
    ic.remove_leftovers(ic.leftovers(dest))
    assert ic.leftovers(dest) == []
    assert (tmp_path / ".disk.qcow2.osimage-convert.lock").exists()


def test_content_digest_sees_bytes_not_allocation(tmp_path):
    sparse, dense = tmp_path / "sparse", tmp_path / "dense"
    with open(sparse, "wb") as handle:
        handle.truncate(8 * MiB)
        handle.seek(3 * MiB + 5)
        handle.write(b"data")
    with open(dense, "wb") as handle:
        handle.write(bytes(3 * MiB + 5) + b"data" + bytes(8 * MiB - 3 * MiB - 9))

    def digest(path, ranges=()):
        fd = os.open(path, os.O_RDONLY)
        try:
            return ic.content_digest(fd, os.fstat(fd).st_size, ranges)
        finally:
            os.close(fd)
    assert digest(sparse) == digest(dense)
    with open(dense, "r+b") as handle:
        handle.seek(3 * MiB + 5)
        handle.write(b"DATA")
    assert digest(sparse) != digest(dense)
    assert digest(sparse, [(3 * MiB + 5, 4)]) == digest(dense, [(3 * MiB + 5, 4)])
    crossing = tmp_path / "crossing"
    with open(crossing, "wb") as handle:
        handle.truncate(8 * MiB)
        handle.seek(3 * MiB + 5)
        handle.write(b"data")
        handle.seek(64 * 1024 - 2)
        handle.write(b"randomid")  # a field across a 64 KiB block boundary
    assert digest(crossing) != digest(sparse)
    assert digest(crossing, [(64 * 1024 - 2, 8)]) == digest(sparse)


# ----------------------------------------------------------------------------
# Real conversions


def _write_source(path, seed=7, size=64 * MiB):
    """A sparse raw image: a few MiB of pseudo-random data, some text that compresses, holes in between."""
    rng = random.Random(seed)
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset in (0, 1 * MiB, 10 * MiB + 4096, 33 * MiB, size - 512 * 1024):
            handle.seek(offset)
            handle.write(rng.randbytes(512 * 1024))
        handle.seek(20 * MiB)
        handle.write(b"".join(b"line %06d of a compressible text\n" % i for i in range(60000)))
    return str(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _write_source(tmp_path_factory.mktemp("src") / "disk.raw")


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _compare(src, dest, fmt):
    return subprocess.run([QEMU_IMG, "compare", "-f", "raw", "-F", fmt, src, dest], capture_output=True, text=True, check=False)


def _qemu_check(dest, fmt):
    return subprocess.run([QEMU_IMG, "check", "-f", fmt, dest], capture_output=True, text=True, check=False)


class NoProcesses:
    """Fails the test if anything tries to start a process."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(_commands, "run_tool", self._refuse)
        monkeypatch.setattr(subprocess, "run", self._refuse)
        monkeypatch.setattr(subprocess, "Popen", self._refuse)

    def _refuse(self, argv, *args, **kwargs):
        self.calls.append(argv)
        raise AssertionError(f"a process was started: {argv}")


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """Every case converted twice, into two directories, a second apart, with the same file name."""
    results = {}
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    for round_dir in (first, second):
        for name, (fmt, kwargs) in CASES.items():
            os.makedirs(round_dir / name)
            dest = str(round_dir / name / f"img.{fmt}")
            results.setdefault(name, []).append((dest, ic.convert_image(source, dest, fmt, **kwargs)))
        time.sleep(1.1)  # VHD's timestamp has a resolution of one second
    return results


@needs_qemu_img
@pytest.mark.parametrize("name", sorted(CASES))
def test_each_format_converts_to_the_same_contents(source, converted, name):
    fmt, kwargs = CASES[name]
    dest, result = converted[name][0]
    assert result["changed"] and result["format"] == fmt and result["dest"] == dest
    done = _compare(source, dest, fmt)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Images are identical" in done.stdout
    expected_size = 67125248 if name == "vpc" else 64 * MiB  # VHD rounds to a CHS geometry without force_size
    assert result["virtual_size"] == expected_size
    assert result["actual_size"] == os.stat(dest).st_blocks * 512
    if fmt in ("qcow2", "vmdk", "vdi", "vhdx"):
        checked = _qemu_check(dest, fmt)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    info = subprocess.run([QEMU_IMG, "info", "--output=json", "-f", fmt, dest], capture_output=True, text=True, check=True)
    assert info.stderr == ""  # no checksum warnings
    if name == "qcow2-zstd":
        assert json.loads(info.stdout)["format-specific"]["data"]["compression-type"] == "zstd"
    assert " -W" not in " ".join(result["cmd"])
    assert result["cmd"][-1] == dest and result["cmd"][-2] == source


@needs_qemu_img
@pytest.mark.parametrize("name", sorted(CASES))
def test_two_conversions_are_byte_identical(converted, name):
    first, second = (dest for dest, result in converted[name])
    assert _sha256(first) == _sha256(second)


@needs_qemu_img
def test_compression_makes_it_smaller(converted):
    plain = os.path.getsize(converted["qcow2"][0][0])
    assert os.path.getsize(converted["qcow2-zlib"][0][0]) < plain
    assert os.path.getsize(converted["qcow2-zstd"][0][0]) < plain
    assert os.path.getsize(converted["vmdk-stream"][0][0]) < os.path.getsize(converted["vmdk"][0][0])


@needs_qemu_img
def test_raw_to_raw_stays_sparse(source, converted):
    dest = converted["raw"][0][0]
    assert os.path.getsize(dest) == 64 * MiB
    assert os.stat(dest).st_blocks * 512 <= os.stat(source).st_blocks * 512 + MiB


@needs_qemu_img
def test_vmdk_descriptor_names_dest_not_the_temporary_file(converted):
    for name in ("vmdk", "vmdk-stream"):
        dest = converted[name][0][0]
        head = open(dest, "rb").read(64 * 1024)
        assert b'SPARSE "img.vmdk"' in head
        assert b"osimage-convert" not in head


def _differing_offsets(a, b, block=4096):
    offsets = []
    for start in range(0, len(a), block):
        if a[start:start + block] != b[start:start + block]:
            offsets += [i for i in range(start, min(start + block, len(a))) if a[i] != b[i]]
    return offsets


@needs_qemu_img
@pytest.mark.parametrize("name", ["vmdk", "vmdk-stream", "vdi", "vpc", "vpc-fixed", "vhdx"])
def test_qemu_img_alone_differs_only_in_the_fields_rewritten(source, tmp_path, name):
    """Two plain qemu-img conversions differ only inside the ranges find_volatile reports (all of them are found)."""
    fmt, kwargs = CASES[name]
    from ansible_collections.osimage.builder.plugins.module_utils import _qemu_img as qi
    pairs = qi.normalize_options(kwargs.get("options"))
    outputs = []
    for index in range(2):
        os.makedirs(tmp_path / str(index))
        out = str(tmp_path / str(index) / f"img.{fmt}")
        subprocess.run(qi.convert_argv(QEMU_IMG, source, out, fmt, kwargs.get("compress", False), "zlib", pairs), check=True)
        outputs.append(out)
        if index == 0:
            time.sleep(1.05)
    a, b = (open(path, "rb").read() for path in outputs)
    assert len(a) == len(b)
    differing = _differing_offsets(a, b)
    assert differing, "qemu-img is deterministic for this format now: the rewriting may be unnecessary"
    volatile = ic.find_volatile(fmt, lambda offset, length: a[offset:offset + length], len(a))
    assert volatile is not None and volatile.fields
    covered = set()
    for offset, length in volatile.ranges:
        covered.update(range(offset, offset + length))
    assert not [i for i in differing if i not in covered]


def _vhdx_checksums_valid(data):
    for offset in (64 * 1024, 128 * 1024):
        block = data[offset:offset + 4096]
        assert struct.unpack_from("<I", block, 4)[0] == ic.crc32c(block[:4] + bytes(4) + block[8:])
    log_length, log_offset = struct.unpack_from("<IQ", data, 64 * 1024 + 68)
    entries = 0
    for pos in range(log_offset, log_offset + log_length, 4096):
        if data[pos:pos + 4] == b"loge":
            length = struct.unpack_from("<I", data, pos + 8)[0]
            entry = data[pos:pos + length]
            assert struct.unpack_from("<I", entry, 4)[0] == ic.crc32c(entry[:4] + bytes(4) + entry[8:])
            entries += 1
    return entries


@needs_qemu_img
def test_rewritten_fields_keep_their_checksums(converted):
    vhdx = open(converted["vhdx"][0][0], "rb").read()
    assert _vhdx_checksums_valid(vhdx) >= 1
    for name in ("vpc", "vpc-fixed"):
        data = open(converted[name][0][0], "rb").read()
        footers = [data[-512:]] + ([data[:512]] if data[:8] == b"conectix" else [])
        for footer in footers:
            assert footer[:8] == b"conectix"
            assert struct.unpack_from(">I", footer, 64)[0] == ic.vpc_checksum(footer)
        assert len({footer[68:84] for footer in footers}) == 1


@needs_qemu_img
def test_vpc_timestamp_comes_from_src_or_source_date_epoch(source, tmp_path, monkeypatch):
    dest = str(tmp_path / "a.vhd")
    ic.convert_image(source, dest, "vpc")
    stamp = struct.unpack_from(">I", open(dest, "rb").read()[-512:], 24)[0]
    assert stamp == int(os.stat(source).st_mtime) - ic.VHD_EPOCH
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    result = ic.convert_image(source, dest, "vpc")
    assert result["changed"]  # the timestamp is an input of a VHD
    assert struct.unpack_from(">I", open(dest, "rb").read()[-512:], 24)[0] == 1700000000 - ic.VHD_EPOCH
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "soon")
    with pytest.raises(BuildError, match="SOURCE_DATE_EPOCH"):
        ic.convert_image(source, dest, "vpc")


@needs_qemu_img
def test_unrecognised_headers_are_left_alone_with_a_warning(source, tmp_path, monkeypatch):
    monkeypatch.setattr(ic, "find_volatile", lambda fmt, read, size: None)
    result = ic.convert_image(source, str(tmp_path / "img.vdi"), "vdi")
    assert result["changed"] and "not be byte-identical" in result["warnings"][0]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "soon")  # only VHD reads it
    assert "warnings" not in ic.convert_image(source, str(tmp_path / "img.qcow2"), "qcow2")


def _vdi_uuid(path):
    return uuid.UUID(bytes_le=open(path, "rb").read(0x198)[0x188:0x198])


@needs_qemu_img
def test_identifiers_follow_seed_and_contents(tmp_path):
    src_a = _write_source(tmp_path / "a.raw", seed=1)
    src_b = _write_source(tmp_path / "b.raw", seed=2)
    ids = {}
    for label, src, seed in (("a", src_a, "s"), ("a-again", src_a, "s"), ("b", src_b, "s"), ("a-seed", src_a, "t")):
        os.makedirs(tmp_path / label)
        dest = str(tmp_path / label / "img.vdi")
        ic.convert_image(src, dest, "vdi", seed=seed)
        ids[label] = _vdi_uuid(dest)
    assert ids["a"] == ids["a-again"]
    assert ids["a"] != ids["b"]  # other contents, other identity (as VirtualBox expects)
    assert ids["a"] != ids["a-seed"]
    assert ids["a"].version == 5


@needs_qemu_img
def test_rerun_runs_no_process_and_writes_nothing(source, tmp_path, monkeypatch):
    dest = str(tmp_path / "img.qcow2")
    first = ic.convert_image(source, dest, "qcow2", compress=True, compression_type="zstd", checksum=True)
    before = os.stat(dest)
    state_before = os.stat(dest + STATE_SUFFIX)
    listing = sorted(os.listdir(tmp_path))
    spy = NoProcesses(monkeypatch)
    started = time.monotonic()
    again = ic.convert_image(source, dest, "qcow2", compress=True, compression_type="zstd", checksum=True)
    elapsed = time.monotonic() - started
    assert spy.calls == []
    assert not again["changed"] and again["msg"] == "up to date"
    assert again["sha256"] == first["sha256"] == _sha256(dest)
    assert again["virtual_size"] == first["virtual_size"] and again["actual_size"] == first["actual_size"]
    assert again["diff"]["before"] == again["diff"]["after"] == first["diff"]["after"]
    after = os.stat(dest)
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == (before.st_ino, before.st_mtime_ns, before.st_ctime_ns)
    assert os.stat(dest + STATE_SUFFIX).st_mtime_ns == state_before.st_mtime_ns
    assert sorted(os.listdir(tmp_path)) == listing
    assert elapsed < 0.5
    checked = ic.convert_image(source, dest, "qcow2", compress=True, compression_type="zstd", check_mode=True)
    assert not checked["changed"]


@needs_qemu_img
def test_chmod_of_dest_is_not_a_change(source, tmp_path):
    dest = str(tmp_path / "img.vdi")
    ic.convert_image(source, dest, "vdi")
    os.chmod(dest, 0o600)
    assert not ic.convert_image(source, dest, "vdi")["changed"]


@needs_qemu_img
@pytest.mark.parametrize("change, reason", [
    ("write to src", "src changed"),
    ("touch src", "src changed"),
    ("rewrite src in place, same mtime", "src changed"),
    ("options", "settings changed"),
    ("subformat", "settings changed"),
    ("delete dest", "does not exist"),
    ("modify dest", "changed or replaced"),
    ("replace dest", "changed or replaced"),
    ("qemu-img upgraded", "qemu-img was upgraded"),
    ("force", "force=true"),
])
def test_reconverts_when_something_changed(tmp_path, change, reason, monkeypatch):
    src = _write_source(tmp_path / "disk.raw", size=16 * MiB)
    dest = str(tmp_path / "img.vpc")
    kwargs = {"options": {"subformat": "fixed"}}
    ic.convert_image(src, dest, "vpc", **kwargs)
    if change == "write to src":
        with open(src, "r+b") as handle:
            handle.seek(0)
            handle.write(b"changed")
    elif change == "touch src":
        os.utime(src)
    elif change == "rewrite src in place, same mtime":
        st = os.stat(src)
        with open(src, "r+b") as handle:
            handle.seek(5 * MiB)
            handle.write(b"x")
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # only ctime tells
    elif change == "options":
        kwargs = {"options": {"subformat": "fixed", "force_size": True}}
    elif change == "subformat":
        kwargs = {"options": {"subformat": "dynamic"}}
    elif change == "delete dest":
        os.unlink(dest)
    elif change == "modify dest":
        with open(dest, "r+b") as handle:
            handle.seek(4096)
            handle.write(b"\1")
    elif change == "replace dest":
        shutil.copyfile(dest, dest + ".copy")
        os.replace(dest + ".copy", dest)
    elif change == "qemu-img upgraded":
        state = StateFile(state_path(dest))
        state.data["image_convert"]["parts"]["qemu_img"] = "5.0.0"
        state.data["image_convert"]["inputs"] = "sha256:old"
        state.save()
    elif change == "force":
        kwargs = dict(kwargs, force=True)
    result = ic.convert_image(src, dest, "vpc", **kwargs)
    assert result["changed"], result
    assert reason in result["msg"]
    assert _compare(src, dest, "vpc").returncode == 0
    kwargs.pop("force", None)
    assert not ic.convert_image(src, dest, "vpc", **kwargs)["changed"]


@needs_qemu_img
def test_check_mode_writes_nothing(source, tmp_path):
    dest = str(tmp_path / "img.vhdx")
    planned = ic.convert_image(source, dest, "vhdx", check_mode=True)
    assert planned["changed"] and "would convert" in planned["msg"]
    assert "absent" in planned["diff"]["before"] and "format: vhdx" in planned["diff"]["after"]
    assert "virtual_size" not in planned
    assert os.listdir(tmp_path) == []
    ic.convert_image(source, dest, "vhdx")
    os.utime(source)
    listing = {name: os.stat(tmp_path / name).st_mtime_ns for name in os.listdir(tmp_path)}
    replanned = ic.convert_image(source, dest, "vhdx", check_mode=True)
    assert replanned["changed"] and "src changed" in replanned["msg"]
    assert {name: os.stat(tmp_path / name).st_mtime_ns for name in os.listdir(tmp_path)} == listing


@needs_qemu_img
def test_check_mode_on_a_fresh_path(tmp_path):
    missing = ic.convert_image(str(tmp_path / "later.raw"), str(tmp_path / "img.qcow2"), "qcow2", check_mode=True)
    assert missing["changed"] and "does not exist yet" in missing["msg"]
    no_dir = ic.convert_image(str(tmp_path / "later.raw"), str(tmp_path / "out" / "img.qcow2"), "qcow2", check_mode=True)
    assert no_dir["changed"] and "does not exist yet" in no_dir["msg"]
    assert os.listdir(tmp_path) == []


@needs_qemu_img
def test_a_file_this_module_did_not_write_needs_force(source, tmp_path):
    dest = tmp_path / "precious.qcow2"
    dest.write_bytes(b"not mine")
    for check_mode in (True, False):
        with pytest.raises(BuildError, match="force=true") as caught:
            ic.convert_image(source, str(dest), "qcow2", check_mode=check_mode)
        assert caught.value.option == "dest"
    assert dest.read_bytes() == b"not mine"
    assert ic.convert_image(source, str(dest), "qcow2", force=True)["changed"]
    assert _compare(source, str(dest), "qcow2").returncode == 0


def _only(tmp_path, *names):
    return sorted(os.listdir(tmp_path)) == sorted(names)


@needs_qemu_img
@pytest.mark.parametrize("what, kwargs, option, needle", [
    ("src missing", {"src": "missing.raw"}, "src", "does not exist"),
    ("src a directory", {"src": "."}, "src", "directory"),
    ("src a char device", {"src": "/dev/null"}, "src", "neither a regular file"),
    ("dest a directory", {"dest": "/tmp"}, "dest", "is a directory"),
    ("dest a dot", {"dest": "."}, "dest", "not a file name"),
    ("dest trailing slash", {"dest": "img/"}, "dest", "not a file name"),
    ("dest directory missing", {"dest": "nowhere/img.qcow2"}, "dest", "does not exist"),
    ("dest under a file", {"dest": "disk.raw/img.qcow2"}, "dest", "not a directory"),
    ("dest a char device", {"dest": "/dev/null"}, "dest", "not a regular file"),
    ("dest is src", {"dest": "disk.raw"}, "dest", "src itself"),
    ("compress vdi", {"format": "vdi", "compress": True}, "compress", "cannot compress vdi"),
    ("compress vmdk sparse", {"format": "vmdk", "compress": True}, "compress", "streamOptimized"),
    ("zstd without compress", {"compression_type": "zstd"}, "compression_type", "compress=true"),
    ("comma injection", {"options": {"cluster_size": "64k,backing_file=/etc/passwd"}}, "options", "comma"),
    ("reserved option", {"options": ["compression_type=zstd"]}, "options", "compression_type option"),
    ("unknown option", {"options": {"force_size": True}}, "options", "not an option of qcow2"),
    ("bad option value", {"options": {"cluster_size": "huge"}}, "options", "cluster_size"),
    ("empty seed", {"format": "vdi", "seed": ""}, "seed", "non-empty"),
])
def test_errors_name_the_option_and_leave_nothing(tmp_path, monkeypatch, what, kwargs, option, needle):  # pylint: disable=unused-argument
    src = _write_source(tmp_path / "disk.raw", size=4 * MiB)
    monkeypatch.chdir(tmp_path)
    src_arg = kwargs.get("src", src)
    dest_arg = kwargs.get("dest", str(tmp_path / "img.qcow2"))
    fmt = kwargs.get("format", "qcow2")
    extra = {key: value for key, value in kwargs.items() if key not in ("src", "dest", "format")}
    with pytest.raises(BuildError) as caught:
        ic.convert_image(src_arg, dest_arg, fmt, **extra)
    assert caught.value.option == option, caught.value
    assert needle in caught.value.message
    leftover = set(os.listdir(tmp_path)) - {"disk.raw", ".img.qcow2.osimage-convert.lock"}
    assert leftover == set(), leftover


@needs_qemu_img
def test_block_device_src_needs_allow_block_device(tmp_path):
    device = next((os.path.join("/dev", name) for name in sorted(os.listdir("/dev"))
                   if stat.S_ISBLK(os.stat(os.path.join("/dev", name)).st_mode)), None)
    if device is None:
        pytest.skip("no block device node in /dev")
    with pytest.raises(BuildError, match="allow_block_device") as caught:
        ic.convert_image(device, str(tmp_path / "img.qcow2"), "qcow2", check_mode=True)
    assert caught.value.option == "src"


def test_device_identity_hashes_contents(tmp_path):
    path = tmp_path / "dev"
    path.write_bytes(b"abc")
    identity = ic._device_identity(str(path), os.stat(path))
    assert identity["sha256"] == hashlib.sha256(b"abc").hexdigest() and identity["size"] == 3


def test_qemu_img_missing(tmp_path, monkeypatch):
    src = _write_source(tmp_path / "disk.raw", size=MiB)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(_commands, "_SBIN", ())
    with pytest.raises(BuildError) as caught:
        ic.convert_image(src, str(tmp_path / "img.qcow2"), "qcow2")
    assert "qemu-utils (Debian" in caught.value.message and "qemu-img (Fedora" in caught.value.message
    assert caught.value.option == "format"


@needs_qemu_img
def test_qemu_img_failure_reports_its_stderr(tmp_path, monkeypatch):
    src = _write_source(tmp_path / "disk.raw", size=MiB)
    fake = tmp_path / "bin" / "qemu-img"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\ncase \"$1\" in convert) echo 'qemu-img: error while writing: No space left on device' >&2; "
                    "exit 1;; *) exec %s \"$@\";; esac\n" % QEMU_IMG)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    with pytest.raises(BuildError) as caught:
        ic.convert_image(src, str(tmp_path / "img.qcow2"), "qcow2")
    assert "No space left on device" in caught.value.message and caught.value.option == "dest"
    assert caught.value.details["rc"] == 1
    assert set(os.listdir(tmp_path)) == {"disk.raw", "bin", ".img.qcow2.osimage-convert.lock"}


@needs_qemu_img
def test_src_changing_during_the_conversion_is_not_published(tmp_path, monkeypatch):
    src = _write_source(tmp_path / "disk.raw", size=4 * MiB)
    real = ic.run

    def run_and_touch(argv, *args, **kwargs):
        out = real(argv, *args, **kwargs)
        if argv[1] == "convert":
            with open(src, "r+b") as handle:
                handle.write(b"racing writer")
        return out

    monkeypatch.setattr(ic, "run", run_and_touch)
    with pytest.raises(BuildError, match="changed while") as caught:
        ic.convert_image(src, str(tmp_path / "img.qcow2"), "qcow2")
    assert caught.value.option == "src"
    assert not os.path.exists(tmp_path / "img.qcow2") and ic.leftovers(str(tmp_path / "img.qcow2")) == []


@needs_qemu_img
def test_stale_temporaries_are_removed_on_the_next_run(source, tmp_path):
    dest = str(tmp_path / "img.qcow2")
    ic.convert_image(source, dest, "qcow2")
    stale_dir = tmp_path / ".img.qcow2.osimage-convert-zz9zz9zz"
    stale_dir.mkdir()
    (stale_dir / "img.qcow2").write_bytes(b"half")
    (tmp_path / ".img.qcow2.osimage-state.json.aaaa1111.tmp").write_bytes(b"{")
    (tmp_path / ".unrelated.osimage-convert-zz9zz9zz").mkdir()
    ic.convert_image(source, dest, "qcow2", check_mode=True)
    assert stale_dir.exists()  # check mode removes nothing
    assert not ic.convert_image(source, dest, "qcow2")["changed"]
    assert ic.leftovers(dest) == []
    assert (tmp_path / ".unrelated.osimage-convert-zz9zz9zz").exists()


# ----------------------------------------------------------------------------
# Interrupted and concurrent runs


def _collections_root():
    return os.path.abspath(os.path.join(list(collection.__path__)[0], "..", "..", ".."))


_RUNNER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from ansible_collections.osimage.builder.plugins.module_utils._image_convert import convert_image
result = convert_image(sys.argv[2], sys.argv[3], "qcow2", compress=True)
print(json.dumps({"changed": result["changed"], "msg": result["msg"]}))
"""


def _start(src, dest):
    return subprocess.Popen([sys.executable, "-c", _RUNNER, _collections_root(), src, dest], stdout=subprocess.PIPE,
                            start_new_session=True)


def _wait_group(pgid, timeout=60.0):
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            os.killpg(pgid, signal.SIGKILL)
            break
        time.sleep(0.02)


@needs_qemu_img
def test_killed_at_random_points_never_leaves_a_partial_dest(tmp_path):
    src = _write_source(tmp_path / "disk.raw", seed=11, size=96 * MiB)
    with open(src, "r+b") as handle:  # make the compressed conversion take a while
        handle.seek(40 * MiB)
        handle.write(random.Random(3).randbytes(40 * MiB))
    dest = str(tmp_path / "img.qcow2")
    started = time.monotonic()
    ic.convert_image(src, dest, "qcow2", compress=True)
    duration = time.monotonic() - started
    good = _sha256(dest)
    rng = random.Random(20240601)
    outcomes = []
    for trial in range(8):
        with open(src, "r+b") as handle:  # a new version of src, so the run has something to do
            handle.seek(trial * 4096)
            handle.write(b"version %d" % trial)
        proc = _start(src, dest)
        time.sleep(rng.uniform(0.05, duration * 1.5 + 0.3))  # from before qemu-img starts to after the rename
        whole_group = trial % 2 == 0
        try:
            if whole_group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.kill(proc.pid, signal.SIGKILL)  # qemu-img lives on as an orphan and finishes
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stdout.close()
        interrupted = bool(ic.leftovers(dest))
        _wait_group(proc.pid)
        if os.path.exists(dest):
            now = _sha256(dest)
            complete = _compare(src, dest, "qcow2").returncode == 0
            assert now == good or complete, f"trial {trial}: dest is neither the old image nor the new one"
            outcomes.append(("old" if now == good else "new", interrupted))
        else:
            outcomes.append(("absent", interrupted))
        result = ic.convert_image(src, dest, "qcow2", compress=True)
        assert _compare(src, dest, "qcow2").returncode == 0
        assert ic.leftovers(dest) == [], f"trial {trial}: temporary files left"
        assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp") or "osimage-convert-" in name]
        assert result["changed"] == (outcomes[-1][0] != "new")
        good = _sha256(dest)
    print("kill outcomes:", outcomes)
    assert ("old", True) in outcomes  # at least one kill landed in the middle of a conversion


@needs_qemu_img
def test_concurrent_runs_take_turns(source, tmp_path):
    dest = str(tmp_path / "img.qcow2")
    procs = [_start(source, dest) for _run in range(3)]
    results = [json.loads(proc.communicate()[0]) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert sorted(result["changed"] for result in results) == [False, False, True]
    assert _compare(source, dest, "qcow2").returncode == 0
    assert ic.leftovers(dest) == []
