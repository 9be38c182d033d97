"""SD3 / SD3.5 next to Flux.1: the manifests (generated on the meta device) against diffusers' own
SD3 transformer, telling a diffusers-named LoRA on `transformer_blocks` only apart from a Flux one by
its shapes, refusing to rename an SD3 transformer into Flux's original names, and diffusers'
SD3 LoRA files read and written as `StableDiffusion3Pipeline.lora_state_dict` reads them, and a merge into
a tiny SD3 pipeline folder (transformer + both CLIP LoRAs) against `load_lora_weights` + `fuse_lora`."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from loratools import LoraAdapter, LoraModule, merge, safetensors_io
from loratools.archs import load_manifest
from loratools.archs.family import FLUX, SD3, adapter_family
from loratools.checkpoint import Checkpoint
from loratools.formats import detect, read_adapter, write_adapter
from tests import _sd3
from tests._dit import save_pipeline_folder
from tests._sd3 import TINY

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
TARGETS = ["attn.to_q", "attn.to_k", "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "ff.net.2",
           "norm1_context.linear"]


def _blocks_lora(width: int, names=("attn.to_q", "attn.to_k", "attn.to_out.0", "ff.net.0.proj")) -> LoraAdapter:
    """A diffusers-named LoRA on transformer_blocks.0 only, at a real model's hidden width."""
    g = torch.Generator().manual_seed(0)
    rows = {"ff.net.0.proj": 4 * width}
    mods = {}
    for n in names:
        name = f"transformer.transformer_blocks.0.{n}"
        mods[name] = LoraModule(name, torch.randn(2, width, generator=g), torch.randn(rows.get(n, width), 2,
                                                                                       generator=g), 2.0)
    return LoraAdapter(modules=mods)


def test_manifest_names_are_diffusers_sd3_names():
    with torch.device("meta"):
        model = SD3Transformer2DModel(**TINY)
    tiny = {n[: -len(".weight")] for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() >= 2}
    shipped = set(load_manifest("sd3")["components"]["transformer"])
    assert tiny <= shipped and "transformer_blocks.12.attn2.to_q" in shipped  # SD3.5 medium's dual attention
    large = load_manifest("sd3.5-large")["components"]
    assert large["transformer"]["transformer_blocks.37.attn.to_q"] == [2432, 2432]
    assert large["text_encoder_2"]["text_projection"] == [1280, 1280] and "text_encoder_3" in large


@pytest.mark.parametrize("width,family", [(3072, FLUX), (1536, SD3), (2432, SD3)])
def test_transformer_blocks_only_told_apart_by_width(width, family):
    fam = adapter_family(_blocks_lora(width))
    assert fam[0] == family and str(width) in fam[1]
    assert adapter_family(_blocks_lora(100)) is None  # no known model's width: nothing claimed


def test_sd3_transformer_is_not_renamed_into_flux_names(tmp_path):
    sd3 = _blocks_lora(1536)  # told apart from Flux by its width: written in SD3's own original names
    for fmt, key in (("kohya", "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"),
                     ("comfyui", "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_down.weight")):
        out = write_adapter(sd3, tmp_path / f"x.{fmt}.safetensors", format=fmt)
        keys = set(safetensors_io.load(out)[0])
        assert key in keys and not any("double_blocks" in k for k in keys)
    flux = write_adapter(_blocks_lora(3072), tmp_path / "f.safetensors", format="kohya")  # Flux still fuses
    keys = set(safetensors_io.load(flux)[0])
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys


def _diffusers_sd3_file(tmp_path):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**TINY)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    sd = get_peft_model_state_dict(model)
    folder = tmp_path / "sd3_lora"
    StableDiffusion3Pipeline.save_lora_weights(str(folder), transformer_lora_layers=sd,
                                               transformer_lora_adapter_metadata=model.peft_config["default"]
                                               .to_dict())
    return str(folder / "pytorch_lora_weights.safetensors"), sd


def test_diffusers_sd3_lora_round_trip_as_diffusers_reads_it(tmp_path):
    path, sd = _diffusers_sd3_file(tmp_path)
    adapter = read_adapter(path)
    assert {m.scale for m in adapter} == {2.0} and len(adapter) == len(sd) // 2
    assert any(m.name == "transformer.transformer_blocks.0.attn2.to_q" for m in adapter)
    out = write_adapter(adapter, tmp_path / "again", format="diffusers")
    out = out if str(out).endswith(".safetensors") else os.path.join(out, "pytorch_lora_weights.safetensors")
    assert detect(out) == "diffusers"
    want, _ = StableDiffusion3Pipeline.lora_state_dict(path, return_lora_metadata=True)
    got, meta = StableDiffusion3Pipeline.lora_state_dict(out, return_lora_metadata=True)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    alphas = {meta["transformer.lora_alpha"], *meta["transformer.alpha_pattern"].values()}
    ranks = {meta["transformer.r"], *meta["transformer.rank_pattern"].values()}
    assert alphas == {8} and ranks == {4}  # every module's scale 8/4 reaches diffusers


# ---- merging into a pipeline folder ---------------------------------------------------------------

def _lora_layers(model, seed, **cfg):
    """PEFT LoRA factors and config on a copy of `model`, as diffusers' trainers save them."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    model.add_adapter(LoraConfig(init_lora_weights=False, **cfg))
    return get_peft_model_state_dict(model), model.peft_config["default"].to_dict()


@pytest.fixture(scope="module")
def sd3_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3pipe")
    comps = _sd3.components()
    save_pipeline_folder(root, "StableDiffusion3Pipeline", comps)
    return root, comps


def test_merge_sd3_pipeline_matches_fuse_lora(sd3_pipeline, tmp_path):
    root, comps = sd3_pipeline
    tr, tr_meta = _lora_layers(comps["transformer"], 1, r=4, lora_alpha=8, target_modules=TARGETS)
    te, te_meta = _lora_layers(comps["text_encoder"], 2, r=2, lora_alpha=3, target_modules=["q_proj", "fc1"])
    te2, te2_meta = _lora_layers(comps["text_encoder_2"], 4, r=3, lora_alpha=6, target_modules=["v_proj"])
    lora_dir = tmp_path / "lora"
    StableDiffusion3Pipeline.save_lora_weights(
        str(lora_dir), transformer_lora_layers=tr, text_encoder_lora_layers=te, text_encoder_2_lora_layers=te2,
        transformer_lora_adapter_metadata=tr_meta, text_encoder_lora_adapter_metadata=te_meta,
        text_encoder_2_lora_adapter_metadata=te2_meta)
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, tokenizer=None,
                                    tokenizer_2=None, tokenizer_3=None,
                                    **{c: copy.deepcopy(m) for c, m in comps.items()})
    pipe.load_lora_weights(str(lora_dir))
    pipe.fuse_lora(components=["transformer", "text_encoder", "text_encoder_2"])
    pipe.unload_lora_weights()
    out = tmp_path / "merged"
    merge(str(root), [str(lora_dir / "pytorch_lora_weights.safetensors")], str(out))
    changed = {}
    for c, base in comps.items():
        got = Checkpoint(str(out / c))
        want = getattr(pipe, c).state_dict()
        for k, v in base.state_dict().items():
            if k not in got:  # tied T5 embeddings are saved once
                continue
            torch.testing.assert_close(got.read(k), want[k], rtol=1e-5, atol=1e-5, msg=f"{c}.{k}")
            changed[c] = changed.get(c, 0) + (not torch.equal(want[k], v))
    n_tr = sum(1 for n, _ in comps["transformer"].named_modules() if n.endswith(tuple(TARGETS)))
    assert changed == {"transformer": n_tr, "text_encoder": 2, "text_encoder_2": 1, "text_encoder_3": 0}
