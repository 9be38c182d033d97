"""Generate the module-name manifests of the known diffusion architectures (SD 1.x/2.x/XL, Flux.1, SD3/3.5, Wan 2.x,
Qwen-Image, FLUX.2).

    python -m loratools.archs.generate            # rewrite loratools/archs/manifests/*.json.gz
    python -m loratools.archs.generate --check    # exit 1 if the shipped files differ

The public model configs are written below as literal dicts (from the `config.json` files of
runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and
stabilityai/stable-diffusion-xl-base-1.0); the models are instantiated on the meta device with
diffusers / transformers, so nothing is downloaded and no memory is allocated. A manifest lists,
per pipeline component, every weight of 2 or more dimensions (the ones a LoRA can target) with
its shape, plus the UNet's original (LDM / SGM) names of the same modules, which kohya uses for SDXL.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
from typing import Dict, List

from . import MANIFEST_DIR, canonical
from . import flux
from .ldm import ldm_unet_names, to_ldm

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
              num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
OPEN_CLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, projection_dim=512,
                   num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")
OPEN_CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
                      num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu")

UNET_SD1 = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
UNET_SD2 = dict(UNET_SD1, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                use_linear_projection=True, upcast_attention=True, dual_cross_attention=False)
UNET_SDXL = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4,
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True)

# black-forest-labs/FLUX.1-dev transformer/config.json and text_encoder_2/config.json (T5-v1.1-XXL)
FLUX_DEV = dict(attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
                num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768,
                axes_dims_rope=[16, 56, 56])
T5_XXL = dict(d_ff=10240, d_kv=64, d_model=4096, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False)

# stabilityai/stable-diffusion-3.5-medium and -large transformer/config.json (SD3-medium's names are 3.5-medium's
# without attn2); text encoders: CLIP-L, OpenCLIP-bigG with projection, T5-v1.1-XXL
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_LARGE = dict(SD35_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                  pos_embed_max_size=192, dual_attention_layers=())
_SD3_TEXT = {"text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
             "text_encoder_2": ("CLIPTextModelWithProjection", OPEN_CLIP_BIGG),
             "text_encoder_3": ("T5EncoderModel", T5_XXL)}

# Wan-AI/Wan2.1-T2V-14B-Diffusers and -1.3B-Diffusers transformer/config.json (Wan 2.2 A14B's two experts have
# the 14B names); the UMT5 text encoder is left out: Wan LoRAs train the transformer only
WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_1_3B = dict(WAN_14B, num_attention_heads=12, ffn_dim=8960, num_layers=30)

# Qwen/Qwen-Image transformer/config.json (the Edit, Edit-2509 and Edit-2511 transformers have the same modules);
# the Qwen2.5-VL text encoder is left out: Qwen-Image LoRAs train the transformer only
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))

# black-forest-labs/FLUX.2-dev transformer/config.json: diffusers' Flux2Transformer2DModel defaults are its values
# (8 double and 48 single blocks, 48 heads of 128, Mistral-3's 3 x 5120 = 15360 wide text states); the Mistral
# text encoder is left out: FLUX.2 LoRAs train the transformer only (diffusers' loader takes nothing else).
# FLUX.2 [klein] 4B / 9B (and their base models): the same names at other widths, no guidance embedder (the configs
# of diffusers' scripts/convert_flux2_to_diffusers.py; Qwen3-4B / -8B text states, 3 x 2560 / 3 x 4096 wide)
FLUX2_DEV = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                 num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
                 axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True)
FLUX2_KLEIN_4B = dict(FLUX2_DEV, num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                      guidance_embeds=False)
FLUX2_KLEIN_9B = dict(FLUX2_DEV, num_layers=8, num_single_layers=24, num_attention_heads=32,
                      joint_attention_dim=12288, guidance_embeds=False)

# arch -> component -> (class name, config)
ARCHS = {
    "sd1": {"unet": ("UNet2DConditionModel", UNET_SD1), "text_encoder": ("CLIPTextModel", CLIP_L)},
    "sd2": {"unet": ("UNet2DConditionModel", UNET_SD2), "text_encoder": ("CLIPTextModel", OPEN_CLIP_H)},
    "sdxl": {"unet": ("UNet2DConditionModel", UNET_SDXL), "text_encoder": ("CLIPTextModel", CLIP_L),
             "text_encoder_2": ("CLIPTextModelWithProjection", OPEN_CLIP_BIGG)},
    "flux": {"transformer": ("FluxTransformer2DModel", FLUX_DEV), "text_encoder": ("CLIPTextModel", CLIP_L),
             "text_encoder_2": ("T5EncoderModel", T5_XXL)},
    "sd3": {"transformer": ("SD3Transformer2DModel", SD35_MEDIUM), **_SD3_TEXT},
    "sd3.5-large": {"transformer": ("SD3Transformer2DModel", SD35_LARGE), **_SD3_TEXT},
    "wan": {"transformer": ("WanTransformer3DModel", WAN_14B)},
    "wan-1.3b": {"transformer": ("WanTransformer3DModel", WAN_1_3B)},
    "qwen-image": {"transformer": ("QwenImageTransformer2DModel", QWEN_IMAGE)},
    "flux2": {"transformer": ("Flux2Transformer2DModel", FLUX2_DEV)},
    "flux2-klein-4b": {"transformer": ("Flux2Transformer2DModel", FLUX2_KLEIN_4B)},
    "flux2-klein-9b": {"transformer": ("Flux2Transformer2DModel", FLUX2_KLEIN_9B)},
}


def build_meta(cls_name: str, config: dict):
    """Instantiate a component on the meta device (no weights allocated)."""
    import torch
    if cls_name.startswith(("UNet", "Flux", "SD3", "Wan", "QwenImage")):  # diffusers models; the rest: transformers.
        import diffusers
        with torch.device("meta"):
            return getattr(diffusers, cls_name)(**config)
    import transformers
    cfg = (transformers.T5Config if cls_name.startswith("T5") else transformers.CLIPTextConfig)(**config)
    with torch.device("meta"):
        return getattr(transformers, cls_name)(cfg)


def weight_shapes(model, comp: str) -> Dict[str, List[int]]:
    """`module name -> weight shape` for every weight a LoRA can target (2-D or more), with the
    canonical spelling of CLIP names whatever the installed transformers calls them."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith(".weight") and p.dim() >= 2:
            full = canonical(f"{comp}.{name[: -len('.weight')]}")
            out[full[len(comp) + 1:]] = list(p.shape)
    return dict(sorted(out.items()))


def build_manifest(arch: str) -> dict:
    components = {}
    sgm = {}
    for comp, (cls_name, config) in ARCHS[arch].items():
        model = build_meta(cls_name, config)
        shapes = weight_shapes(model, comp)
        components[comp] = shapes
        if cls_name.startswith("UNet"):
            table = ldm_unet_names(config)
            sgm[comp] = {to_ldm(n, table): n for n in shapes}
    out = {"arch": arch, "components": components, "ldm": sgm}
    if arch == "flux":  # BFL's module names (kohya, ComfyUI, single files) -> the diffusers modules they hold
        cfg = ARCHS[arch]["transformer"][1]
        out["original"] = {"transformer": flux.original_names(cfg["num_layers"], cfg["num_single_layers"],
                                                              cfg["guidance_embeds"])}
    return out


def encode(manifest: dict) -> bytes:
    """Deterministic gzip (no timestamp, no file name) so the check can compare bytes."""
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(raw)
    return buf.getvalue()


def manifest_path(arch: str) -> str:
    return os.path.join(MANIFEST_DIR, f"{arch}.json.gz")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the shipped files, write nothing")
    args = ap.parse_args(argv)
    stale = []
    for arch in ARCHS:
        data = encode(build_manifest(arch))
        path = manifest_path(arch)
        if args.check:
            try:
                with open(path, "rb") as f:
                    same = f.read() == data
            except FileNotFoundError:
                same = False
            if not same:
                stale.append(path)
        else:
            os.makedirs(MANIFEST_DIR, exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            print(f"wrote {path} ({len(data)} bytes)")
    if stale:
        print("stale manifests (run python -m loratools.archs.generate): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
