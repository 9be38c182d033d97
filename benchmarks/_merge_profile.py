"""Where a `loratools merge` spends its time, per stage (run by bench_merge.py --profile).

Runs one merge in this process with the stage functions wrapped by timers (wall and thread CPU
seconds, summed over the threads that ran them). Worker threads: the read stage (positional reads
of a piece of rows), the compute stage (merge kernel + finite check of the piece), the write stage
(pwrite into the page cache) and kernel-side copies of untouched tensors. Main thread: setup (open
the base, read the adapter, plan and check, copy the other files), tensors transformed whole, and
waiting for the workers. Wall > CPU in a stage: the thread was waiting (a lock, the disk) or was
runnable but not running (a busy machine). Prints one line `PROFILE <json>` (seconds).
Usage: _merge_profile.py BASE ADAPTER OUTPUT
"""
from __future__ import annotations

import json
import sys
import threading
import time
from collections import defaultdict

import torch

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
    timed(safetensors_io.StreamingWriter, "pwrite", "write")
    timed(safetensors_io.StreamingWriter, "copy_range", "copy")
    for attr in ("whole_buffer", "submit", "finish"):  # submit blocks only when the job queue is full
        timed(checkpoint._Workers, attr, "main: wait")
    timed(checkpoint, "rewrite_file", "shards")
    timed(merging, "_open", "setup: open base")
    timed(merging, "_load", "setup: read adapter")
    timed(folder.ModelFolderBase, "plan", "setup: plan + checks")
    timed(checkpoint, "copy_other_files", "setup: other files")
    row_merge = folder.row_merge

    def timed_row_merge(*args, **kwargs):
        fn = row_merge(*args, **kwargs)
        if fn is None:
            return None
        holder = type("Holder", (), {"merge_rows": staticmethod(fn)})
        timed(holder, "merge_rows", "compute")
        return holder.merge_rows
    folder.row_merge = timed_row_merge


def run(base: str, adapter: str, out: str) -> dict:
    """Seconds per stage; `workers` is the number of worker threads, `shards` the time they ran."""
    t0 = time.perf_counter()
    code = main(["merge", base, adapter, "-o", out, "-q"])
    if code:
        raise SystemExit(code)
    t = dict(TIMES, work=time.perf_counter() - t0)
    t["setup"] = t["work"] - t["shards"]
    t["workers"] = max(1, min(torch.get_num_threads(), checkpoint.MAX_WORKERS))
    return {k: round(v, 4) for k, v in sorted(t.items())
            if not (k.endswith(" cpu") and k.startswith(("setup", "main", "shards")))}


if __name__ == "__main__":
    install()
    print("PROFILE " + json.dumps(run(*sys.argv[1:4])))
