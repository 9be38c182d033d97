"""Wall time and peak memory of `loratools merge` next to PEFT + transformers and a plain copy.

A ~1 GB bf16 Llama-style model (hidden 2048, 8 layers, sharded) and a rank-16 PEFT adapter on
every linear are generated once (random weights) under --workdir. Each contender runs in its own
child process so its peak RSS is measured alone (os.wait4). Usage:

    python benchmarks/bench_merge.py [--workdir DIR] [--rank 16] [--repeat 3] [--skip-peft]
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

# Each child prints "WORK <seconds>": its time after the imports, so the table can show the work
# apart from the interpreter + torch start-up that every contender pays.
PEFT_SCRIPT = """
import sys, time, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="300MB")
print("WORK", time.perf_counter() - t0)
"""
LORATOOLS_SCRIPT = """
import sys, time
from loratools.cli.main import main
import loratools.cli.merge, loratools.ops  # the CLI loads these (and torch) lazily: start-up, not work
if any("cuda" in a for a in sys.argv):  # the CUDA context (once per process) is start-up too
    import torch; torch.zeros(1, device="cuda")
t0 = time.perf_counter()
code = main(["merge", *sys.argv[1:], "-q"])
print("WORK", time.perf_counter() - t0)
sys.exit(code)
"""
COPY_SCRIPT = """
import shutil, sys, time
t0 = time.perf_counter()
shutil.copytree(sys.argv[1], sys.argv[2])
print("WORK", time.perf_counter() - t0)
"""


def timed_child(cmd) -> tuple:
    """(wall seconds, seconds after imports, peak RSS in MiB) of one child process, measured alone
    with wait4 (its own rusage)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{cmd[:3]} failed:\n{err.read().decode(errors='replace')[-2000:]}")
        work = [float(line.split()[1]) for line in out.read().decode().splitlines() if line.startswith("WORK ")]
    return elapsed, work[-1], usage.ru_maxrss / 1024


def clean(path: str) -> None:
    """Remove an output and flush dirty pages, so no contender pays for the previous one's writeback."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "loratools-bench"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--device", default="cpu", help="loratools merge --device (auto, cpu, cuda, cuda:N)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the copy and of loratools (best kept); PEFT runs once")
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

    def best_of(n: int, cmd) -> tuple:
        """The fastest of n runs (a shared machine only ever adds time); peak RSS of that run."""
        runs = []
        for _ in range(n):
            runs.append(timed_child(cmd))
            clean(out)
        return min(runs, key=lambda r: r[1])

    rows = []
    clean(out)
    copy_cmd = [py, "-c", COPY_SCRIPT, base, out]
    timed_child(copy_cmd)  # warm the page cache so every contender reads from memory
    clean(out)
    rows.append(("plain copy of the folder",) + best_of(args.repeat, copy_cmd))
    rows.append(("loratools merge",) + best_of(args.repeat, [py, "-c", LORATOOLS_SCRIPT, base, adapter, "-o", out,
                                                             "--device", args.device]))
    if not args.skip_peft:
        rows.append(("PEFT merge_and_unload + save_pretrained",) + best_of(1, [py, "-c", PEFT_SCRIPT, base, adapter, out]))

    print(f"model: {size / 2**30:.2f} GiB bf16, {len(os.listdir(base)) - 2} shards; adapter rank {args.rank} "
          f"on every linear; {os.cpu_count()} CPUs")
    print(f"loratools --device {args.device}" + (" (changed tensors streamed through the GPU)"
                                                 if args.device.startswith("cuda") else ""))
    print("wall: the whole process; work: after imports (python + torch start-up excluded)")
    print(f"{'contender':42s} {'wall s':>7s} {'work s':>7s} {'peak RSS MiB':>13s} {'work GB/s':>9s}")
    for name, wall, work, rss in rows:
        print(f"{name:42s} {wall:7.2f} {work:7.2f} {rss:13.0f} {2 * size / work / 1e9:9.2f}")
    ours = rows[1]
    print(f"loratools vs plain copy: {ours[2] / rows[0][2]:.2f}x the work time")
    if not args.skip_peft:
        peft = rows[2]
        print(f"PEFT / loratools: {peft[1] / ours[1]:.1f}x the wall time, {peft[2] / ours[2]:.1f}x the work time, "
              f"{peft[3] / ours[3]:.1f}x the peak memory")


if __name__ == "__main__":
    main()
