"""What validation costs, and how fast `inspect`'s ‖ΔW‖ is, against peers measured in the same run.

1. The checks `merge` now runs before writing (`check_adapter` + `check_base`: NaN/Inf, structure,
   scales, fit to the base headers) next to the merge itself: their share of a merge.
2. `validate --base` with norms (reads every targeted base weight once) next to the merge.
3. `LoraModule.delta_norm` (two r×r Gram products) next to the dense norm of s·B@A that a
   naive inspector computes, over every module of the adapter.

A Llama-style bf16 model (default ~1 GB: hidden 2048, 8 layers) and a rank-16 PEFT adapter on
every linear are generated under --workdir (random weights). Usage:

    python benchmarks/bench_validate.py [--workdir DIR] [--rank 16] [--layers 8] [--hidden 2048] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._models import make_llama, make_peft_adapter  # noqa: E402
from loratools import merge, read_adapter  # noqa: E402
from loratools.checkpoint import Checkpoint  # noqa: E402
from loratools.checks import check_adapter, check_base, check_delta_norms  # noqa: E402

warnings.filterwarnings("ignore", message=".*loratools._C is not built.*")


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 keeps small-tensor timings stable on a busy machine)")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="loratools-bench-validate-")
    base, adapter_dir = os.path.join(work, "base"), os.path.join(work, f"adapter-r{args.rank}")
    if not os.path.isdir(base):
        make_llama(base, layers=args.layers, hidden=args.hidden, intermediate=args.hidden * 11 // 4)
    if not os.path.isdir(adapter_dir):
        make_peft_adapter(adapter_dir, base, rank=args.rank)
    torch.set_num_threads(args.threads)
    ckpt = Checkpoint(base)
    adapter = read_adapter(adapter_dir, check=False)
    print(f"base {base}: {sum(i.end - i.begin for i in ckpt.infos.values()) / 2**30:.2f} GiB, "
          f"{len(ckpt.shards)} shard(s); adapter rank {args.rank}, {len(adapter)} modules; "
          f"{torch.get_num_threads()} thread(s)")

    out = os.path.join(work, "merged")
    shutil.rmtree(out, ignore_errors=True)
    t_merge = best(lambda: (merge(base, [adapter], out, overwrite=True)), max(1, args.repeat - 1))
    t_checks = best(lambda: check_adapter(adapter) + check_base(adapter, ckpt), args.repeat)
    t_norms = best(lambda: check_delta_norms(adapter, ckpt), max(1, args.repeat - 1))
    shutil.rmtree(out, ignore_errors=True)
    print(f"merge (includes the checks)      {t_merge:8.3f} s")
    print(f"merge's checks                   {t_checks * 1000:8.1f} ms  = {100 * t_checks / t_merge:.2f}% of the merge")
    print(f"validate --base norms            {t_norms:8.3f} s   = {t_norms / t_merge:.2f}x the merge")

    mods = list(adapter)
    t_gram = best(lambda: [m.delta_norm() for m in mods], args.repeat)

    def dense():
        return [float(torch.linalg.vector_norm(m.dense_delta(torch.float32))) for m in mods]

    t_dense = best(dense, args.repeat)
    exact = [float(torch.linalg.vector_norm(m.dense_delta(torch.float64))) for m in mods]  # the reference

    def worst(values):
        return max(abs(a - b) / b for a, b in zip(values, exact))

    print(f"|dW| all modules, Gram (ours)    {t_gram * 1000:8.1f} ms  max relative error vs fp64 dense "
          f"{worst([m.delta_norm() for m in mods]):.1e}")
    print(f"|dW| all modules, dense fp32 B@A {t_dense * 1000:8.1f} ms  max relative error vs fp64 dense "
          f"{worst(dense()):.1e}  -> ours is {t_dense / t_gram:.0f}x faster")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
