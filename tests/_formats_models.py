"""Tiny diffusion models and PEFT LoRAs on them, built at test time (random weights, fixed seeds)."""
from __future__ import annotations

import os

import torch

UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
UNET_XL = dict(UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
               use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
               projection_class_embeddings_input_dim=8 * 6 + 32, cross_attention_dim=64)
CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
            max_position_embeddings=77, projection_dim=32)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def unet(seed=0, xl=False):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(**(UNET_XL if xl else UNET)).eval()


def text_encoder(seed=1, projection=False, hidden=32):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(**dict(CLIP, hidden_size=hidden))
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(cfg).eval()


def lora_config(targets, r=4, alpha=8, rank_pattern=None, alpha_pattern=None, **kw):
    from peft import LoraConfig
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                      rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, **kw)


def peft_pipeline_lora(folder, seed=0, xl=False, unet_alphas=None, te_alphas=None, **kw):
    """A PEFT LoRA on a tiny UNet + text encoder(s), saved as PEFT does (a folder per component).
    Returns {component: peft model} (the LoRA active) for reference outputs."""
    from peft import get_peft_model
    torch.manual_seed(seed + 100)
    models = {"unet": get_peft_model(unet(xl=xl), lora_config(
        UNET_TARGETS, rank_pattern={"attn2.to_k": 2},
        alpha_pattern={"to_v": 3, "conv1": 5.5} if unet_alphas is None else unet_alphas, **kw))}
    models["text_encoder"] = get_peft_model(text_encoder(), lora_config(
        TE_TARGETS, r=3, alpha=4, alpha_pattern={"fc1": 1.5} if te_alphas is None else te_alphas, **kw))
    if xl:
        models["text_encoder_2"] = get_peft_model(text_encoder(seed=2, projection=True, hidden=32), lora_config(
            TE_TARGETS, r=2, alpha=2, **kw))
    for comp, m in models.items():
        m.save_pretrained(os.path.join(folder, comp))
    return models


def save_pipeline(folder, xl=False):
    """The base models (no LoRA) as a diffusers pipeline folder: unet/, text_encoder/ …"""
    unet(xl=xl).save_pretrained(os.path.join(folder, "unet"))
    text_encoder().save_pretrained(os.path.join(folder, "text_encoder"))
    if xl:
        text_encoder(seed=2, projection=True).save_pretrained(os.path.join(folder, "text_encoder_2"))
    return folder


def pipeline(xl=False):
    """A diffusers pipeline of the tiny base models (no VAE, tokenizer or scheduler needed here)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    if xl:
        return StableDiffusionXLPipeline(vae=None, text_encoder=text_encoder(), text_encoder_2=text_encoder(seed=2, projection=True),
                                         tokenizer=None, tokenizer_2=None, unet=unet(xl=True), scheduler=DDIMScheduler())
    return StableDiffusionPipeline(vae=None, text_encoder=text_encoder(), tokenizer=None, unet=unet(),
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def unet_inputs(xl=False):
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    enc = torch.randn(1, 5, 64 if xl else 32, generator=g)
    kw = {}
    if xl:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    return (sample, torch.tensor([10]), enc), kw


@torch.no_grad()
def unet_out(model, xl=False):
    args, kw = unet_inputs(xl)
    return model(*args, **kw).sample


@torch.no_grad()
def te_out(model):
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    return model(ids).last_hidden_state


def peft_deltas(models):
    """{component.module: ΔW} from PEFT's own get_delta_weight (the oracle for our factors + scale)."""
    from loratools.archs import canonical
    out = {}
    for comp, pm in models.items():
        for name, mod in pm.base_model.model.named_modules():
            if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
                out[canonical(f"{comp}.{name}")] = mod.get_delta_weight("default").detach()
    return out
