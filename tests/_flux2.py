"""A tiny FLUX.2 transformer, its single file in BFL's original layout, and random LoRAs in the layouts FLUX.2 LoRAs
are shared in (diffusers/PEFT, ai-toolkit's `diffusion_model.` + lora_A/B, kohya `lora_unet_` + alpha)."""
from __future__ import annotations

import copy

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

from loratools.archs import flux2
from tests._dit import lora_factors

TINY = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2))
# BFL's names of the non-linear weights (q/k norms): the single-file converter's table, inverted
_NORMS = {"attn.norm_q": ("img_attn.norm.query_norm", "norm.query_norm"),
          "attn.norm_k": ("img_attn.norm.key_norm", "norm.key_norm"),
          "attn.norm_added_q": ("txt_attn.norm.query_norm", None),
          "attn.norm_added_k": ("txt_attn.norm.key_norm", None)}
# the modules diffusers' kohya FLUX.2 converter maps (it drops the modulations, guidance and the final adaLN)
KOHYA_MAPPED = ("qkv", "proj", "mlp", "linear1", "linear2", "img_in", "txt_in", "time_in", "final_layer.linear")


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(**{**TINY, **kw}).eval()


def pipeline(model):
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=copy.deepcopy(model))


def original_modules(model):
    """BFL name -> its diffusers parts, for every linear weight of `model`."""
    names = [n[: -len(".weight")] for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() == 2]
    return flux2.LAYOUT.original_names(names)


def original_state_dict(model):
    """`model`'s weights as BFL's single file has them: q, k, v rows fused, the final adaLN's halves as
    [shift; scale], norms as `….scale`."""
    sd = model.state_dict()
    out = {}
    for name, parts in original_modules(model).items():
        w = torch.cat([sd[f"{p}.weight"] for p in parts])
        fused = flux2.LAYOUT.lookup(name)
        if fused.swaps(w.shape[0], w.shape[1]):
            w = torch.cat([w[w.shape[0] // 2:], w[: w.shape[0] // 2]])
        out[f"{name}.weight"] = w
    for key, v in sd.items():
        for diff, (double, single) in _NORMS.items():
            for block, orig, leaf in (("transformer_blocks", "double_blocks", double),
                                      ("single_transformer_blocks", "single_blocks", single)):
                head, _, rest = key.partition(".")
                idx, _, tail = rest.partition(".")
                if head == block and tail == f"{diff}.weight" and leaf:
                    out[f"{orig}.{idx}.{leaf}.scale"] = v
    return out


def original_lora(model, seed=1, rank=4, split_qkv=False, only=None):
    """{BFL name: (down, up)} of a random LoRA on every linear weight (`only`: names holding one of these)."""
    g = torch.Generator().manual_seed(seed)
    sd = original_state_dict(model)
    out = {}
    for name in sorted(original_modules(model)):
        if only and not any(o in name for o in only):
            continue
        rows, cols = sd[f"{name}.weight"].shape
        sizes = [rows // 3] * 3 if split_qkv and name.endswith(".qkv") else None
        out[name] = lora_factors(g, rows, cols, rank, sizes)
    return out


def alpha_of(i):
    return float(2 + 3 * (i % 3))


def file_layout(lora, kind):
    """The LoRA's tensors as `kind` stores them: `aitoolkit` (diffusion_model. + lora_A/B, no alpha: diffusers'
    FLUX.2 converter refuses `.alpha` keys there), `comfy` (diffusion_model. + lora_down/up + alpha) or `kohya`."""
    out = {}
    for i, (name, (down, up)) in enumerate(sorted(lora.items())):
        key = {"aitoolkit": f"diffusion_model.{name}", "comfy": f"diffusion_model.{name}",
               "kohya": "lora_unet_" + name.replace(".", "_")}[kind]
        a, b = (".lora_A.weight", ".lora_B.weight") if kind == "aitoolkit" else (".lora_down.weight",
                                                                                  ".lora_up.weight")
        out.update({key + a: down, key + b: up})
        if kind != "aitoolkit":
            out[key + ".alpha"] = torch.tensor(alpha_of(i))
    return out


def folded(m):
    """Our module's factors with its scale folded in as diffusers' kohya FLUX.2 converter folds alpha / rank."""
    down_s, up_s = m.scale, 1.0
    while down_s * 2 < up_s:
        down_s, up_s = down_s * 2, up_s / 2
    return m.down * down_s, m.up * up_s
