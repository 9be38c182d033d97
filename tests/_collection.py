"""A generated collection of adapters for the `ls` / `compat` / batch tests and the benchmark:
mixed formats (kohya, diffusers, PEFT, LyCORIS) and families (SD 1.x, SDXL, Flux, a Llama PEFT
adapter), a DoRA adapter, a corrupt file and a duplicate (same tensors, other metadata)."""
from __future__ import annotations

import os
import shutil

import torch

from loratools import safetensors_io
from loratools.adapter import LoraAdapter, LoraModule
from loratools.formats import write_adapter

SD1_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # reads CLIP-L's 768
SD1_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
SDXL_TE2 = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
FLUX_Q = "transformer.single_transformer_blocks.0.attn.to_q"
LLAMA_Q = "model.layers.0.self_attn.q_proj"
LLAMA_V = "model.layers.0.self_attn.v_proj"


def module(name, out, inp, rank, alpha=None, seed=0, dtype=torch.float16, dora=False):
    g = torch.Generator().manual_seed(seed)
    return LoraModule(name, (torch.randn(rank, inp, generator=g) * 0.1).to(dtype),
                      (torch.randn(out, rank, generator=g) * 0.1).to(dtype), alpha,
                      magnitude=torch.rand(out, generator=g).to(dtype) + 0.5 if dora else None)


def adapter(fmt, mods, base=None, metadata=None):
    return LoraAdapter({m.name: m for m in mods}, format=fmt, base_model=base, metadata=dict(metadata or {}))


def sd1_kohya(path, seed=0, rank=4):
    mods = [module(SD1_K, 320, 768, rank, rank / 2, seed), module(SD1_Q, 320, 320, rank, rank / 2, seed + 1)]
    return write_adapter(adapter("kohya", mods), path, metadata={"ss_sd_model_name": "v1-5-pruned.safetensors"})


def make_collection(root) -> dict:
    """Writes the collection under `root`; returns name -> path of each item."""
    root = str(root)
    paths = {}
    os.makedirs(os.path.join(root, "sd1", "deep"), exist_ok=True)
    os.makedirs(os.path.join(root, "xl"), exist_ok=True)
    paths["sd1"] = sd1_kohya(os.path.join(root, "sd1", "style.safetensors"), rank=8)
    # the duplicate: the same tensors in the same order, other metadata (a renamed, retagged copy)
    tensors, meta = safetensors_io.load(paths["sd1"])
    with safetensors_io.SafetensorsFile(paths["sd1"]) as f:
        order = f.keys()
    meta["ss_output_name"] = "copy"
    paths["dup"] = os.path.join(root, "sd1", "deep", "style_copy.safetensors")
    safetensors_io.save(paths["dup"], tensors, meta, order=order)
    paths["sd1_small"] = sd1_kohya(os.path.join(root, "sd1", "small.safetensors"), seed=5, rank=2)
    paths["sdxl"] = write_adapter(adapter("kohya", [module(SDXL_TE2, 1280, 1280, 16, 8.0, 2)]),
                                  os.path.join(root, "xl", "xl_te.safetensors"))
    paths["flux"] = write_adapter(adapter("diffusers", [module(FLUX_Q, 3072, 3072, 4, None, 3, torch.bfloat16)]),
                                  os.path.join(root, "flux_lora.safetensors"))
    llama = [module(LLAMA_Q, 64, 64, 8, 16.0, 4, torch.float32), module(LLAMA_V, 16, 64, 8, 16.0, 5, torch.float32)]
    paths["peft"] = write_adapter(adapter("peft", llama, base="meta-llama/Llama-3.2-1B"),
                                  os.path.join(root, "llm", "chat"))
    paths["dora"] = write_adapter(
        adapter("peft", [module(LLAMA_Q, 64, 64, 4, 8.0, 6, torch.float32, dora=True)], base="tiny/llama"),
        os.path.join(root, "llm", "dora"))
    paths["corrupt"] = os.path.join(root, "broken.safetensors")
    with open(paths["corrupt"], "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return paths


def copy_tree(src, dst):
    shutil.copytree(src, dst)
    return dst
