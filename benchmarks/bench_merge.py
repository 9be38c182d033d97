"""Wall time and peak memory of `loratools merge` next to a plain copy of the folder (and PEFT).

A ~1 GB bf16 Llama-style model (hidden 2048, 8 layers, sharded) and a rank-16 PEFT adapter on
every linear are generated once (random weights) under --workdir. Each contender runs in its own
child process so its peak RSS is measured alone (os.wait4); the copy and the merge run in turn,
round after round (a busy machine slows both alike), and the medians are reported with the load.
The input is read once before (warm in the page cache); each output is deleted and synced before
the next run, so no run pays for another's write-back; outputs are left dirty in the page cache
(no fsync), for the copy and the merge alike.

    python benchmarks/bench_merge.py [--workdir DIR] [--rank 16] [--repeat 5] [--skip-peft]
    python benchmarks/bench_merge.py --profile      # + where the merge's time goes, per stage
    python benchmarks/bench_merge.py --scale 16g    # + an 8B-shaped ~16 GB model, generated in a
                                                    #   temporary folder under --workdir, then deleted
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# generated in a child so this parent stays small: a forked child's peak RSS includes the parent's
GENERATE = f"import sys; sys.path.insert(0, {HERE!r}); from _models import make_llama, make_peft_adapter, LLAMA_8B; "

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
ROOT = os.path.dirname(HERE)
# stages the profile prints, in order, with what they are
STAGES = [("setup", "main: open base, read adapter, plan + checks, other files"),
          ("main: wait", "main: waiting for the workers (queue full, last jobs)"),
          ("read", "workers: read a piece of rows (pread from the page cache)"),
          ("compute", "workers: merge kernel + finite check of the piece"),
          ("write", "workers: pwrite of merged pieces into the page cache"),
          ("copy", "workers: kernel-side copy of untouched tensors")]


def timed_child(cmd) -> tuple:
    """(wall seconds, seconds after imports, peak RSS in MiB, stdout) of one child process, measured
    alone with wait4 (its own rusage)."""
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
        text = out.read().decode()
        work = [float(line.split()[1]) for line in text.splitlines() if line.startswith("WORK ")]
    return elapsed, work[-1] if work else elapsed, usage.ru_maxrss / 1024, text


def clean(path: str) -> None:
    """Remove an output and flush dirty pages, so no contender pays for the previous one's writeback."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def prepare(folder: str, rank: int, size: str) -> tuple:
    base, adapter = os.path.join(folder, f"llama-{size}-bf16"), os.path.join(folder, f"adapter-r{rank}")
    if size != "1gb":
        adapter += "-" + size
    extra = ", **LLAMA_8B, shard_bytes=5 * 2**30" if size == "16g" else ""
    if not os.path.exists(os.path.join(base, "config.json")):
        print(f"generating the base model in {base} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-c", GENERATE + f"make_llama(sys.argv[1]{extra})", base], check=True)
    if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        subprocess.run([sys.executable, "-c", GENERATE + "make_peft_adapter(sys.argv[1], sys.argv[2], "
                        "rank=int(sys.argv[3]))", adapter, base, str(rank)], check=True)
    return base, adapter


def rounds(n: int, cmds: dict, out: str) -> dict:
    """Each command once per round, in turn; {name: [(wall, work, rss, stdout), ...]}."""
    runs: dict = {name: [] for name in cmds}
    for _ in range(n):
        for name, cmd in cmds.items():
            runs[name].append(timed_child(cmd))
            clean(out)
    return runs


def report(title: str, size: int, runs: dict) -> dict:
    print(f"{title}: {size / 2**30:.2f} GiB; medians of {len(next(iter(runs.values())))} run(s), {load()}")
    print(f"  {'contender':40s} {'wall s':>7s} {'work s':>7s} {'peak RSS MiB':>13s} {'work s/GiB':>10s}")
    med = {}
    for name, rs in runs.items():
        wall, work, rss = (statistics.median(r[i] for r in rs) for i in range(3))
        med[name] = (wall, work, rss)
        print(f"  {name:40s} {wall:7.2f} {work:7.2f} {rss:13.0f} {work / (size / 2**30):10.3f}")
    if "plain copy of the folder" in runs and "loratools merge" in runs:
        pairs = [m[1] / c[1] for c, m in zip(runs["plain copy of the folder"], runs["loratools merge"])]
        print(f"  loratools merge vs plain copy: {statistics.median(pairs):.2f}x the work time "
              f"(median of the per-round ratios; min {min(pairs):.2f}x)")
    return med


def profile(n: int, base: str, adapter: str, out: str) -> None:
    profs = []
    for _ in range(n):
        # the loratools next to this script, like the merge contender run from the repository root
        text = timed_child([sys.executable, "-c", f"import sys, runpy; sys.path[:0] = [{ROOT!r}, {HERE!r}]; "
                            "runpy.run_module('_merge_profile', run_name='__main__')", base, adapter, out])[3]
        clean(out)
        profs.append(json.loads([ln for ln in text.splitlines() if ln.startswith("PROFILE ")][-1][8:]))
    med = {k: statistics.median(p[k] for p in profs) for k in profs[0]}
    print(f"where the merge's time goes: medians of {n} in-process run(s), {load()}; input warm in the page "
          f"cache, output fresh files left dirty in it (no fsync), the previous output removed and synced")
    print(f"  work {med['work']:.3f} s, of which setup {med['setup']:.3f} s and the shards {med['shards']:.3f} s "
          f"on {med['workers']:.0f} worker thread(s) (stage seconds are summed over threads; cpu = thread CPU time)")
    for key, what in STAGES:
        cpu = med.get(key + " cpu")
        print(f"  {key:12s} {med.get(key, 0.0):7.3f} s" + (f"  cpu {cpu:6.3f} s" if cpu is not None else " " * 14)
              + f"  {what}")
    busy = sum(med.get(k + " cpu", 0.0) for k in ("read", "compute", "write", "copy"))
    print(f"  workers' CPU {busy:.3f} s = {busy / med['workers']:.3f} s per worker thread; the timers' own cost "
          "can inflate wall times (they take the GIL): the cpu column and the uninstrumented work time above hold")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "loratools-bench"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--device", default="cpu", help="loratools merge --device (auto, cpu, cuda, cuda:N)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds of the copy and of loratools; PEFT runs once")
    ap.add_argument("--profile", action="store_true",
                    help="also time the merge's stages (read, compute, write, waiting)")
    ap.add_argument("--scale", choices=["16g"], help="also merge an 8B-shaped ~16 GB bf16 model (needs ~35 GB "
                    "free under --workdir for a while; generated into a temporary folder and deleted after)")
    args = ap.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    base, adapter = prepare(args.workdir, args.rank, "1gb")
    size = folder_bytes(base)
    out = os.path.join(args.workdir, "out")
    py = sys.executable
    copy_cmd = [py, "-c", COPY_SCRIPT, base, out]
    merge_cmd = [py, "-c", LORATOOLS_SCRIPT, base, adapter, "-o", out, "--device", args.device]

    clean(out)
    timed_child(copy_cmd)  # warm the page cache so every contender reads from memory
    clean(out)
    runs = rounds(args.repeat, {"plain copy of the folder": copy_cmd, "loratools merge": merge_cmd}, out)
    if not args.skip_peft:
        runs["PEFT merge_and_unload + save_pretrained"] = rounds(1, {"": [py, "-c", PEFT_SCRIPT, base, adapter, out]},
                                                                 out)[""]
    print(f"rank-{args.rank} adapter on every linear; {os.cpu_count()} CPUs")
    print(f"loratools --device {args.device}" + (" (changed tensors streamed through the GPU)"
                                                 if args.device.startswith("cuda") else ""))
    print("wall: the whole process; work: after imports (python + torch start-up excluded)")
    small = report(f"model {os.path.basename(base)}, {len(os.listdir(base)) - 2} shards", size, runs)
    if not args.skip_peft:
        peft, ours = small["PEFT merge_and_unload + save_pretrained"], small["loratools merge"]
        print(f"  PEFT / loratools: {peft[0] / ours[0]:.1f}x the wall time, {peft[1] / ours[1]:.1f}x the work time, "
              f"{peft[2] / ours[2]:.1f}x the peak memory")
    if args.profile:
        profile(args.repeat, base, adapter, out)
    if args.scale:
        scale(args, small, size)


def scale(args, small: dict, small_size: int) -> None:
    """The 16 GB model, once: its figures per GiB next to the 1 GB model's."""
    tmp = tempfile.mkdtemp(prefix="loratools-bench-16g-", dir=args.workdir)
    try:
        t0 = time.perf_counter()
        base, adapter = prepare(tmp, args.rank, "16g")
        print(f"generated the 16 GB model in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        out = os.path.join(tmp, "out")
        size = folder_bytes(base)
        py = sys.executable
        cmds = {"plain copy of the folder": [py, "-c", COPY_SCRIPT, base, out],
                "loratools merge": [py, "-c", LORATOOLS_SCRIPT, base, adapter, "-o", out, "--device", args.device]}
        clean(out)
        runs = rounds(1, cmds, out)  # more than the page cache holds: both read from the disk
        big = report(f"model 8B-shaped, {len(os.listdir(base)) - 2} shards (input and output do not fit the "
                     f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB of RAM together)",
                     size, runs)
        for name in cmds:
            per_small, per_big = small[name][1] / (small_size / 2**30), big[name][1] / (size / 2**30)
            print(f"  {name}: {per_big:.3f} s/GiB at {size / 2**30:.1f} GiB vs {per_small:.3f} s/GiB at "
                  f"{small_size / 2**30:.2f} GiB; peak RSS {big[name][2]:.0f} vs {small[name][2]:.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
