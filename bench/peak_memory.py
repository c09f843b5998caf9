# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Peak memory of each image module on a 16 GiB (sparse) image filled from a tree of some hundred MB.

Every step runs in a fresh Python process, twice:

  function  the module_utils function the module calls (ensure_disk_image, ...), nothing else
  module    the Ansible module itself (plugins/modules/X.py run directly with a JSON args file,
            as AnsiballZ runs it: AnsibleModule, argument spec, exit_json)

and reports that process's own peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) apart from the
external tools it started (mke2fs, grub-mkimage, qemu-img), which are separate processes.
The tools are measured with ``/usr/bin/time -f %M`` through wrappers first on PATH
(``RUSAGE_CHILDREN`` would not do: a child spawned from Python inherits Python's RSS
high-water mark through fork/vfork + exec, so it never reads lower than the parent). ``idle`` is the same Python importing the same code and doing nothing:
the difference is what the step itself costs. Steps run in build order (each needs the one
before); the image is rebuilt between the two ways, and "(rerun)" rows are the no-op reruns.

    python3 bench/peak_memory.py --tree /var/tmp/out/.work/debian-12/tree
    /root/venv/bin/python bench/peak_memory.py --tree TREE --size 16GiB      # a Python with Ansible for "module"

Target: under 100 MiB for each module process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from _common import collections_path, MiB

GRUB_DIR = "/usr/lib/grub/i386-pc"

# argv: collections root, report path, kind (function|module|idle), step name, JSON arguments
RUNNER = r"""
import atexit, json, os, resource, runpy, sys
sys.path.insert(0, sys.argv[1])
report, kind, step, params = sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])

def done():
    with open(report, "w") as handle:
        json.dump({"self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, handle)
atexit.register(done)

FUNCTIONS = {
    "disk_image": ("_disk_image", "ensure_disk_image"),
    "partition_table": ("_partition_table", "ensure_partition_table"),
    "filesystem": ("_filesystem", "ensure_filesystem"),
    "grub_bios_install": ("_grub_bios_install", "install_grub_bios"),
    "image_convert": ("_image_convert", "convert_image"),
}
module_name, function = FUNCTIONS[step]
if kind == "module":
    path = os.path.join(sys.argv[1], "ansible_collections", "osimage", "builder", "plugins", "modules", step + ".py")
    args_file = report + ".args.json"
    with open(args_file, "w") as handle:
        json.dump({"ANSIBLE_MODULE_ARGS": params}, handle)
    sys.argv = [path, args_file]
    runpy.run_path(path, run_name="__main__")
else:
    import importlib
    mod = importlib.import_module("ansible_collections.osimage.builder.plugins.module_utils." + module_name)
    if kind == "function":
        if "format" in params:
            params["fmt"] = params.pop("format")
        result = getattr(mod, function)(**params)
        print(json.dumps({"changed": result["changed"]}))
"""


TOOLS = ("mke2fs", "qemu-img", "grub-mkimage")


def make_shims(workdir: str) -> str:
    """A directory of wrappers that log each tool's own peak RSS (KiB) to workdir/tools.log."""
    shims = os.path.join(workdir, "shims")
    os.makedirs(shims, exist_ok=True)
    search = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin"
    for name in TOOLS:
        real = shutil.which(name, path=search)
        if real is None:
            continue
        path = os.path.join(shims, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(f"#!/bin/sh\nexec /usr/bin/time -a -o {os.path.join(workdir, 'tools.log')} -f '{name} %M' "
                         f"{real} \"$@\"\n")
        os.chmod(path, 0o755)
    return shims


def tool_peaks(workdir: str) -> dict[str, float]:
    peaks: dict[str, float] = {}
    log = os.path.join(workdir, "tools.log")
    if os.path.exists(log):
        with open(log, encoding="utf-8") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit():
                    peaks[parts[0]] = max(peaks.get(parts[0], 0.0), int(parts[1]) / 1024)
        os.unlink(log)
    return peaks


def measure(workdir: str, kind: str, step: str, params: dict) -> dict:
    report = os.path.join(workdir, "rusage.json")
    env = dict(os.environ, PATH=make_shims(workdir) + os.pathsep + os.environ.get("PATH", os.defpath))
    tool_peaks(workdir)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", RUNNER, collections_path(workdir), report, kind, step, json.dumps(params)],
                          capture_output=True, text=True, check=False, env=env)
    seconds = time.monotonic() - started
    out = done.stdout.strip().splitlines()
    if done.returncode != 0 or (kind == "module" and out and json.loads(out[-1]).get("failed")):
        raise RuntimeError(f"{kind} {step} failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    with open(report, encoding="utf-8") as handle:
        usage = json.load(handle)
    changed = None
    if out:
        try:
            changed = json.loads(out[-1]).get("changed")
        except ValueError:
            pass
    return {"self_mib": usage["self_kib"] / 1024, "tools_mib": tool_peaks(workdir), "seconds": seconds, "changed": changed}


def steps(image: str, tree: str, size: str) -> list[tuple[str, dict]]:
    qcow2 = image[:-4] + ".qcow2"
    return [
        ("disk_image", {"path": image, "size": size, "state": "present"}),
        ("partition_table", {"image": image, "label": "msdos", "partitions": [{"type": "linux", "bootable": True}]}),
        ("filesystem", {"image": image, "partition": 1, "fstype": "ext4", "source": tree, "label": "root"}),
        ("grub_bios_install", {"image": image, "boot_partition": 1, "grub_dir": GRUB_DIR}),
        ("image_convert", {"src": image, "dest": qcow2, "format": "qcow2"}),
    ]


def has_ansible() -> bool:
    return subprocess.run([sys.executable, "-c", "import ansible.module_utils.basic"], capture_output=True,
                          check=False).returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", required=True)
    parser.add_argument("--size", default="16GiB")
    parser.add_argument("--workdir", default="/var/tmp/osimage-bench-memory")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    if os.path.exists(args.workdir):
        shutil.rmtree(args.workdir)
    os.makedirs(args.workdir)
    kinds = ["function"] + (["module"] if has_ansible() else [])
    if "module" not in kinds:
        print(f"({sys.executable} cannot import ansible: measuring the functions only)")
    tree_bytes = int(subprocess.run(["du", "-sb", args.tree], capture_output=True, text=True, check=True).stdout.split()[0])
    entries = sum(len(dirs) + len(files) for _root, dirs, files in os.walk(args.tree))
    print(f"image {args.size} (sparse), tree {args.tree}: {tree_bytes / MiB:.0f} MiB, {entries} entries; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    rows = []
    for kind in kinds:
        image = os.path.join(args.workdir, kind, "disk.raw")
        os.makedirs(os.path.dirname(image))
        idle = measure(args.workdir, "idle", "filesystem", {})
        rows.append((kind, "idle (imports _filesystem)", idle))
        for rerun in (False, True):
            for step, params in steps(image, args.tree, args.size):
                result = measure(args.workdir, kind, step, params)
                rows.append((kind, step + (" (rerun)" if rerun else ""), result))
                tools = ", ".join(f"{name} {mib:.1f}" for name, mib in sorted(result["tools_mib"].items())) or "-"
                print(f"  {kind:8} {step + (' (rerun)' if rerun else ''):28} python {result['self_mib']:6.1f} MiB   "
                      f"tools (MiB): {tools:32} {result['seconds']:6.2f} s   changed={result['changed']}", flush=True)
        shutil.rmtree(os.path.dirname(image))
    print("\npeak RSS (MiB)              function   module   external tools (own process, largest run)")
    names = [name for kind, name, _r in rows if kind == "function"]
    for name in names:
        got = {kind: result for kind, row_name, result in rows if row_name == name}
        func, mod = got.get("function"), got.get("module")
        tools: dict[str, float] = {}
        for result in got.values():
            for tool_name, mib in result.get("tools_mib", {}).items():
                tools[tool_name] = max(tools.get(tool_name, 0.0), mib)
        print(f"  {name:26} {func['self_mib'] if func else 0:7.1f}  {mod['self_mib'] if mod else float('nan'):7.1f}   "
              + (", ".join(f"{tool_name} {mib:.1f}" for tool_name, mib in sorted(tools.items())) or "-"))
    worst = max(result["self_mib"] for _kind, _name, result in rows)
    print(f"\nlargest module process: {worst:.1f} MiB; target < 100 MiB: {'met' if worst < 100 else 'NOT met'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([{"kind": kind, "step": name, **result} for kind, name, result in rows], handle, indent=1)
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
