# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Check what ansible-runner kept of the two runs of build-image.yml."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys


def stats_event(artifacts: str, ident: str) -> dict:
    for path in sorted(glob.glob(os.path.join(artifacts, ident, "job_events", "*.json"))):
        with open(path, encoding="utf-8") as handle:
            event = json.load(handle)
        if event.get("event") == "playbook_on_stats":
            return event["event_data"]
    raise SystemExit(f"{ident}: no playbook_on_stats event")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


def main(artifacts: str, output: str, rerun_seconds: str) -> None:
    for ident in ("first", "again"):
        status = read(os.path.join(artifacts, ident, "status"))
        if status != "successful":
            raise SystemExit(f"{ident}: status {status}")
    first = stats_event(artifacts, "first")
    data = first["artifact_data"]
    image = os.path.join(output, "debian-12.qcow2")
    if data.get("osimage_image_path") != image or not os.path.isfile(image):
        raise SystemExit(f"set_stats names {data.get('osimage_image_path')!r}, expected {image}")
    with open(image, "rb") as handle:
        sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    expected = {"osimage_image_format": "qcow2", "osimage_image_size": os.path.getsize(image),
                "osimage_image_sha256": sha256, "osimage_image_booted": True}
    for key, value in expected.items():
        if data.get(key) != value:
            raise SystemExit(f"set_stats {key} = {data.get(key)!r}, expected {value!r}")
    with open(image, "rb") as handle:
        if handle.read(4) != b"QFI\xfb":
            raise SystemExit(f"{image} is not a qcow2 image")
    again = stats_event(artifacts, "again")
    if any(again["changed"].values()) or any(again["failures"].values()):
        raise SystemExit(f"the rerun changed or failed something: changed={again['changed']} failures={again['failures']}")
    if int(rerun_seconds) >= 20:
        raise SystemExit(f"the rerun took {rerun_seconds} s; it must take under 20 s")
    print(f"artefacts ok: {image} ({expected['osimage_image_size']} bytes, sha256 {sha256}); rerun changed=0 in {rerun_seconds} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
