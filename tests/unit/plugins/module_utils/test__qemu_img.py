# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import json

import pytest

from ansible_collections.osimage.builder.plugins.module_utils import _qemu_img as qi
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError

Q = "/usr/bin/qemu-img"
SRC = "/b/disk.raw"
DEST = "/b/out/.disk.x.osimage-convert-abc/disk.x"


# ----------------------------------------------------------------------------
# options


def test_options_dict_sorted_and_typed():
    pairs = qi.normalize_options({"subformat": "fixed", "force_size": True, "cluster_size": 65536, "lazy_refcounts": False})
    assert pairs == [("cluster_size", "65536"), ("force_size", "on"), ("lazy_refcounts", "off"), ("subformat", "fixed")]


def test_options_list_form_equals_dict_form():
    assert qi.normalize_options(["subformat=streamOptimized", " adapter_type = lsilogic"]) == \
        qi.normalize_options({"adapter_type": "lsilogic", "subformat": "streamOptimized"})


@pytest.mark.parametrize("empty", [None, {}, []])
def test_no_options(empty):
    assert qi.normalize_options(empty) == []


def test_value_may_contain_equals_sign():
    assert qi.normalize_options(["hwversion=a=b"]) == [("hwversion", "a=b")]


@pytest.mark.parametrize("options, needle", [
    ({"subformat": "fixed,backing_file=/etc/shadow"}, "comma"),
    (["subformat=fixed,backing_file=/etc/shadow"], "comma"),
    ({"sub,format": "x"}, "not a qemu-img option name"),
    ({"bad key": "x"}, "not a qemu-img option name"),
    ({"": "x"}, "not a qemu-img option name"),
    ({"-o": "x"}, "not a qemu-img option name"),
    ({"subformat": ""}, "empty value"),
    ({"subformat": "a\nb"}, "line break"),
    ({"subformat": None}, "must be a string"),
    ({"subformat": ["a"]}, "must be a string"),
    ({"subformat": 1.5}, "must be a string"),
    (["force_size"], "key=value"),
    ([{"force_size": True}], "key=value"),
    (["force_size=on", "force_size=off"], "more than once"),
    ("subformat=fixed", "must be a dict or a list"),
    ({"compression_type": "zstd"}, "compression_type option"),
    ({"size": "1G"}, "size of src"),
    ({"backing_file": "/x"}, "stands alone"),
    ({"backing_fmt": "raw"}, "stands alone"),
    ({"data_file": "/x"}, "second output file"),
    ({"data_file_raw": True}, "second output file"),
    ({"encryption": True}, "secrets"),
    ({"encrypt.format": "luks"}, "secrets"),
    ({"encrypt.key-secret": "sec0"}, "secrets"),
])
def test_bad_options_name_the_option(options, needle):
    with pytest.raises(BuildError) as caught:
        qi.normalize_options(options)
    assert caught.value.option == "options"
    assert needle in caught.value.message


def test_options_text():
    assert qi.options_text([("a", "1"), ("b", "on")]) == "a=1,b=on"


# ----------------------------------------------------------------------------
# request checks


@pytest.mark.parametrize("fmt, compress, ctype, options", [
    ("qcow2", True, "zlib", []),
    ("qcow2", True, "zstd", []),
    ("qcow2", False, "zlib", []),
    ("vmdk", True, "zlib", [("subformat", "streamOptimized")]),
    ("vmdk", False, "zlib", [("subformat", "streamOptimized")]),
    ("vmdk", False, "zlib", [("subformat", "monolithicSparse")]),
    ("vpc", False, "zlib", [("force_size", "on"), ("subformat", "fixed")]),
    ("raw", False, "zlib", []),
    ("vdi", False, "zlib", []),
    ("vhdx", False, "zlib", [("subformat", "dynamic")]),
])
def test_good_requests(fmt, compress, ctype, options):
    qi.check_request(fmt, compress, ctype, options)


@pytest.mark.parametrize("fmt, compress, ctype, options, option, needle", [
    ("vdi", True, "zlib", [], "compress", "cannot compress vdi"),
    ("vpc", True, "zlib", [], "compress", "cannot compress vpc"),
    ("vhdx", True, "zlib", [], "compress", "cannot compress vhdx"),
    ("raw", True, "zlib", [], "compress", "cannot compress raw"),
    ("vmdk", True, "zlib", [], "compress", "streamOptimized"),
    ("vmdk", True, "zlib", [("subformat", "monolithicSparse")], "compress", "streamOptimized"),
    ("vmdk", False, "zlib", [("subformat", "monolithicFlat")], "options", "several files"),
    ("vmdk", False, "zlib", [("subformat", "twoGbMaxExtentSparse")], "options", "several files"),
    ("vmdk", True, "zstd", [("subformat", "streamOptimized")], "compression_type", "qcow2 only"),
    ("qcow2", False, "zstd", [], "compression_type", "compress=true"),
    ("qcow2", True, "lz4", [], "compression_type", "not one of"),
    ("qed", False, "zlib", [], "format", "not one of"),
])
def test_bad_requests_name_the_option(fmt, compress, ctype, options, option, needle):
    with pytest.raises(BuildError) as caught:
        qi.check_request(fmt, compress, ctype, options)
    assert caught.value.option == option
    assert needle in caught.value.message


@pytest.mark.parametrize("fmt, compress, ctype, expected", [
    ("qcow2", True, "zstd", "zstd"),
    ("qcow2", True, "zlib", "zlib"),
    ("qcow2", False, "zlib", None),
    ("vmdk", True, "zlib", None),
    ("raw", False, "zlib", None),
])
def test_effective_compression_type(fmt, compress, ctype, expected):
    assert qi.effective_compression_type(fmt, compress, ctype) == expected


# ----------------------------------------------------------------------------
# argv, one by one


@pytest.mark.parametrize("fmt, compress, ctype, options, tail", [
    ("raw", False, "zlib", [], []),
    ("qcow2", False, "zlib", [], []),
    ("qcow2", True, "zlib", [], ["-c"]),
    ("qcow2", True, "zstd", [], ["-c", "-o", "compression_type=zstd"]),
    ("qcow2", True, "zstd", [("cluster_size", "2M")], ["-c", "-o", "cluster_size=2M,compression_type=zstd"]),
    ("qcow2", False, "zlib", [("compat", "0.10")], ["-o", "compat=0.10"]),
    ("vmdk", False, "zlib", [], []),
    ("vmdk", False, "zlib", [("subformat", "streamOptimized")], ["-o", "subformat=streamOptimized"]),
    ("vmdk", True, "zlib", [("adapter_type", "lsilogic"), ("subformat", "streamOptimized")],
     ["-c", "-o", "adapter_type=lsilogic,subformat=streamOptimized"]),
    ("vdi", False, "zlib", [], []),
    ("vdi", False, "zlib", [("static", "on")], ["-o", "static=on"]),
    ("vpc", False, "zlib", [], []),
    ("vpc", False, "zlib", [("force_size", "on")], ["-o", "force_size=on"]),
    ("vpc", False, "zlib", [("force_size", "on"), ("subformat", "fixed")], ["-o", "force_size=on,subformat=fixed"]),
    ("vhdx", False, "zlib", [], []),
    ("vhdx", False, "zlib", [("subformat", "fixed")], ["-o", "subformat=fixed"]),
])
def test_convert_argv(fmt, compress, ctype, options, tail):
    argv = qi.convert_argv(Q, SRC, DEST, fmt, compress, ctype, options)
    assert argv == [Q, "convert", "-f", "raw", "-O", fmt] + tail + [SRC, DEST]
    assert "-W" not in argv and "-t" not in argv and "-n" not in argv


def test_convert_argv_defaults():
    assert qi.convert_argv(Q, SRC, DEST, "qcow2") == [Q, "convert", "-f", "raw", "-O", "qcow2", SRC, DEST]


def test_zlib_is_never_passed_explicitly():
    # QEMU < 5.1 does not know compression_type; zlib is its default anyway.
    assert "compression_type=zlib" not in " ".join(qi.convert_argv(Q, SRC, DEST, "qcow2", True, "zlib"))


def test_other_argv():
    assert qi.info_argv(Q, DEST, "vmdk") == [Q, "info", "--output=json", "-f", "vmdk", DEST]
    assert qi.version_argv(Q) == [Q, "--version"]
    assert qi.options_help_argv(Q, "vpc", DEST) == [Q, "create", "-f", "vpc", "-o", "help", DEST]


# ----------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize("text, version", [
    ("qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022 Fabrice Bellard\n", "7.2.22"),
    ("qemu-img version 8.2.2 (qemu-8.2.2-1.fc40)\n", "8.2.2"),
    ("qemu-img version 5.1.0\n", "5.1.0"),
    ("qemu-img version 9.1.50 (v9.1.0-1234-gdeadbeef)\n", "9.1.50"),
])
def test_parse_version(text, version):
    assert qi.parse_version(text) == version
    assert qi.version_tuple(version) >= (5, 1)


def test_parse_version_garbage():
    with pytest.raises(BuildError) as caught:
        qi.parse_version("command not found")
    assert caught.value.option == "format"


HELP_QCOW2 = """Supported options:
  backing_file=<str>     - File name of a base image
  cluster_size=<size>    - qcow2 cluster size
  compression_type=<str> - Compression method used for image cluster compression
  encrypt.cipher-alg=<str> - Name of encryption cipher algorithm
  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  size=<size>            - Virtual disk size
"""

HELP_VPC_NO_TARGET = """Supported vpc options:
  force_size=<bool (on/off)> - Force disk size calculation to use the actual size specified
  size=<size>            - Virtual disk size
  subformat=<str>        - Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed}

The protocol level may support further options.
Specify the target filename to include those options.
"""


def test_parse_options_help():
    assert qi.parse_options_help(HELP_QCOW2) == {"backing_file", "cluster_size", "compression_type", "encrypt.cipher-alg",
                                                 "extent_size_hint", "lazy_refcounts", "size"}
    assert qi.parse_options_help(HELP_VPC_NO_TARGET) == {"force_size", "size", "subformat"}


def test_check_supported():
    qi.check_supported([("force_size", "on")], {"force_size", "size"}, "vpc")
    with pytest.raises(BuildError) as caught:
        qi.check_supported([("force_size", "on")], {"static", "size"}, "vdi")
    assert caught.value.option == "options"
    assert "force_size: not an option of vdi images" in caught.value.message and "static" in caught.value.message
    qi.check_supported([("anything", "x")], set(), "vdi")  # no list: qemu-img itself will say


INFO_QCOW2 = {
    "virtual-size": 2147483648, "filename": "x.qcow2", "cluster-size": 65536, "format": "qcow2", "actual-size": 307175424,
    "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zstd", "lazy-refcounts": False,
                                                  "refcount-bits": 16, "corrupt": False, "extended-l2": False}},
    "dirty-flag": False,
}
INFO_VMDK = {
    "virtual-size": 67108864, "filename": "x.vmdk", "cluster-size": 65536, "format": "vmdk", "actual-size": 2670592,
    "format-specific": {"type": "vmdk", "data": {"cid": 4144844371, "parent-cid": 4294967295, "create-type": "streamOptimized",
                                                 "extents": [{"compressed": True, "virtual-size": 67108864}]}},
    "dirty-flag": False,
}
INFO_VPC = {"virtual-size": 67125248, "filename": "x.vhd", "cluster-size": 2097152, "format": "vpc", "actual-size": 2666496,
            "dirty-flag": False}


@pytest.mark.parametrize("data, expected", [
    (INFO_QCOW2, {"format": "qcow2", "virtual_size": 2147483648, "actual_size": 307175424, "dirty": False,
                  "compression_type": "zstd", "create_type": None}),
    (INFO_VMDK, {"format": "vmdk", "virtual_size": 67108864, "actual_size": 2670592, "dirty": False,
                 "compression_type": None, "create_type": "streamOptimized"}),
    (INFO_VPC, {"format": "vpc", "virtual_size": 67125248, "actual_size": 2666496, "dirty": False,
                "compression_type": None, "create_type": None}),
    ({"virtual-size": 5, "format": "raw"},
     {"format": "raw", "virtual_size": 5, "actual_size": None, "dirty": False, "compression_type": None, "create_type": None}),
])
def test_parse_info(data, expected):
    assert qi.parse_info(json.dumps(data, indent=4)) == expected


@pytest.mark.parametrize("text", ["", "not json", "[]", json.dumps({"format": "raw"}), json.dumps({"virtual-size": "1", "format": "raw"})])
def test_parse_info_garbage(text):
    with pytest.raises(BuildError) as caught:
        qi.parse_info(text)
    assert caught.value.option == "dest"


@pytest.mark.parametrize("stderr, pairs, ctype, option", [
    ("qemu-img: Invalid parameter 'bogus'", [("bogus", "1")], None, "options"),
    ("qemu-img: Parameter 'cluster_size' expects a non-negative number below 2^64", [("cluster_size", "x")], None, "options"),
    ("qemu-img: x.qcow2: Invalid parameter 'compression_type'", [], "zstd", "compression_type"),
    ("qemu-img: Could not open '/b/disk.raw': Permission denied", [], None, "src"),
    ("qemu-img: Could not open '/b/out/.x.osimage-convert-abcdefgh/x': Permission denied", [], None, "dest"),
    ("qemu-img: /b/out/x: error while converting qcow2: No space left on device", [], None, "dest"),
    ("qemu-img: Could not create '/b/out/x': Permission denied", [], None, "dest"),
])
def test_blame(stderr, pairs, ctype, option):
    assert qi.blame(stderr, pairs, ctype, src=SRC) == option
