"""blend, resize and extract on the CPU and on --device (a GPU): time of each and the speed-up.

The Llama-style bf16 model of the merge benchmark (--layers decoder layers; 8 = ~1 GB) and PEFT
adapters of ranks 8, 16 and 32 on every linear are generated once under --workdir; the fine-tune
for extract is the rank-16 adapter merged into the base (bf16). The library calls run in this
process, adapters already read into memory (blend, resize) so the time is the linear algebra;
extract reads both models from the page cache (warmed first) like a user's run. Each call is
timed --repeat times, best kept; on the GPU after one warm-up (cuBLAS / cuSOLVER start-up not counted).
The device results are compared with the CPU's (relative Frobenius error of ΔW over all modules).

    python benchmarks/bench_device.py [--device cuda] [--layers 8] [--repeat 2] [--workdir DIR]

With --device cpu only the CPU column is measured (what runs on a machine without a GPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _models import make_llama, make_peft_adapter  # noqa: E402
from loratools import blend, extract, merge, read_adapter, resize  # noqa: E402
from loratools.options import resolve_device  # noqa: E402

RANKS, WEIGHTS = (8, 16, 32), (0.5, 0.3, 0.2)


def prepare(workdir: str, layers: int):
    tag = f"{layers}layers"
    base = os.path.join(workdir, f"llama-bf16-{tag}")
    if not os.path.exists(os.path.join(base, "config.json")):
        print(f"generating {base} ...", file=sys.stderr)
        make_llama(base, layers=layers)
    adapters = []
    for i, r in enumerate(RANKS):
        path = os.path.join(workdir, f"device-adapter-r{r}-{tag}")
        if not os.path.exists(os.path.join(path, "adapter_config.json")):
            make_peft_adapter(path, base, rank=r, seed=10 + i)
        adapters.append(path)
    tuned = os.path.join(workdir, f"llama-bf16-{tag}-tuned")
    if not os.path.exists(os.path.join(tuned, "config.json")):
        merge(base, [adapters[1]], tuned, device="cpu")
    return base, adapters, tuned


def best(fn, repeat: int, device: str):
    """(seconds of the fastest of `repeat` runs of fn(device), the last result); on a GPU after one
    warm-up run."""
    if device != "cpu":
        fn(device)
    out, times = None, []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), out


def rel_error(a, b) -> float:
    """‖ΔW_a − ΔW_b‖ / ‖ΔW_b‖ over all modules (dense, module by module, in fp64)."""
    num = den = 0.0
    for name, m in b.modules.items():
        da, db = a.modules[name].dense_delta(torch.float64), m.dense_delta(torch.float64)
        num += float((da - db).square().sum())
        den += float(db.square().sum())
    return (num / max(den, 1e-300)) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="the device to compare with the CPU (cpu: CPU only)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the generated model (8: ~1 GB)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "loratools-bench"))
    args = ap.parse_args()
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    base, paths, tuned = prepare(args.workdir, args.layers)
    adapters = [read_adapter(p) for p in paths]
    extract(base, tuned, rank=16, device="cpu")  # warm the page cache of both models

    cases = {
        "blend svd rank 16": lambda d: blend(adapters, WEIGHTS, method="svd", rank=16, device=d)[0],
        "blend ties density 0.5 rank 16": lambda d: blend(adapters, WEIGHTS, method="ties", density=0.5, rank=16,
                                                          device=d)[0],
        "resize rank 32 -> 8": lambda d: resize(adapters[2], rank=8, device=d).adapter,
        "extract rank 16 (randomized SVD)": lambda d: extract(base, tuned, rank=16, device=d).adapter,
    }
    where = torch.cuda.get_device_name(torch.device(device)) if device != "cpu" else "-"
    print(f"model: bf16 Llama-style, {args.layers} layers (hidden 2048); adapters of ranks {RANKS}; "
          f"CPU: {torch.get_num_threads()} threads; device: {device} {where}")
    print(f"{'operation':34s} {'cpu s':>8s} {'device s':>9s} {'speed-up':>9s} {'rel. diff':>10s}")
    for label, fn in cases.items():
        t_cpu, cpu = best(fn, args.repeat, "cpu")
        if device == "cpu":
            print(f"{label:34s} {t_cpu:8.2f} {'-':>9s} {'-':>9s} {'-':>10s}", flush=True)
            continue
        t_dev, dev = best(fn, args.repeat, device)
        print(f"{label:34s} {t_cpu:8.2f} {t_dev:9.3f} {t_cpu / t_dev:8.1f}x {rel_error(dev, cpu):10.2e}", flush=True)


if __name__ == "__main__":
    main()
