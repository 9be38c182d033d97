"""Times loratools' merge_ operator against the memory floor and the usual alternatives.

For each weight shape, LoRA rank, adapter count and dtype it prints (median of several runs after
warm-up, in ms):
  copy   dst.copy_(W) into a preallocated tensor: reads and writes W once, the floor for any merge
  op     torch.ops.loratools.merge_ (all adapters in one call, in place)
  peft   PEFT's CPU path: (W.float() + sum s*(B.float() @ A.float())).to(dtype)
  addmm  W.addmm_(B, A, alpha=s) per adapter, in W's dtype. On CPU this is very slow for bf16/fp16,
         so it is only timed there for the first shape with one adapter, and with a single run.
On CUDA it also prints the achieved bandwidth (bytes of W read + written / time) of copy and op,
op's bandwidth as a share of the copy's, and a last line for the target case (bf16, rank 16,
one adapter: op at >= 70% of a device copy's bandwidth). A 4096² bf16 W moves in ~8 µs on an
H200, less than the host needs to launch an op, so the times above are host-bound; the `graph`
columns replay 20 calls captured in a CUDA graph and time them with CUDA events: the device's
own time per call (the op's small fp32 factor packing included), which the target line uses.

    python benchmarks/bench_kernels.py [--quick] [--device cpu|cuda] [--runs N] [--stat median|min]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's loratools
from loratools import ops  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008)]
RANKS = [8, 16, 64]
ADAPTERS = [1, 4]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timeit(fn, runs: int, device: str, warmup: int = 2, stat=statistics.median) -> float:
    """Wall time of fn() in ms: median (or `stat`) of `runs` timed runs after `warmup` ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return stat(times)


def graph_time(fn, runs: int, replays: int = 20):
    """Device time of fn() in ms, from `replays` calls captured in one CUDA graph (no host launch
    cost), the best of `runs` replays; None where the capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(replays):
                fn()
    except RuntimeError as e:
        print(f"  (CUDA graph capture failed: {str(e).splitlines()[0]})")
        return None
    times = []
    for _ in range(runs + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return min(times[1:])


def bench_case(shape, rank, n_adapters, dtype, device, runs, time_addmm, stat):
    rows, cols = shape
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=gen).to(device, dtype)
    # Small scales: the in-place runs keep adding to W, which must stay finite in fp16.
    ups = [torch.randn(rows, rank, generator=gen).to(device, dtype) * 1e-2 for _ in range(n_adapters)]
    downs = [torch.randn(rank, cols, generator=gen).to(device, dtype) * 1e-2 for _ in range(n_adapters)]
    scales = [0.5 * (-1) ** i for i in range(n_adapters)]
    dst = torch.empty_like(w)

    def peft():
        acc = w.float()
        for b, a, s in zip(ups, downs, scales):
            acc = acc + s * (b.float() @ a.float())
        return acc.to(dtype)

    def addmm():
        for b, a, s in zip(ups, downs, scales):
            w.addmm_(b, a, alpha=s)

    row = {
        "copy": timeit(lambda: dst.copy_(w), runs, device, stat=stat),
        "op": timeit(lambda: torch.ops.loratools.merge_(w, ups, downs, scales), runs, device, stat=stat),
        "peft": timeit(peft, runs, device, stat=stat),
        "addmm": None,
    }
    if time_addmm == "all":
        row["addmm"] = timeit(addmm, runs, device, stat=stat)
    elif time_addmm == "once":
        row["addmm"] = timeit(addmm, 1, device, warmup=0)
    row["gbs"] = 2 * w.numel() * w.element_size() / 1e6  # MB moved; / ms = GB/s
    if device == "cuda":
        row["copy_graph"] = graph_time(lambda: dst.copy_(w), runs)
        row["op_graph"] = graph_time(lambda: torch.ops.loratools.merge_(w, ups, downs, scales), runs)
    return row


def addmm_mode(device, dtype, shape, n_adapters) -> str:
    if device == "cuda" or dtype == torch.float32:
        return "all"
    return "once" if shape == SHAPES[0] and n_adapters == 1 else "skip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4096x4096, rank 16 only")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per measurement")
    parser.add_argument("--stat", default="median", choices=["median", "min"],
                        help="min is steadier than median on a machine shared with other jobs")
    args = parser.parse_args()
    if not ops.HAVE_EXTENSION:
        raise SystemExit("loratools._C is not built: run `python setup.py build_ext --inplace` first")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")

    shapes, ranks = (SHAPES[:1], [16]) if args.quick else (SHAPES, RANKS)
    stat = statistics.median if args.stat == "median" else min
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"CPU, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    print(f"torch {torch.__version__}, {where}; {args.stat} of {args.runs} runs, times in ms")
    gpu = args.device == "cuda"
    head = f"{'shape':>11} {'rank':>4} {'n':>2} {'dtype':>5} {'copy':>8} {'op':>8} {'peft':>8} {'addmm':>9} {'op/copy':>7} {'peft/op':>7}"
    print(head + (f" {'copy GB/s':>9} {'op GB/s':>8} {'op/copy BW':>10} {'graph: copy us':>14} {'op us':>7} "
                  f"{'op GB/s':>8} {'op/copy BW':>10}" if gpu else ""))
    target = []  # op's share of the copy's bandwidth for bf16, rank 16, one adapter
    for shape in shapes:
        for rank in ranks:
            for n in ADAPTERS:
                for name, dtype in DTYPES.items():
                    mode = addmm_mode(args.device, dtype, shape, n)
                    r = bench_case(shape, rank, n, dtype, args.device, args.runs, mode, stat)
                    addmm = "-" if r["addmm"] is None else f"{r['addmm']:.2f}" + ("*" if mode == "once" else "")
                    line = (f"{shape[0]:>5}x{shape[1]:<5} {rank:>4} {n:>2} {name:>5} {r['copy']:>8.2f} {r['op']:>8.2f} "
                            f"{r['peft']:>8.2f} {addmm:>9} {r['op'] / r['copy']:>7.2f} {r['peft'] / r['op']:>7.2f}")
                    if gpu:
                        share = r["copy"] / r["op"]  # same bytes moved: the bandwidth ratio is the time ratio
                        line += f" {r['gbs'] / r['copy']:>9.0f} {r['gbs'] / r['op']:>8.0f} {share:>9.0%}"
                        cg, og = r["copy_graph"], r["op_graph"]
                        if cg and og:
                            line += f" {cg * 1e3:>14.1f} {og * 1e3:>7.1f} {r['gbs'] / og:>8.0f} {cg / og:>9.0%}"
                        if name == "bf16" and rank == 16 and n == 1:
                            target.append((shape, cg / og if cg and og else share, "graph" if cg and og else "host"))
                    print(line, flush=True)
    for shape, share, how in target:
        verdict = "meets" if share >= 0.70 else "misses"
        print(f"TARGET bf16 rank 16 {shape[0]}x{shape[1]}: merge_ at {share:.0%} of a device copy's bandwidth "
              f"({how}-timed; {verdict} the 70% target)")
    if args.device == "cpu":
        print("addmm: in-place W.addmm_ per adapter in W's dtype; '*' = a single run without warm-up "
              "(bf16/fp16 addmm_ is very slow on CPU), '-' = skipped for that reason")


if __name__ == "__main__":
    main()
