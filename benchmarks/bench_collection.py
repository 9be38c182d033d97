"""A collection of 1,000 small kohya SD 1.x LoRAs: `loratools ls` and one batch `loratools convert
--to diffusers` over all of them, against one `loratools convert` process per file, in the same run.
Single invocations are measured on a sample (default 20) and extrapolated to all files (said so in
the output). Prints files per second.

    PYTHONPATH=. python benchmarks/bench_collection.py [--files 1000] [--sample 20] [--jobs 1]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from loratools.adapter import LoraAdapter, LoraModule
from loratools.formats import write_adapter

NAMES = [f"unet.down_blocks.0.attentions.0.transformer_blocks.0.{a}" for a in
         ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v")]
SHAPES = {"attn1.to_q": (320, 320), "attn1.to_k": (320, 320), "attn1.to_v": (320, 320),
          "attn2.to_q": (320, 320), "attn2.to_k": (320, 768), "attn2.to_v": (320, 768)}


def make(folder: str, n: int, rank: int = 4) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        mods = {}
        for name in NAMES:
            out, inp = SHAPES[name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]]
            mods[name] = LoraModule(name, (torch.randn(rank, inp, generator=g) * 0.1).half(),
                                    (torch.randn(out, rank, generator=g) * 0.1).half(), rank / 2)
        write_adapter(LoraAdapter(mods, format="kohya"), os.path.join(folder, f"lora_{i:04d}.safetensors"))


def cli(*args) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loratools", *map(str, args)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--sample", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "loras")
        os.makedirs(src)
        t = time.perf_counter()
        make(src, a.files)
        print(f"generated {a.files} kohya files in {time.perf_counter() - t:.1f} s")
        ls_s = cli("ls", src, "--format", "json")
        dup_s = cli("ls", src, "--duplicates", "--format", "json")
        batch_s = cli("convert", src, "--to", "diffusers", "-o", os.path.join(tmp, "out"), "--jobs", a.jobs)
        assert len(os.listdir(os.path.join(tmp, "out"))) == a.files
        files = sorted(os.listdir(src))[: a.sample]
        single = [cli("convert", os.path.join(src, f), "--to", "diffusers", "-o", os.path.join(tmp, "one_" + f))
                  for f in files]
        per = sum(single) / len(single)
        n = a.files
        print(f"ls ({n} files, one process):                 {ls_s:7.2f} s  {n / ls_s:8.1f} files/s")
        print(f"ls --duplicates:                              {dup_s:7.2f} s  {n / dup_s:8.1f} files/s")
        print(f"convert, one batch process (--jobs {a.jobs}):       {batch_s:7.2f} s  {n / batch_s:8.1f} files/s")
        print(f"convert, one process per file: {per:.2f} s each (mean of {len(single)} measured runs), "
              f"extrapolated to {n} files: {per * n:7.1f} s  {1 / per:8.2f} files/s")
        print(f"batch convert is {per * n / batch_s:.0f}x faster than single invocations")


if __name__ == "__main__":
    main()
