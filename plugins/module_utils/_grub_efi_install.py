# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What the grub_efi_install module does: put GRUB (or shim and the signed GRUB)
and a grub.cfg that finds the root filesystem by UUID onto the EFI system
partition of an image, on the removable boot path, without mounting.

The FAT is read and written with mtools at the partition's byte offset
(``-i IMAGE@@OFFSET``). Only files whose bytes differ are written, with the
build's timestamp; afterwards the filesystem module's record of the partition is
refreshed so that its next run still recognises the ESP as its own.

Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import typing as t

from ansible_collections.osimage.builder.plugins.module_utils import _efi, _mkfs
from ansible_collections.osimage.builder.plugins.module_utils._commands import find_tool, run, run_tool
from ansible_collections.osimage.builder.plugins.module_utils._errors import BuildError
from ansible_collections.osimage.builder.plugins.module_utils._fsprobe import describe, probe
from ansible_collections.osimage.builder.plugins.module_utils._image import Image, image_kind
from ansible_collections.osimage.builder.plugins.module_utils._partition_table import find_partition, read_table
from ansible_collections.osimage.builder.plugins.module_utils._sizes import SECTOR_SIZE, format_size
from ansible_collections.osimage.builder.plugins.module_utils._state import (
    StateFile, fingerprint, refresh_fingerprint, state_path,
)

ESP_TYPES = ("C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "ef")
MTOOLS_PACKAGE = "mtools"
# Clusters kept in reserve for directory entries that grow while files are written.
_DIRECTORY_SLACK = 2
SIGNED_HINT = f"/{_efi.SIGNED_SHIM} and /{_efi.SIGNED_GRUB}"


class _Mtools:
    """The mtools programs, run on one FAT inside the image (through a private symlink)."""

    PROGRAMS = ("mcopy", "mmd", "mdel", "mdir")

    @classmethod
    def find(cls) -> dict[str, str]:
        """The paths of the mtools programs; BuildError naming the package when one is missing."""
        return {name: find_tool([name], "esp_partition", MTOOLS_PACKAGE) for name in cls.PROGRAMS}

    def __init__(self, programs: dict[str, str], workdir: str, image: str, offset: int, epoch: int) -> None:
        self.mcopy = programs["mcopy"]
        self.mmd = programs["mmd"]
        self.mdel = programs["mdel"]
        self.mdir = programs["mdir"]
        # A symlink with a plain name: mtools gives '@@' (and ':' in some places) a meaning.
        link = os.path.join(workdir, "disk")
        os.symlink(os.path.abspath(image), link)
        self.target = f"{link}@@{offset}"
        home = os.path.join(workdir, "home")
        os.mkdir(home)
        self.env = _mkfs.mtools_env(os.environ, epoch, home)

    def _run(self, argv: list[t.Any], what: str) -> subprocess.CompletedProcess:
        try:
            return run_tool(argv, env=self.env)
        except OSError as exc:
            raise BuildError(f"{what} could not be started: {exc.strerror}", option="esp_partition")

    @staticmethod
    def _text(done: subprocess.CompletedProcess) -> str:
        text = (done.stderr or b"").decode("utf-8", "replace").strip() or (done.stdout or b"").decode("utf-8", "replace").strip()
        return " / ".join(line for line in text.splitlines() if line.strip()) or f"exit status {done.returncode}"

    def _mdir(self, directory: str, recursive: bool) -> dict[str, str]:
        done = self._run(_efi.mdir_argv(self.mdir, self.target, directory, recursive), "mdir")
        if done.returncode != 0:
            text = self._text(done)
            if "not found" in text.lower():  # also what mdir says about an empty directory
                return {}
            raise BuildError(f"mdir could not read the FAT on the ESP: {text}", option="esp_partition")
        return _efi.parse_mdir(done.stdout.decode("utf-8", "replace"))

    def listing(self) -> dict[str, str]:
        """{lower-case path: stored path} of ``EFI`` and everything below it (empty when there is no ``EFI``)."""
        top = self._mdir("", recursive=False).get("efi")
        if top is None:
            return {}
        found = {"efi": top}
        found.update(self._mdir(top, recursive=True))
        return found

    def read(self, path: str) -> bytes:
        done = self._run(_efi.mread_argv(self.mcopy, self.target, path), "mcopy")
        if done.returncode != 0:
            raise BuildError(f"mcopy could not read {path} from the ESP: {self._text(done)}", option="esp_partition")
        return done.stdout

    def check(self, argv: list[t.Any], what: str) -> None:
        done = self._run(argv, what)
        if done.returncode != 0:
            text = self._text(done)
            if "disk full" in text.lower():
                raise BuildError(f"the ESP is full: {text}; make the partition bigger", option="esp_partition")
            raise BuildError(f"{what} failed on the ESP: {text}", option="esp_partition")


# ----------------------------------------------------------------------------
# What to write


def _read_file(path: str, option: str, missing: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise BuildError(f"{path} does not exist; {missing}", option=option)
    except IsADirectoryError:
        raise BuildError(f"{path} is a directory, not an EFI binary", option=option)
    except PermissionError:
        raise BuildError(f"{path}: permission denied", option=option)


def _signed_sources(tree: str | None, shim: str | None, signed_grub: str | None) -> dict[str, t.Any]:
    """The signed shim, GRUB and (when present) MokManager, checked; BuildError naming the option at fault."""
    if not tree and not (shim and signed_grub):
        missing = [name for name, value in (("shim", shim), ("signed_grub", signed_grub)) if not value]
        raise BuildError(f"secure_boot needs the signed shim and GRUB ({SIGNED_HINT}): give tree, the root tree with "
                         f"{_efi.SIGNED_PACKAGES} installed (or unpacked), or both shim and signed_grub "
                         f"({' and '.join(missing)} not given)", option="tree")
    if tree and not os.path.isdir(tree):
        raise BuildError(f"{tree} is not a directory; give the root tree that has {_efi.SIGNED_PACKAGES} installed",
                         option="tree")
    sources = {}
    for key, given, relative, what, package in (
            ("shim", shim, _efi.SIGNED_SHIM, "shim", "shim-signed"),
            ("signed_grub", signed_grub, _efi.SIGNED_GRUB, "GRUB", "grub-efi-amd64-signed")):
        if given:
            path, option = given, key
            missing = f"give the signed {what} from {package} (installed as /{relative})"
        else:
            path, option = os.path.join(tree or "", relative), "tree"
            missing = (f"install {package} into the tree (the rootfs role does with osimage_secure_boot), or give {key} "
                       f"(packages needed: {_efi.SIGNED_PACKAGES})")
        data = _read_file(path, option, missing)
        _efi.check_signed_efi(data, path, what, option, package)
        sources[key] = (path, data)
    mok_path = os.path.join(os.path.dirname(sources["shim"][0]), _efi.MOK_MANAGER_NAME)
    mok = None
    if os.path.isfile(mok_path):
        data = _read_file(mok_path, "shim", "")
        _efi.check_signed_efi(data, mok_path, "MokManager", "shim", "shim-helpers-amd64-signed")
        mok = (mok_path, data)
    sources["mok"] = mok
    return sources


def _check_grub_dir(grub_dir: str) -> None:
    for name in ("moddep.lst", "kernel.img"):
        if not os.path.isfile(os.path.join(grub_dir, name)):
            raise BuildError(f"{grub_dir} holds no x86_64-efi GRUB ({name} is missing); install grub-efi-amd64-bin "
                             "(Debian) or grub2-efi-x64-modules (Fedora), or point grub_dir at GRUB's x86_64-efi "
                             "directory", option="grub_dir")


def _build_grub_efi(mkimage: str, grub_dir: str, modules: list[str]) -> bytes:
    with tempfile.TemporaryDirectory(prefix="osimage-grub-efi-") as tmp:
        output = os.path.join(tmp, "BOOTX64.EFI")
        run(_efi.mkimage_argv(mkimage, grub_dir, output, modules), option="modules", what="grub-mkimage")
        with open(output, "rb") as handle:
            return handle.read()


def _epoch(sources: t.Sequence[str]) -> int:
    """SOURCE_DATE_EPOCH, else the newest mtime of the files the boot files come from."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value not in (None, ""):
        try:
            return max(int(str(value).strip()), 0)
        except ValueError:
            raise BuildError(f"the environment variable SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds")
    newest = 0
    for path in sources:
        try:
            newest = max(newest, int(os.stat(path).st_mtime))
        except OSError:
            continue
    return newest


# ----------------------------------------------------------------------------
# The module


def _would(msg: str, image: str, secure_boot: bool) -> dict[str, t.Any]:
    what = "shim, signed GRUB" if secure_boot else "GRUB"
    return {"changed": True, "msg": msg, "written": [], "removed": [],
            "diff": {"before": "", "after": f"{what} and grub.cfg in {_efi.BOOT_DIR} of the ESP of {image}\n"}}


def _check_options(esp_partition: object, root_uuid: object, boot_partition: object, secure_boot: bool,
                   modules: t.Sequence[str]) -> str | None:
    if esp_partition is None or str(esp_partition).strip() == "":
        raise BuildError("give the number or GPT name of the EFI system partition", option="esp_partition")
    given = [name for name, value in (("root_uuid", root_uuid), ("boot_partition", boot_partition))
             if value is not None and str(value).strip() != ""]
    if len(given) != 1:
        raise BuildError("give exactly one of root_uuid (the UUID of the filesystem that holds GRUB's directory) or "
                         "boot_partition (the partition whose filesystem UUID to read)", option="root_uuid")
    if secure_boot and modules:
        raise BuildError("modules cannot be added to the signed GRUB image Secure Boot uses (it is built and signed by "
                         "the distribution); remove modules or set secure_boot to false", option="modules")
    return _efi.check_root_uuid(root_uuid) if root_uuid not in (None, "") else None


def install_grub_efi(image: str, esp_partition: object, root_uuid: str | None = None, boot_partition: object = None,
                     grub_dir: str = _efi.DEFAULT_GRUB_DIR, prefix: str = _efi.DEFAULT_PREFIX, secure_boot: bool = False,
                     tree: str | None = None, shim: str | None = None, signed_grub: str | None = None,
                     modules: t.Sequence[str] = (), mkimage: str | None = None, allow_block_device: bool = False,
                     check_mode: bool = False) -> dict[str, t.Any]:
    """Put the EFI boot files onto the ESP of ``image``; return the module result."""
    wanted_uuid = _check_options(esp_partition, root_uuid, boot_partition, secure_boot, modules)
    prefix = _efi.check_prefix(prefix)
    mods: list[str] = []
    if secure_boot:
        signed = _signed_sources(tree, shim, signed_grub)
        epoch_sources = [signed["shim"][0], signed["signed_grub"][0]] + ([signed["mok"][0]] if signed["mok"] else [])
        mkimage_path = None
    else:
        signed = None
        mods = _efi.efi_modules(modules)
        _check_grub_dir(grub_dir)
        mkimage_path = find_tool([mkimage] if mkimage else ["grub-mkimage", "grub2-mkimage"], "mkimage",
                                 "grub-common (Debian) or grub2-tools (Fedora)")
        epoch_sources = [os.path.join(grub_dir, "kernel.img"), os.path.join(grub_dir, "moddep.lst")] + \
            [os.path.join(grub_dir, f"{name}.mod") for name in mods]
    epoch = _epoch(epoch_sources)
    programs = _Mtools.find()

    if image_kind(image, "image", allow_block_device) is None and check_mode:
        return _would(f"{image} does not exist yet; the EFI boot files would be written once it has an ESP", image, secure_boot)

    with Image(image, writable=not check_mode, allow_block_device=allow_block_device) as img:
        if not check_mode:
            img.lock()
        try:
            table = read_table(img)
        except BuildError:
            if check_mode:
                return _would(f"{image} has no partition table yet; the EFI boot files would be written once it has an ESP",
                              image, secure_boot)
            raise
        part = find_partition(table, esp_partition, "esp_partition")
        offset = part.start_sector * SECTOR_SIZE
        size = part.sectors * SECTOR_SIZE
        if check_mode and not img.has_data(offset, size):
            return _would(f"partition {part.number} holds no filesystem yet; the EFI boot files would be written once "
                          "the FAT exists", image, secure_boot)
        found = probe(img.read, offset)
        if not found or found["fstype"] != "vfat":
            raise BuildError(f"partition {part.number} of {image} holds {describe(found)}, not a FAT filesystem; an EFI "
                             "system partition must be FAT: make it with osimage.builder.filesystem fstype vfat, or name "
                             "the right partition", option="esp_partition", found=(found or {}).get("fstype"))
        warnings = []
        if part.type.upper() not in (ESP_TYPES[0], ESP_TYPES[1].upper()) and (part.mbr_type or "").lower() != ESP_TYPES[1]:
            warnings.append(f"partition {part.number} has type {part.type}, not the EFI system partition type "
                            f"({ESP_TYPES[0]} on GPT, ef on MBR); firmware may not boot from it. Use type esp in "
                            "osimage.builder.partition_table")
        if wanted_uuid is None:
            wanted_uuid, number = _uuid_of(img, table, boot_partition, prefix, check_mode)
            if wanted_uuid is None:
                return _would(f"partition {number} holds no filesystem yet; the EFI boot files would be written "
                              "once it has one", image, secure_boot)
        cfg = _efi.grub_cfg(wanted_uuid, prefix)
        if signed is not None:
            mok = signed["mok"]
            files, stale = _efi.file_plan(cfg, signed["shim"][1], signed["shim"][0], signed["signed_grub"][1],
                                          signed["signed_grub"][0], mok[1] if mok else None, mok[0] if mok else "")
        else:
            boot_efi = _build_grub_efi(t.cast(str, mkimage_path), grub_dir, mods)
            files, stale = _efi.file_plan(cfg, boot_efi, f"grub-mkimage -O x86_64-efi -d {grub_dir}")

        workdir = tempfile.mkdtemp(prefix="osimage-grub-efi-")
        try:
            tools = _Mtools(programs, workdir, image, offset, epoch)
            present = tools.listing()
            current: dict[str, bytes | None] = {}
            for path in [item.path for item in files] + stale:
                stored = present.get(path.lower())
                current[path] = tools.read(stored) if stored is not None else None
            updates = [item for item in files if current[item.path] != item.data]
            removals = [path for path in stale if current[path] is not None
                        and (path != _efi.DEBIAN_CFG or _efi.is_our_cfg(current[path]))]
            changed = bool(updates or removals)
            if changed and not check_mode:
                new_dirs = [d for d in _efi.directories(item.path for item in updates) if d.lower() not in present]
                _check_space(img, offset, found, updates, current, new_dirs, image, part.number)
                _write(img, part, tools, workdir, present, new_dirs, updates, removals, epoch)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    result: dict[str, t.Any] = {
        "changed": changed,
        "msg": (f"{'would write' if check_mode else 'wrote'} {len(updates)} and "
                f"{'would remove' if check_mode else 'removed'} {len(removals)} files on the ESP") if changed
        else "the ESP already holds these EFI boot files",
        "esp_partition": part.number,
        "esp_uuid": found.get("uuid", ""),
        "root_uuid": wanted_uuid,
        "prefix": prefix,
        "secure_boot": bool(secure_boot),
        "modules": mods,
        "grub_cfg": cfg,
        "files": {item.path: {"size": len(item.data), "sha256": hashlib.sha256(item.data).hexdigest(), "source": item.source}
                  for item in files},
        "written": [item.path for item in updates],
        "removed": removals,
        "diff": _diff(f"{image} partition {part.number} (ESP, {describe(found)})", files, current, removals),
    }
    if warnings:
        result["warnings"] = warnings
    return result


def _uuid_of(img: Image, table: t.Any, boot_partition: object, prefix: str, check_mode: bool) -> tuple[str | None, int]:
    """The UUID of the filesystem on ``boot_partition`` (None in check mode when it is not made yet) and its number."""
    boot = find_partition(table, boot_partition, "boot_partition")
    found = probe(img.read, boot.start_sector * SECTOR_SIZE)
    if not found:
        if check_mode and not img.has_data(boot.start_sector * SECTOR_SIZE, boot.sectors * SECTOR_SIZE):
            return None, boot.number
        raise BuildError(f"partition {boot.number} holds no filesystem GRUB could read {prefix} from; create it first "
                         "with osimage.builder.filesystem, or give root_uuid", option="boot_partition")
    if not found.get("uuid"):
        raise BuildError(f"the {found['fstype']} filesystem on partition {boot.number} has no UUID to search for; give "
                         "root_uuid", option="boot_partition")
    return _efi.check_root_uuid(found["uuid"], "boot_partition"), boot.number


def _diff(header: str, files: list[_efi.PlannedFile], current: dict[str, bytes | None], removals: list[str]) -> dict[str, str]:
    before = "".join(f"{item.path}: {_efi.describe(current[item.path])}\n" for item in files)
    before += "".join(f"{path}: {_efi.describe(current[path])}\n" for path in removals)
    after = "".join(f"{item.path}: {_efi.describe(item.data)}\n" for item in files)
    after += "".join(f"{path}: absent\n" for path in removals)
    return {"before": before, "after": after, "before_header": header, "after_header": header}


def _check_space(img: Image, offset: int, found: dict[str, t.Any], updates: list[_efi.PlannedFile],
                 current: dict[str, bytes | None], new_dirs: list[str], image: str, number: int) -> None:
    """Fail before writing anything when the files cannot fit (mtools frees a file's clusters before rewriting it)."""
    cluster = found["cluster_size"]
    need = sum(_efi.clusters_for(len(item.data), cluster) - _efi.clusters_for(len(current[item.path] or b""), cluster)
               for item in updates) + len(new_dirs) + _DIRECTORY_SLACK
    free = _efi.fat_free_clusters(img.read, offset, found)
    if need > free:
        raise BuildError(f"the EFI boot files need about {format_size(need * cluster)} more on partition {number} of {image} "
                         f"but its FAT has {format_size(free * cluster)} free; make the ESP bigger (64MiB or more is usual)",
                         option="esp_partition", needed=need * cluster, available=free * cluster)


def _set_installing(img: Image, part: t.Any, value: bool) -> bool:
    """Mark (or unmark) the filesystem module's record of the ESP as being written by a module.

    While marked, a partly written ESP (this module killed halfway) is rebuilt by the
    filesystem module without force, as its own interrupted build would be. Returns
    False when the partition has no record (the filesystem module did not make it)
    or when it no longer matches the record (changed by something else before this
    run): then the record is left alone, and not refreshed after writing either.
    """
    state = StateFile(state_path(img.path, img.is_block))
    record = state.get(part.start_sector)
    if record is None or record.get("sectors") != part.sectors or "input_digest" not in record:
        return False
    if value:
        if record.get("fingerprint") != fingerprint(img, part.start_sector * SECTOR_SIZE, part.sectors * SECTOR_SIZE):
            # Changed behind the filesystem module's back before this run: leave that for it to notice.
            return False
        record["installing"] = True
    else:
        record.pop("installing", None)
    state.put(part.start_sector, record)
    state.save()
    return True


def _write(img: Image, part: t.Any, tools: _Mtools, workdir: str, present: dict[str, str], new_dirs: list[str],
           updates: list[_efi.PlannedFile], removals: list[str], epoch: int) -> None:
    """Write ``updates`` and delete ``removals`` with mtools, check the result, refresh the filesystem record."""
    staging = os.path.join(workdir, "files")
    by_directory: dict[str, list[bytes]] = {}
    for index, item in enumerate(updates):
        # One staging directory per file: the name on the host is the name on the FAT.
        folder = os.path.join(staging, str(index))
        os.makedirs(folder)
        path = os.path.join(folder, item.name)
        with open(path, "wb") as handle:
            handle.write(item.data)
        os.utime(path, (epoch, epoch))
        by_directory.setdefault(item.directory, []).append(os.fsencode(path))
    marked = _set_installing(img, part, True)
    commands: list[tuple[list[t.Any], str]] = []
    if removals:
        commands.append((_efi.mdel_argv(tools.mdel, tools.target, [present[path.lower()] for path in removals]), "mdel"))
    commands += [(argv, "mmd") for argv in _mkfs.mmd_argv(tools.mmd, tools.target, [os.fsencode(d) for d in new_dirs])]
    for directory, paths in by_directory.items():
        stored = present.get(directory.lower(), directory)
        commands += [(argv, "mcopy") for argv in _mkfs.mcopy_argv(tools.mcopy, tools.target, paths, os.fsencode(stored))]
    for argv, what in commands:
        tools.check(argv, what)
    # Read back what mtools wrote: the next run compares the same way.
    listing = tools.listing()
    for item in updates:
        stored = listing.get(item.path.lower())
        if stored is None or tools.read(stored) != item.data:
            raise BuildError(f"{item.path} on the ESP does not hold what was written; the FAT may be damaged "
                             "(check it with fsck.vfat -n)", option="esp_partition")
    os.fsync(img.fd)
    if marked:
        _set_installing(img, part, False)
        refresh_fingerprint(img, part.start_sector, part.sectors)
