# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""A no-op rerun of the whole build-image.yml after one full build: how long, and is it changed=0?

Builds once into --output-dir (skipped when the image is already there), then reruns the same
command --runs times (default 5) and prints the median wall time of the reruns, the PLAY
RECAP's changed count of each, the tasks that reported a change (there should be none), and
the slowest tasks (median over the reruns, from a small timing callback this script writes
into its work directory).

    python3 bench/noop_rerun.py --output-dir /var/tmp/osimage-noop
    python3 bench/noop_rerun.py --output-dir DIR --runs 5 -- -e osimage_format=vmdk

ansible-playbook: $ANSIBLE_PLAYBOOK, else the one beside the Python running this, else PATH.
Target: changed=0 in under 10 s (median).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

from _common import ansible_playbook, REPO


CALLBACK = '''
import json, os, time
from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "osimage_task_times"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.tasks = []
        self.current = None

    def _close(self):
        if self.current is not None:
            name, started, changed = self.current
            self.tasks.append({"name": name, "seconds": time.monotonic() - started, "changed": changed})
            self.current = None

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._close()
        self.current = [task.get_name(), time.monotonic(), False]

    def v2_playbook_on_handler_task_start(self, task):
        self.v2_playbook_on_task_start(task, False)

    def v2_runner_on_ok(self, result):
        if self.current is not None and result.is_changed():
            self.current[2] = True

    def v2_playbook_on_stats(self, stats):
        self._close()
        with open(os.environ["OSIMAGE_TASK_TIMES"], "w") as handle:
            json.dump(self.tasks, handle)
'''


def setup(workdir: str) -> dict[str, str]:
    """Collections path (a symlink to this checkout) and the timing callback."""
    link = os.path.join(workdir, "collections", "ansible_collections", "osimage", "builder")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.realpath(link) != REPO:
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(REPO, link)
    callbacks = os.path.join(workdir, "callbacks")
    os.makedirs(callbacks, exist_ok=True)
    with open(os.path.join(callbacks, "osimage_task_times.py"), "w", encoding="utf-8") as handle:
        handle.write(CALLBACK)
    return {"ANSIBLE_COLLECTIONS_PATH": os.path.join(workdir, "collections"), "ANSIBLE_CALLBACK_PLUGINS": callbacks,
            "ANSIBLE_CALLBACKS_ENABLED": "osimage_task_times", "ANSIBLE_NOCOLOR": "1",
            "OSIMAGE_TASK_TIMES": os.path.join(workdir, "task-times.json")}


def play(argv: list[str], env: dict[str, str], log: str) -> tuple[float, dict[str, int], list[dict]]:
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run(argv, env=dict(os.environ, **env), stdout=handle, stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - started
    with open(log, encoding="utf-8") as handle:
        text = handle.read()
    recap = re.findall(r"^\S+\s+:\s+(.*)$", text.split("PLAY RECAP", 1)[-1], re.M)
    counts = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", recap[-1])} if recap else {}
    if done.returncode != 0 or counts.get("failed", 1):
        sys.exit(f"ansible-playbook failed (rc {done.returncode}); see {log}")
    with open(env["OSIMAGE_TASK_TIMES"], encoding="utf-8") as handle:
        tasks = json.load(handle)
    return seconds, counts, tasks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="osimage_output_dir of the build")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--boot-test", action="store_true", help="keep the boot test on (default: off, as in the build)")
    parser.add_argument("--top", type=int, default=12, help="how many of the slowest tasks to list")
    parser.add_argument("extra", nargs="*", help="more ansible-playbook arguments, after --")
    args = parser.parse_args()
    out = os.path.abspath(args.output_dir)
    workdir = os.path.join(out, ".bench-noop")
    env = setup(workdir)
    argv = [ansible_playbook(), os.path.join(REPO, "build-image.yml"),
            "-e", json.dumps({"osimage_output_dir": out, "osimage_boot_test": args.boot_test})] + args.extra
    print(f"command: {' '.join(argv)}\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs",
          flush=True)
    if not os.path.isdir(os.path.join(out, ".work")):
        os.makedirs(out, exist_ok=True)
        seconds, counts, _tasks = play(argv, env, os.path.join(workdir, "build.log"))
        print(f"full build: {seconds:.1f} s, {counts}", flush=True)
    # One settling run: the first rerun after a build may legitimately differ (e.g. it records
    # what an interrupted earlier run left); it is reported but not counted.
    seconds, counts, tasks = play(argv, env, os.path.join(workdir, "settle.log"))
    print(f"settling rerun: {seconds:.1f} s, changed={counts.get('changed')}", flush=True)
    reruns = []
    for number in range(args.runs):
        seconds, counts, tasks = play(argv, env, os.path.join(workdir, f"rerun-{number + 1}.log"))
        changed = [task["name"] for task in tasks if task["changed"]]
        reruns.append((seconds, counts, tasks))
        print(f"rerun {number + 1}: {seconds:6.2f} s  ok={counts.get('ok')} changed={counts.get('changed')} "
              f"skipped={counts.get('skipped')}" + (f"  changed tasks: {changed}" if changed else ""), flush=True)
    times = [seconds for seconds, _counts, _tasks in reruns]
    median = statistics.median(times)
    task_times: dict[str, list[float]] = {}
    for _seconds, _counts, tasks in reruns:
        per_run: dict[str, float] = {}
        for task in tasks:  # a task that runs several times in a play (a loop of includes) is summed
            per_run[task["name"]] = per_run.get(task["name"], 0.0) + task["seconds"]
        for name, seconds in per_run.items():
            task_times.setdefault(name, []).append(seconds)
    print(f"\nmedian of {len(times)} reruns: {median:.2f} s (min {min(times):.2f}, max {max(times):.2f}); "
          f"sum of task times (median) {statistics.median(sum(t['seconds'] for t in tasks) for _s, _c, tasks in reruns):.2f} s")
    print("slowest tasks (median s over the reruns, summed over repeats within a run):")
    ranked = sorted(task_times.items(), key=lambda item: -statistics.median(item[1]))
    for name, values in ranked[:args.top]:
        print(f"  {statistics.median(values):6.2f}  {name}")
    all_zero = all(counts.get("changed") == 0 for _seconds, counts, _tasks in reruns)
    print(f"\ntarget changed=0 and < 10 s: changed=0 {'yes' if all_zero else 'NO'}, median {median:.2f} s "
          f"{'< 10 s' if median < 10 else '>= 10 s'}")
    return 0 if all_zero and median < 10 else 1


if __name__ == "__main__":
    sys.exit(main())
