"""Tiny Flux.1 pieces for the Flux tests: a transformer with the real block structure, random LoRAs
in the kohya (BFL names) layout, and diffusers' kohya-Flux converter with its full-size constants
substituted for the tiny ones (it hard-codes 3072/12288 rows and 19/38 blocks)."""
from __future__ import annotations

import inspect
import textwrap

import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders import lora_conversion_utils as lcu

from tests._dit import lora_factors

DIM, HEADS, HEAD_DIM = 16, 2, 8
CONFIG = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=HEAD_DIM,
              num_attention_heads=HEADS, joint_attention_dim=16, pooled_projection_dim=12, guidance_embeds=True,
              axes_dims_rope=[2, 2, 4])


def transformer(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**CONFIG).to(dtype).eval()


def weight_shapes(model) -> dict:
    return {n[: -len(".weight")]: tuple(p.shape) for n, p in model.named_parameters()
            if n.endswith(".weight") and p.dim() == 2}


def bfl_shapes(model) -> dict:
    """Original module name -> weight shape, from the diffusers shapes (fused rows summed)."""
    from loratools.archs import flux
    shapes = weight_shapes(model)
    out = {}
    for name, parts in flux.original_names(CONFIG["num_layers"], CONFIG["num_single_layers"], True).items():
        rows = sum(shapes[p][0] for p in parts)
        out[name] = (rows, shapes[parts[0]][1])
    return out


def kohya_lora(model, rank=4, alpha=6.0, seed=1, dtype=torch.float32, names=None, split_qkv=False) -> dict:
    """A kohya Flux LoRA on every original module (or `names`); `split_qkv`: block-diagonal B on fused ones."""
    from loratools.archs import flux
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (rows, cols) in bfl_shapes(model).items():
        if names is not None and name not in names:
            continue
        ln = "lora_unet_" + name.replace(".", "_")
        fused = flux.lookup(name)
        sizes = fused.sizes(rows, cols) if split_qkv and len(fused.parts) > 1 else None
        down, up = lora_factors(g, rows, cols, rank, sizes)
        sd[ln + ".lora_down.weight"] = down.to(dtype)
        sd[ln + ".lora_up.weight"] = up.to(dtype)
        sd[ln + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    return sd


def _patched_kohya_converter():
    src = textwrap.dedent(inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers))
    src = src.replace("dims=[3072, 3072, 3072, 12288]", f"dims=[{DIM}, {DIM}, {DIM}, {4 * DIM}]")
    ns = dict(vars(lcu))
    exec(compile(src, lcu.__file__, "exec"), ns)
    return ns["_convert_kohya_flux_lora_to_diffusers"]


def diffusers_kohya(sd: dict) -> dict:
    """diffusers' own reading of a kohya Flux state dict (alpha folded into A and B)."""
    return _patched_kohya_converter()({k: v.clone() for k, v in sd.items()})


_NORMS = {("double_blocks", "img_attn.norm.query_norm.scale"): "attn.norm_q.weight",
          ("double_blocks", "img_attn.norm.key_norm.scale"): "attn.norm_k.weight",
          ("double_blocks", "txt_attn.norm.query_norm.scale"): "attn.norm_added_q.weight",
          ("double_blocks", "txt_attn.norm.key_norm.scale"): "attn.norm_added_k.weight",
          ("single_blocks", "norm.query_norm.scale"): "attn.norm_q.weight",
          ("single_blocks", "norm.key_norm.scale"): "attn.norm_k.weight"}


def bfl_state_dict(sd: dict) -> dict:
    """The original (BFL) checkpoint of a diffusers Flux transformer state dict: fused rows, swapped
    final adaLN. Checked against diffusers' single-file converter in the tests."""
    from loratools.archs import flux
    out = {}
    for name, fused in ((n, flux.lookup(n)) for n in flux.original_names(CONFIG["num_layers"],
                                                                          CONFIG["num_single_layers"], True)):
        for param in ("weight", "bias"):
            t = torch.cat([sd[f"{p}.{param}"] for p in fused.parts])
            if fused.swap:
                h = t.shape[0] // 2
                t = torch.cat([t[h:], t[:h]])
            out[f"{name}.{param}"] = t
    for (blocks, leaf), diff in _NORMS.items():
        n = CONFIG["num_layers"] if blocks == "double_blocks" else CONFIG["num_single_layers"]
        prefix = "transformer_blocks" if blocks == "double_blocks" else "single_transformer_blocks"
        for i in range(n):
            out[f"{blocks}.{i}.{leaf}"] = sd[f"{prefix}.{i}.{diff}"]
    return out


def diffusers_from_bfl(sd: dict) -> dict:
    """diffusers' single-file converter (its inner_dim 3072 substituted)."""
    from diffusers.loaders import single_file_utils as sfu
    src = textwrap.dedent(inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers))
    src = src.replace("inner_dim = 3072", f"inner_dim = {DIM}")
    ns = dict(vars(sfu))
    exec(compile(src, sfu.__file__, "exec"), ns)
    return ns["convert_flux_transformer_checkpoint_to_diffusers"]({k: v.clone() for k, v in sd.items()})
