"""Where a `loratools merge` spends its time, per pipeline stage (run by bench_merge.py --profile).

Runs one merge in this process with the stage functions wrapped by timers. Main thread: setup
(open the base, read the adapter, plan and check, copy the other files, place the output), the
read stage (positional reads of weight pieces and whole tensors), waiting for a free buffer or a
place in the writer's queue, and compute (the rest: the merge kernel, finite checks, dtype
conversions). Writer thread: writes of merged bytes and kernel-side copies of untouched tensors;
with `thread_time` each, so time the thread spent runnable but not running shows up as wall > cpu.
Prints one line `PROFILE <json>` (seconds). Usage: _merge_profile.py BASE ADAPTER OUTPUT
"""
from __future__ import annotations

import json
import sys
import threading
import time
from collections import defaultdict

from loratools import checkpoint, merging, safetensors_io
from loratools.bases import folder
from loratools.cli.main import main
import loratools.cli.merge  # noqa: F401  (start-up, not work)
import loratools.ops  # noqa: F401

TIMES: "defaultdict[str, float]" = defaultdict(float)
LOCK = threading.Lock()


def timed(owner, attr: str, stage: str) -> None:
    fn = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            with LOCK:
                TIMES[stage] += time.perf_counter() - t0
                TIMES[stage + " cpu"] += time.thread_time() - c0
    setattr(owner, attr, wrapper)


def install() -> None:
    timed(safetensors_io.SafetensorsFile, "read_rows", "read")
    for attr in ("buffer", "write", "copy", "finish"):  # write/copy block only when the queue is full
        timed(checkpoint._Pipeline, attr, "wait")
    timed(safetensors_io.StreamingWriter, "pwrite", "write")
    timed(safetensors_io.StreamingWriter, "copy_range", "copy")
    timed(checkpoint, "rewrite_file", "shards")
    timed(merging, "_open", "setup: open base")
    timed(merging, "_load", "setup: read adapter")
    timed(folder.ModelFolderBase, "plan", "setup: plan + checks")
    timed(checkpoint, "copy_other_files", "setup: other files")


def run(base: str, adapter: str, out: str) -> dict:
    t0 = time.perf_counter()
    code = main(["merge", base, adapter, "-o", out, "-q"])
    if code:
        raise SystemExit(code)
    t = dict(TIMES, work=time.perf_counter() - t0)
    shards = t.pop("shards", 0.0)
    t["compute"] = shards - t.get("read", 0.0) - t.get("wait", 0.0)
    t["setup"] = t["work"] - shards
    return {k: round(v, 4) for k, v in sorted(t.items()) if not k.startswith(("setup:", "wait ")) or "cpu" not in k}


if __name__ == "__main__":
    install()
    print("PROFILE " + json.dumps(run(*sys.argv[1:4])))
