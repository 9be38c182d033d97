"""Tiny SD3 / SD3.5 pieces for the SD3 tests: a transformer with the real block structure (dual attention in
block 0, qk-norm, a pre-only last block), its original (Stability MMDiT) state dict built from our name table
(checked against diffusers' single-file converter), and random kohya LoRAs in the original names."""
from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

from loratools.archs import sd3

TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
            pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
_NORMS = {"x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
          "context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k",
          "x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k"}


def transformer(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TINY).to(dtype).eval()


def weight_shapes(model) -> dict:
    return {n[: -len(".weight")]: tuple(p.shape) for n, p in model.named_parameters() if n.endswith(".weight")}


def original_modules(model) -> dict:
    """Original module name -> its diffusers parts, for every module of `model` the table maps."""
    return sd3.LAYOUT.original_names(n for n, p in weight_shapes(model).items() if len(p) >= 2)


def original_state_dict(sd: dict) -> dict:
    """Stability's layout of a diffusers SD3 transformer state dict: fused rows, swapped 2-chunk adaLNs."""
    names = sd3.LAYOUT.original_names(k[: -len(".weight")] for k in sd if k.endswith(".weight"))
    out = {}
    for name, parts in names.items():
        fused = sd3.LAYOUT.lookup(name)
        for param in ("weight", "bias"):
            t = torch.cat([sd[f"{p}.{param}"] for p in parts])
            if fused.swaps(t.shape[0], sd[f"{parts[0]}.weight"].shape[1]):
                h = t.shape[0] // 2
                t = torch.cat([t[h:], t[:h]])
            out[f"{name}.{param}"] = t
    for key, t in sd.items():
        i, _, leaf = key[len("transformer_blocks."):].partition(".")
        norm = next((o for o, d in _NORMS.items() if leaf == d + ".weight"), None)
        if key.startswith("transformer_blocks.") and norm:
            out[f"joint_blocks.{i}.{norm}.weight"] = t
    out["pos_embed"] = sd["pos_embed.pos_embed"]
    return out


def diffusers_from_original(sd: dict) -> dict:
    """diffusers' own single-file converter (no full-size constants in it)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    return convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in sd.items()})


def kohya_lora(model, rank=4, alpha=6.0, seed=1, dtype=torch.float32, names=None, split_qkv=False) -> dict:
    """A kohya SD3 LoRA on every original linear module (or `names`); `split_qkv`: block-diagonal B on qkv."""
    g = torch.Generator().manual_seed(seed)
    shapes = weight_shapes(model)
    sd = {}
    for name, parts in original_modules(model).items():
        if (names is not None and name not in names) or len(shapes[parts[0]]) != 2:
            continue
        rows, cols = sum(shapes[p][0] for p in parts), shapes[parts[0]][1]
        ln = "lora_unet_" + name.replace(".", "_")
        if split_qkv and len(parts) > 1:
            down = torch.randn(rank * 3, cols, generator=g) * 0.3
            up = torch.zeros(rows, rank * 3)
            for j in range(3):
                s = rows // 3
                up[j * s:(j + 1) * s, j * rank:(j + 1) * rank] = torch.randn(s, rank, generator=g) * 0.3
        else:
            down = torch.randn(rank, cols, generator=g) * 0.3
            up = torch.randn(rows, rank, generator=g) * 0.3
        sd[ln + ".lora_down.weight"] = down.to(dtype)
        sd[ln + ".lora_up.weight"] = up.to(dtype)
        sd[ln + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    return sd
