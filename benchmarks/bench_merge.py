"""Wall time and peak memory of `loratools merge` next to PEFT + transformers and a plain copy.

A ~1 GB bf16 Llama-style model (hidden 2048, 8 layers, sharded) and a rank-16 PEFT adapter on
every linear are generated once (random weights) under --workdir. Each contender runs in its own
child process so its peak RSS is measured alone (os.wait4). Usage:

    python benchmarks/bench_merge.py [--workdir DIR] [--rank 16] [--repeat 1]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# generated in a child so this parent stays small: a forked child's peak RSS includes the parent's
GENERATE = f"import sys; sys.path.insert(0, {HERE!r}); from _models import make_llama, make_peft_adapter; "

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="300MB")
"""


def timed_child(cmd) -> tuple:
    """(seconds, peak RSS in MiB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{err[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "loratools-bench"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--skip-peft", action="store_true")
    args = ap.parse_args()

    base = os.path.join(args.workdir, "llama-1gb-bf16")
    adapter = os.path.join(args.workdir, f"adapter-r{args.rank}")
    if not os.path.exists(os.path.join(base, "config.json")):
        print(f"generating the base model in {base} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-c", GENERATE + "make_llama(sys.argv[1])", base], check=True)
    if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        subprocess.run([sys.executable, "-c", GENERATE + "make_peft_adapter(sys.argv[1], sys.argv[2], rank=int(sys.argv[3]))",
                        adapter, base, str(args.rank)], check=True)
    size = folder_bytes(base)
    out = os.path.join(args.workdir, "out")
    py = sys.executable

    rows = []
    shutil.rmtree(out, ignore_errors=True)
    copy_cmd = [py, "-c", "import shutil,sys; shutil.copytree(sys.argv[1], sys.argv[2])", base, out]
    timed_child(copy_cmd)  # warm the page cache so every contender reads from memory
    shutil.rmtree(out, ignore_errors=True)
    rows.append(("plain copy of the folder",) + timed_child(copy_cmd))
    shutil.rmtree(out, ignore_errors=True)
    rows.append(("loratools merge",) + timed_child([py, "-m", "loratools", "merge", base, adapter, "-o", out, "-q"]))
    shutil.rmtree(out, ignore_errors=True)
    if not args.skip_peft:
        rows.append(("PEFT merge_and_unload + save_pretrained",) + timed_child([py, "-c", PEFT_SCRIPT, base, adapter, out]))
        shutil.rmtree(out, ignore_errors=True)

    print(f"model: {size / 2**30:.2f} GiB bf16, {len(os.listdir(base)) - 2} shards; adapter rank {args.rank} "
          f"on every linear; {os.cpu_count()} CPUs")
    print(f"{'contender':42s} {'wall s':>8s} {'peak RSS MiB':>13s} {'GB/s':>6s}")
    for name, t, rss in rows:
        print(f"{name:42s} {t:8.2f} {rss:13.0f} {2 * size / t / 1e9:6.2f}")
    ours = rows[1]
    print(f"loratools vs plain copy: {ours[1] / rows[0][1]:.2f}x the time")
    if not args.skip_peft:
        peft = rows[2]
        print(f"PEFT / loratools: {peft[1] / ours[1]:.1f}x the time, {peft[2] / ours[2]:.1f}x the peak memory")


if __name__ == "__main__":
    main()
