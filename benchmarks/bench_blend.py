"""Wall time, peak memory and error of `loratools blend` next to PEFT's add_weighted_adapter.

The ~1 GB bf16 Llama-style model of the merge benchmark and three PEFT adapters of ranks 8, 16
and 32 on every linear are generated once (random weights) under --workdir. Blend: weights
0.5/0.3/0.2, `--method svd --rank 16`. PEFT runs the way users run it: load the base with
transformers, load the three adapters, add_weighted_adapter(combination_type="svd"), save. Each
contender runs in its own child process, timed from its start (interpreter and imports included)
with its peak RSS from os.wait4. The error of each result against the exact weighted sum is
computed from the factors afterwards. Usage:

    python benchmarks/bench_blend.py [--workdir DIR] [--skip-peft] [--peft-layers N]
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
sys.path.insert(0, os.path.dirname(HERE))
GENERATE = f"import sys; sys.path.insert(0, {HERE!r}); from _models import make_llama, make_peft_adapter; "
RANKS, WEIGHTS, RANK = (8, 16, 32), (0.5, 0.3, 0.2), 16

# CPU torch has no bf16 SVD ("linalg_svd_cpu" not implemented for 'BFloat16'), so a user must load
# the base in fp32 for add_weighted_adapter(svd) to run at all.
PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, out, a, b, c = sys.argv[1:6]
weights = [float(x) for x in sys.argv[6:9]]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
pm = PeftModel.from_pretrained(model, a, adapter_name="a")
pm.load_adapter(b, adapter_name="b")
pm.load_adapter(c, adapter_name="c")
import time; t0 = time.perf_counter()
pm.add_weighted_adapter(["a", "b", "c"], weights, "mix", combination_type="svd", svd_rank=int(sys.argv[9]))
print("core", time.perf_counter() - t0)
pm.save_pretrained(out, selected_adapters=["mix"])
"""

# the library call alone (read, blend, write), to separate it from interpreter start and imports
OURS_SCRIPT = """
import sys, time
from loratools import blend
t0 = time.perf_counter()
blend(sys.argv[2:5], [float(x) for x in sys.argv[5:8]], method="svd", rank=int(sys.argv[8]), output=sys.argv[1])
print("core", time.perf_counter() - t0)
"""


def timed_child(cmd, core=None) -> tuple:
    """(seconds, peak RSS in MiB) of one child process; with `core` (a list), also collects the
    seconds the child printed as `core <s>`."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS
        elapsed = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{err.read().decode(errors='replace')[-2000:]}")
        if core is not None:
            core += [float(line.split()[1]) for line in out.read().decode().splitlines() if line.startswith("core ")]
    return elapsed, usage.ru_maxrss / 1024


def prepare(workdir: str, layers: int = 8) -> tuple:
    tag = "" if layers == 8 else f"-{layers}layers"
    base = os.path.join(workdir, "llama-1gb-bf16" + tag)
    if not os.path.exists(os.path.join(base, "config.json")):
        print(f"generating the base model in {base} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-c", GENERATE + f"make_llama(sys.argv[1], layers={layers})", base], check=True)
    adapters = []
    for i, r in enumerate(RANKS):
        path = os.path.join(workdir, f"blend-adapter-r{r}{tag}")
        if not os.path.exists(os.path.join(path, "adapter_config.json")):
            code = GENERATE + "make_peft_adapter(sys.argv[1], sys.argv[2], rank=int(sys.argv[3]), seed=int(sys.argv[4]))"
            subprocess.run([sys.executable, "-c", code, path, base, str(r), str(10 + i)], check=True)
        adapters.append(path)
    return base, adapters


def find_adapter(folder: str) -> str:
    for root, _, files in os.walk(folder):
        if "adapter_config.json" in files:
            return root
    raise SystemExit(f"no adapter written under {folder}")


def errors_vs_exact(adapters, output) -> tuple:
    """(relative error of `output` against Σ w_i s_i B_i A_i, the optimal rank-16 relative error)."""
    from loratools import read_adapter
    from loratools.blending import _gram_norm, _Source, _target
    from loratools.linalg import lowrank_svd

    inputs = [read_adapter(a) for a in adapters]
    out = read_adapter(output)
    t2 = e2 = opt2 = 0.0
    for name, m in out.modules.items():
        tu, td = _target([_Source(a.modules[name], w) for a, w in zip(inputs, WEIGHTS) if name in a.modules])
        up, down = m.factors_2d()
        up = up.float() * m.scale
        t2 += _gram_norm([tu], [td]) ** 2
        e2 += _gram_norm([up, -tu], [down.float(), td]) ** 2
        s = lowrank_svd(tu, td)[1].double()
        opt2 += float((s[RANK:] ** 2).sum())
    return (e2 / t2) ** 0.5, (opt2 / t2) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "loratools-bench"))
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--peft-layers", type=int, default=None,
                    help="time PEFT on a model with only N layers and extrapolate its time linearly (marked)")
    args = ap.parse_args()

    base, adapters = prepare(args.workdir)
    py = sys.executable
    specs = [f"{a}:{w}" for a, w in zip(adapters, WEIGHTS)]
    out_svd, out_ties, out_peft = (os.path.join(args.workdir, n) for n in ("blend-svd", "blend-ties", "blend-peft"))
    for p in (out_svd, out_svd + "-fp32", out_svd + "-api", out_ties, out_peft):
        shutil.rmtree(p, ignore_errors=True)
    timed_child([py, "-c", "import torch"])  # warm the interpreter and the page cache of torch
    rows = []
    rows.append(("loratools blend --method svd --rank 16",) + timed_child(
        [py, "-m", "loratools", "blend", *specs, "--method", "svd", "--rank", str(RANK), "-o", out_svd, "-q"]))
    rows.append(("loratools blend --method svd --rank 16 --dtype fp32",) + timed_child(
        [py, "-m", "loratools", "blend", *specs, "--method", "svd", "--rank", str(RANK), "--dtype", "fp32",
         "-o", out_svd + "-fp32", "-q"]))
    ours_core: list = []
    timed_child([py, "-c", OURS_SCRIPT, out_svd + "-api", *adapters, *map(str, WEIGHTS), str(RANK)], ours_core)
    rows.append(("loratools blend --method ties --density 0.5",) + timed_child(
        [py, "-m", "loratools", "blend", *specs, "--method", "ties", "--density", "0.5", "--rank", str(RANK),
         "-o", out_ties, "-q"]))
    peft = None
    if not args.skip_peft:
        if args.peft_layers:
            pbase, padapters = prepare(args.workdir, args.peft_layers)
        else:
            pbase, padapters = base, adapters
        peft_core: list = []
        t, rss = timed_child([py, "-c", PEFT_SCRIPT, pbase, out_peft, *padapters, *map(str, WEIGHTS), str(RANK)],
                             peft_core)
        label = "PEFT add_weighted_adapter(svd) + save"
        if args.peft_layers:
            t *= 8 / args.peft_layers
            label += f" [EXTRAPOLATED from {args.peft_layers} layers]"
        peft = (label, t, rss)
        rows.append(peft)

    print(f"model: 1 GB bf16 Llama-style (8 layers, hidden 2048); adapters of ranks {RANKS} on every linear, "
          f"weights {WEIGHTS}; {os.cpu_count()} CPUs")
    print(f"{'contender':62s} {'wall s':>8s} {'peak RSS MiB':>13s}")
    for name, t, rss in rows:
        print(f"{name:62s} {t:8.2f} {rss:13.0f}")
    ours_err, optimal = errors_vs_exact(adapters, out_svd)
    ours32, _ = errors_vs_exact(adapters, out_svd + "-fp32")
    print(f"relative error vs the exact weighted sum: optimal rank-16 {optimal:.7f}, loratools svd {ours_err:.7f} "
          f"(bf16 output, the inputs' dtype), {ours32:.7f} (fp32 output)")
    if peft is not None:
        if not args.peft_layers:
            peft_err, _ = errors_vs_exact(adapters, find_adapter(out_peft))
            print(f"relative error vs the exact weighted sum: PEFT svd {peft_err:.7f} (fp32 output)")
        print(f"PEFT / loratools svd: {peft[1] / rows[0][1]:.1f}x the time, {peft[2] / rows[0][2]:.1f}x the peak memory; "
              f"PEFT / loratools svd fp32: {peft[1] / rows[1][1]:.1f}x the time, {peft[2] / rows[1][2]:.1f}x the memory"
              + (" (time extrapolated, memory of the smaller model)" if args.peft_layers else ""))
        if not args.peft_layers:
            print(f"computation alone: loratools blend() (read + blend + write) {ours_core[0]:.2f} s, PEFT "
                  f"add_weighted_adapter {peft_core[0]:.1f} s: {peft_core[0] / ours_core[0]:.0f}x")


if __name__ == "__main__":
    main()
