"""Tiny SD3 / SD3.5 pieces for the SD3 tests: a transformer with the real block structure (dual attention in
block 0, qk-norm, a pre-only last block), its original (Stability MMDiT) state dict built from our name table
(checked against diffusers' single-file converter), and random kohya LoRAs in the original names."""
from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from loratools.archs import sd3
from tests._dit import lora_factors

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
    """A kohya SD3 LoRA on every original module (or `names`; the patch embedding's conv too);
    `split_qkv`: block-diagonal B on qkv, as sd-scripts' split_qkv trains it."""
    g = torch.Generator().manual_seed(seed)
    shapes = weight_shapes(model)
    sd = {}
    for name, parts in original_modules(model).items():
        if names is not None and name not in names:
            continue
        rows, cols = sum(shapes[p][0] for p in parts), shapes[parts[0]][1]
        ln = "lora_unet_" + name.replace(".", "_")
        if len(shapes[parts[0]]) == 4:  # x_embedder.proj: LoCon down [r, in, kh, kw], up [out, r, 1, 1]
            down = torch.randn((rank,) + shapes[parts[0]][1:], generator=g) * 0.3
            up = torch.randn(rows, rank, 1, 1, generator=g) * 0.3
        else:
            down, up = lora_factors(g, rows, cols, rank, [rows // 3] * 3 if split_qkv and len(parts) > 1 else None)
        sd[ln + ".lora_down.weight"] = down.to(dtype)
        sd[ln + ".lora_up.weight"] = up.to(dtype)
        sd[ln + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    return sd


def components():
    """A tiny transformer, CLIP-L, CLIP-G and T5 (StableDiffusion3Pipeline's components)."""
    torch.manual_seed(3)
    clip = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                max_position_embeddings=16, projection_dim=12)
    return {"transformer": SD3Transformer2DModel(**TINY),
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**clip)).eval(),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**dict(clip, projection_dim=10))).eval(),
            "text_encoder_3": T5EncoderModel(T5Config(d_model=12, d_ff=24, d_kv=6, num_heads=2, num_layers=1,
                                                      vocab_size=100)).eval()}


def delta(sd: dict, ln: str, shape, absolute=False) -> torch.Tensor:
    """The dense ΔW of one kohya module in fp64: alpha/r · up @ down in the weight's shape (`absolute`:
    of |up| and |down|, the size of the summands that rounding errors scale with)."""
    down, up = sd[ln + ".lora_down.weight"].double(), sd[ln + ".lora_up.weight"].double()
    if absolute:
        down, up = down.abs(), up.abs()
    scale = float(sd[ln + ".alpha"]) / down.shape[0]
    return (scale * up.flatten(1) @ down.flatten(1)).reshape(shape)


def single_file(comps: dict, dtype=torch.float32) -> dict:
    """A Stability/ComfyUI-style single file: the transformer in original names under `model.diffusion_model.`,
    the three text encoders under `text_encoders.…transformer.`, and a VAE tensor that must be copied."""
    out = {"model.diffusion_model." + k: v for k, v in original_state_dict(comps["transformer"].state_dict()).items()}
    for comp, prefix in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")):
        out.update({f"text_encoders.{prefix}.transformer.{k}": v for k, v in comps[comp].state_dict().items()})
    out["first_stage_model.decoder.conv_in.weight"] = torch.linspace(-1, 1, 48).reshape(3, 4, 2, 2)
    return {k: v.detach().to(dtype).clone() for k, v in out.items()}

