"""Generated models and adapters for the benchmarks (random weights, fixed seeds, no downloads).

The base is written straight to safetensors shards, tensor by tensor, in the layout
`transformers` uses for Llama, so generating it needs no more memory than one tensor.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from loratools import safetensors_io

LLAMA_1GB = dict(hidden=2048, intermediate=5632, layers=8, vocab=32000, heads=16, kv_heads=4)
LLAMA_8B = dict(hidden=4096, intermediate=14336, layers=32, vocab=128256, heads=32, kv_heads=8)  # ~16 GB in bf16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_shapes(hidden, intermediate, layers, vocab, heads, kv_heads) -> List[Tuple[str, Tuple[int, ...]]]:
    kv = hidden // heads * kv_heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (hidden, hidden)),
                   (p + "self_attn.k_proj.weight", (kv, hidden)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                   (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def make_llama(folder: str, dtype=torch.bfloat16, shard_bytes: int = 300 * 2**20, seed: int = 0,
               **size) -> str:
    """Write a random Llama-style checkpoint (config.json, sharded safetensors + index)."""
    cfg = dict(LLAMA_1GB, **size)
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(**cfg)
    shards: List[List[Tuple[str, Tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in shapes:
        n = safetensors_io.nbytes(dtype, shape)
        if used and used + n > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += n
    weight_map: Dict[str, str] = {}
    total = 0
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = safetensors_io.StreamingWriter(os.path.join(folder, fname), [(n, dtype, s) for n, s in group], {"format": "pt"})
        for name, shape in group:
            t = torch.randn(shape, generator=gen).mul_(0.02).to(dtype)
            w.write(name, t)
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        w.close()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg["hidden"],
              "intermediate_size": cfg["intermediate"], "num_hidden_layers": cfg["layers"],
              "num_attention_heads": cfg["heads"], "num_key_value_heads": cfg["kv_heads"],
              "vocab_size": cfg["vocab"], "torch_dtype": str(dtype).split(".")[-1], "tie_word_embeddings": False,
              "rms_norm_eps": 1e-5, "max_position_embeddings": 2048}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder


def make_peft_adapter(folder: str, base: str, rank: int, alpha: Optional[float] = None, seed: int = 1,
                      targets=TARGETS, dtype=torch.bfloat16) -> str:
    """A random PEFT adapter for every target linear of the base at `base` (read from its headers)."""
    from loratools.checkpoint import Checkpoint

    ckpt = Checkpoint(base)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ckpt.infos:
        mod = name[: -len(".weight")]
        if name.endswith(".weight") and mod.split(".")[-1] in targets:
            out, inp = ckpt.shape(name)
            tensors[f"base_model.model.{mod}.lora_A.weight"] = (torch.randn(rank, inp, generator=gen) / inp ** 0.5).to(dtype)
            tensors[f"base_model.model.{mod}.lora_B.weight"] = (torch.randn(out, rank, generator=gen) * 0.01).to(dtype)
    os.makedirs(folder, exist_ok=True)
    safetensors_io.save(os.path.join(folder, "adapter_model.safetensors"), tensors, {"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha if alpha is not None else 2 * rank,
              "target_modules": list(targets), "task_type": "CAUSAL_LM", "bias": "none",
              "base_model_name_or_path": base, "init_lora_weights": True}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder
