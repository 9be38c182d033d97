"""Convert an SDXL-sized kohya LoRA (SGM names, every attention / ff / proj linear of the UNet and both
text encoders, from the shipped manifest) to diffusers, against diffusers' own conversion
(`StableDiffusionXLPipeline.lora_state_dict` with the UNet config + `safetensors.torch.save_file`),
measured in the same run. Prints seconds and the ratio.

    PYTHONPATH=. python benchmarks/bench_convert.py [--rank 32] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import safetensors.torch
import torch

from loratools.archs import load_manifest
from loratools.archs.generate import UNET_SDXL, build_meta
from loratools.formats import read_adapter, write_adapter

LINEAR_PARTS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def make_kohya(path: str, rank: int) -> int:
    m = load_manifest("sdxl")
    sgm = {v: k for k, v in m["ldm"]["unet"].items()}
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    g = torch.Generator().manual_seed(0)
    sd = {}
    for comp, shapes in m["components"].items():
        for name, shape in shapes.items():
            if len(shape) != 2 or not name.endswith(LINEAR_PARTS):
                continue
            flat = prefix[comp] + (sgm.get(name, name) if comp == "unet" else name).replace(".", "_")
            sd[f"{flat}.lora_down.weight"] = (torch.randn(rank, shape[1], generator=g) * 0.01).half()
            sd[f"{flat}.lora_up.weight"] = (torch.randn(shape[0], rank, generator=g) * 0.01).half()
            sd[f"{flat}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    safetensors.torch.save_file(sd, path)
    return len(sd) // 3


def ours(src: str, dst: str) -> None:
    write_adapter(read_adapter(src), dst, format="diffusers", overwrite=True)


def peer(src: str, dst: str, unet_config) -> None:
    from diffusers import StableDiffusionXLPipeline
    state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(src, unet_config=unet_config)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, dst)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    unet_config = build_meta("UNet2DConditionModel", UNET_SDXL).config
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "kohya.safetensors")
        n = make_kohya(src, args.rank)
        size = os.path.getsize(src) / 2**20
        t_ours = best(lambda: ours(src, os.path.join(d, "ours.safetensors")), args.repeat)
        t_peer = best(lambda: peer(src, os.path.join(d, "peer.safetensors"), unet_config), args.repeat)
        print(f"SDXL kohya LoRA: {n} modules, rank {args.rank}, fp16, {size:.0f} MiB")
        print(f"loratools kohya->diffusers (exact names, per-module alphas kept): {t_ours:.3f} s")
        print(f"diffusers lora_state_dict + save_file (peer):                    {t_peer:.3f} s")
        print(f"ratio peer/loratools: {t_peer / t_ours:.2f}x")


if __name__ == "__main__":
    main()
