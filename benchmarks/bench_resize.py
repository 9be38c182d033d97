"""`loratools resize` and `extract` next to kohya's algorithms, measured in the same run.

resize: an SDXL-sized LoRA (the SDXL UNet's and both text encoders' linear and conv shapes, as
kohya's networks/lora.py targets them with conv_dim; rank 64; random factors with a decaying
spectrum), built in memory, resized to rank 16 and with sv_fro 0.9. The peer is kohya's
networks/resize_lora.py algorithm with svd_lowrank off: dense `up @ down`, then a full
`torch.linalg.svd`. Its cost depends only on a module's shape and takes hours for the whole
LoRA on a small CPU, so by default it runs on --kohya-per-shape modules of every distinct shape
and its total is the per-shape mean times the shape's count (printed as an estimate). The ratio on
exactly the sampled modules (ours timed on the same ones) is printed too, with the retained
Frobenius norms of both side by side.

extract: the ~1 GB bf16 Llama-style model of the merge benchmark and a fine-tune of it (the
rank-16 adapter merged in, in bf16, so the difference is rank 16 plus rounding noise). Each
contender runs in a child process (time and peak RSS alone). The peer is a dense full-SVD
extraction as kohya's extract_lora_from_models.py does it: both state dicts loaded, then a full
`torch.linalg.svd` of every difference; it runs on --dense-layers decoder layers, ours on the
same layers and on the whole model. Usage:

    python benchmarks/bench_resize.py [--part resize|extract|all] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def sdxl_lora_shapes():
    """(name, kind, out, in, kernel) of every module an SDXL LoRA with conv_dim has."""
    mods = []

    def lin(name, out, inp):
        mods.append((name, "linear", out, inp, 1))

    def transformer(p, c, depth):
        lin(p + ".proj_in", c, c), lin(p + ".proj_out", c, c)
        for d in range(depth):
            b = f"{p}.transformer_blocks.{d}"
            for a in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"):
                lin(f"{b}.{a}", c, c)
            lin(b + ".attn2.to_k", c, 2048), lin(b + ".attn2.to_v", c, 2048)
            lin(b + ".ff.net.0.proj", 8 * c, c), lin(b + ".ff.net.2", c, 4 * c)

    def resnet(p, cin, cout):
        mods.append((p + ".conv1", "conv", cout, cin, 3))
        mods.append((p + ".conv2", "conv", cout, cout, 3))
        lin(p + ".time_emb_proj", cout, 1280)
        if cin != cout:
            mods.append((p + ".conv_shortcut", "conv", cout, cin, 1))

    ch, depth = (320, 640, 1280), (0, 2, 10)
    prev = 320
    for i in range(3):
        for j in range(2):
            resnet(f"unet.down_blocks.{i}.resnets.{j}", prev if j == 0 else ch[i], ch[i])
            if depth[i]:
                transformer(f"unet.down_blocks.{i}.attentions.{j}", ch[i], depth[i])
        prev = ch[i]
        if i < 2:
            mods.append((f"unet.down_blocks.{i}.downsamplers.0.conv", "conv", ch[i], ch[i], 3))
    for j in range(2):
        resnet(f"unet.mid_block.resnets.{j}", 1280, 1280)
    transformer("unet.mid_block.attentions.0", 1280, 10)
    skips = [320, 320, 320, 320, 640, 640, 640, 1280, 1280]  # the down path's outputs, popped in reverse
    prev = 1280
    for i, (c, d) in enumerate(((1280, 10), (640, 2), (320, 0))):
        for j in range(3):
            resnet(f"unet.up_blocks.{i}.resnets.{j}", prev + skips.pop(), c)
            prev = c
            if d:
                transformer(f"unet.up_blocks.{i}.attentions.{j}", c, d)
        if i < 2:
            mods.append((f"unet.up_blocks.{i}.upsamplers.0.conv", "conv", c, c, 3))
    for te, layers, d in (("te1", 12, 768), ("te2", 32, 1280)):
        for i in range(layers):
            p = f"{te}.text_model.encoder.layers.{i}"
            for a in ("q_proj", "k_proj", "v_proj", "out_proj"):
                lin(f"{p}.self_attn.{a}", d, d)
            lin(p + ".mlp.fc1", 4 * d, d), lin(p + ".mlp.fc2", d, 4 * d)
    return mods


def sdxl_lora(rank=64, seed=0):
    from loratools.adapter import LoraAdapter, LoraModule

    g = torch.Generator().manual_seed(seed)
    adapter = LoraAdapter(format="kohya")
    for i, (name, kind, out, inp, k) in enumerate(sdxl_lora_shapes()):
        decay = torch.exp(-torch.arange(float(rank)) / (4 + i % 13))  # trained LoRAs' spectra decay
        down = torch.randn(rank, inp * k * k, generator=g) / (inp * k * k) ** 0.5
        up = torch.randn(out, rank, generator=g) * decay * 0.05
        if kind == "conv":
            down, up = down.reshape(rank, inp, k, k), up.reshape(out, rank, 1, 1)
        adapter.add(LoraModule(name, down.half(), up.half(), alpha=rank / 2, kind=kind))
    return adapter


def kohya_resize_module(m, configs):
    """networks/resize_lora.py (svd_lowrank off): dense product, full SVD, then its rank rules.
    The SVD does not depend on the rule, so one serves every (rank, rule, param) in `configs`."""
    up, down = m.up.float().flatten(1), m.down.float().flatten(1)
    weight = up @ down
    U, S, Vh = torch.linalg.svd(weight)
    out = []
    for rank, dynamic, param in configs:
        if dynamic == "sv_fro":
            cum = torch.cumsum(S.pow(2), 0) / float(S.pow(2).sum())
            new_rank = max(0, min(int(torch.searchsorted(cum, param ** 2)), len(S) - 1)) + 1
        else:
            new_rank = rank
        new_rank = 1 if S[0] <= 1e-6 else min(new_rank, rank)
        fro = float(S[:new_rank].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())
        _ = (U[:, :new_rank] @ torch.diag(S[:new_rank]), Vh[:new_rank])
        out.append((new_rank, fro))
    return out


def bench_resize(args):
    from loratools.resizing import resize_module

    adapter = sdxl_lora()
    mods = list(adapter)
    by_shape = defaultdict(list)
    for m in mods:
        by_shape[tuple(m.up.flatten(1).shape[:1]) + tuple(m.down.flatten(1).shape[1:])].append(m)
    print(f"SDXL-sized LoRA: {len(mods)} modules, rank 64, {adapter.num_parameters() / 1e6:.0f}M parameters (fp16), "
          f"{len(by_shape)} distinct shapes; torch threads {torch.get_num_threads()}", flush=True)
    configs = {"rank 16": (16, None, None), "sv_fro 0.9 (cap 64)": (64, "sv_fro", 0.9)}
    ours, ours_total = {}, {}
    for label, (rank, dynamic, param) in configs.items():
        t0 = time.perf_counter()
        for m in mods:
            t = time.perf_counter()
            _, rep = resize_module(m, rank, dynamic, param)
            ours[label, m.name] = (time.perf_counter() - t, rep.new_rank, rep.fro_retained)
        ours_total[label] = time.perf_counter() - t0
        print(f"loratools, {label}: {ours_total[label]:.2f} s for all {len(mods)} modules", flush=True)
    kohya, kohya_est, sampled = {}, 0.0, []
    for shape, group in by_shape.items():
        times = []
        for m in group[: args.kohya_per_shape]:
            t = time.perf_counter()
            kohya[m.name] = kohya_resize_module(m, list(configs.values()))
            times.append(time.perf_counter() - t)
            sampled.append((m.name, times[-1]))
        kohya_est += sum(times) / len(times) * len(group)
        print(f"  kohya {shape}: {times[-1]:.2f} s x {len(group)} modules", flush=True)
    kohya_sample = sum(t for _, t in sampled)
    for i, label in enumerate(configs):
        ours_sample = sum(ours[label, n][0] for n, _ in sampled)
        worst = max(abs(kohya[n][i][1] - ours[label, n][2]) for n, _ in sampled)
        same = all(kohya[n][i][0] == ours[label, n][1] for n, _ in sampled)
        avg = sum(ours[label, m.name][2] for m in mods) / len(mods)
        print(f"\nresize to {label}:")
        print(f"  loratools (QR trick), all {len(mods)} modules: {ours_total[label]:9.2f} s   "
              f"average fro retained {avg:.6f}")
        print(f"  kohya (dense + full SVD), {len(sampled)} sampled modules, one per shape: {kohya_sample:9.2f} s   "
              f"loratools on the same modules: {ours_sample:.3f} s  -> {kohya_sample / ours_sample:6.0f}x")
        print(f"  kohya estimated for all {len(mods)} modules (per-shape time x count): {kohya_est:9.1f} s   "
              f"-> {kohya_est / ours_total[label]:6.0f}x")
        print(f"  retained Frobenius norm, kohya vs loratools (sampled modules): max |diff| {worst:.1e}; "
              f"same ranks: {same}", flush=True)


DENSE_EXTRACT = r"""
import sys, json, time, torch
from safetensors.torch import load_file
from loratools.checkpoint import Checkpoint
base, tuned, layers, rank = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
def load_all(path):
    ck = Checkpoint(path)
    sd = {}
    for shard in ck.shards:
        sd.update({k: v.clone() for k, v in load_file(ck.folder + "/" + shard).items()})  # in RAM, not mmap
    return sd
a, b = load_all(base), load_all(tuned)  # both models in memory, as kohya's script loads them
errs = {}
for name in a:
    parts = name.split(".")
    if len(parts) < 4 or parts[1] != "layers" or int(parts[2]) >= layers or a[name].dim() != 2:
        continue
    diff = b[name].float() - a[name].float()
    U, S, Vh = torch.linalg.svd(diff)
    approx = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    errs[name[:-7]] = float((diff - approx).norm() / diff.norm())
print(json.dumps({"seconds": time.perf_counter() - t0, "errors": errs}))
"""

OURS_EXTRACT = r"""
import sys, json, time, torch
from loratools.extraction import extract
base, tuned, layers, rank, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
t0 = time.perf_counter()
inc = [r"^model\.layers\.(%s)\." % "|".join(map(str, range(layers)))] if layers >= 0 else None
res = extract(base, tuned, out, rank=rank, include=inc, overwrite=True)
errs = {m.name: max(0.0, 1 - m.fro_retained ** 2) ** 0.5 for m in res.modules}
print(json.dumps({"seconds": time.perf_counter() - t0, "errors": errs, "methods": sorted(set(res.methods.values()))}))
"""


def child(script, *argv):
    """(result json, peak RSS MiB) of a script run alone in a child process."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(proc.stderr.read().decode(errors="replace")[-2000:])
    return json.loads(out), usage.ru_maxrss / 1024


def bench_extract(args):
    base = os.path.join(args.workdir, "llama-1gb-bf16")
    adapter = os.path.join(args.workdir, "adapter-r16")
    tuned = os.path.join(args.workdir, "llama-1gb-bf16-tuned-r16")
    gen = f"import sys; sys.path.insert(0, {HERE!r}); from _models import make_llama, make_peft_adapter; "
    if not os.path.exists(os.path.join(base, "config.json")):
        subprocess.run([sys.executable, "-c", gen + f"make_llama({base!r})"], check=True)
    if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        subprocess.run([sys.executable, "-c", gen + f"make_peft_adapter({adapter!r}, {base!r}, 16)"], check=True)
    if not os.path.exists(os.path.join(tuned, "config.json")):
        env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), PYTHONWARNINGS="ignore")
        subprocess.run([sys.executable, "-m", "loratools", "merge", base, adapter, "-o", tuned, "-q"], check=True, env=env)
    out = os.path.join(args.workdir, "extracted-r16")
    layers = args.dense_layers
    dense, dense_mem = child(DENSE_EXTRACT, base, tuned, layers, args.rank)
    same, same_mem = child(OURS_EXTRACT, base, tuned, layers, args.rank, out)
    full, full_mem = child(OURS_EXTRACT, base, tuned, -1, args.rank, out)
    worst = max(abs(same["errors"][k] - v) for k, v in dense["errors"].items())
    rel = max(same["errors"][k] / v if v > 0 else 1.0 for k, v in dense["errors"].items())
    n = len(dense["errors"])
    print(f"\nextract rank {args.rank} from the ~1 GB bf16 model (8 layers x 7 linears; fine-tune = rank-16 adapter merged):")
    print(f"  dense full-SVD extraction, {n} weights ({layers} layer(s)): {dense['seconds']:8.1f} s  peak RSS {dense_mem:7.0f} MiB")
    print(f"  loratools extract, the same {n} weights ({'/'.join(same['methods'])} SVD):  {same['seconds']:8.1f} s  "
          f"peak RSS {same_mem:7.0f} MiB  -> {dense['seconds'] / same['seconds']:.1f}x faster, "
          f"{dense_mem / same_mem:.1f}x less memory")
    print(f"  loratools extract, whole model ({len(full['errors'])} weights):    {full['seconds']:8.1f} s  peak RSS {full_mem:7.0f} MiB"
          f"  (dense, scaled by weights: ~{dense['seconds'] * len(full['errors']) / n:.0f} s)")
    print(f"  relative error ||ΔW - LoRA|| / ||ΔW||: max |loratools - dense| {worst:.2e}; worst ratio {rel:.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["resize", "extract", "all"], default="all")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "loratools-bench"))
    ap.add_argument("--kohya-per-shape", type=int, default=1, help="kohya runs on this many modules of each shape")
    ap.add_argument("--dense-layers", type=int, default=1, help="decoder layers the dense extraction runs on")
    ap.add_argument("--rank", type=int, default=16, help="extraction rank")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every contender (1: on a shared, oversubscribed machine OpenMP "
                         "barriers dominate small ops and make timings meaningless)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # for the children
    if args.part in ("resize", "all"):
        bench_resize(args)
    if args.part in ("extract", "all"):
        bench_extract(args)


if __name__ == "__main__":
    main()
