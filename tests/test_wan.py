"""Wan 2.x: the transformer manifests (generated on the meta device) against diffusers' own Wan transformer,
family detection, diffusers' Wan LoRA files read and written as `WanPipeline.lora_state_dict` reads them, and
a merge into a tiny Wan pipeline folder against `load_lora_weights` + `fuse_lora`."""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import UMT5Config, UMT5EncoderModel

from loratools import merge
from loratools.archs import load_manifest
from loratools.archs.family import WAN, adapter_family, pipeline_family
from loratools.checkpoint import Checkpoint
from loratools.errors import IncompatibleError
from loratools.formats import detect, read_adapter, write_adapter
from tests._tiny import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
TARGETS = ["attn1.to_q", "attn1.to_out.0", "attn2.to_k", "ffn.net.0.proj", "ffn.net.2"]


def test_manifest_names_are_diffusers_wan_names():
    with torch.device("meta"):
        model = WanTransformer3DModel(**TINY)
    tiny = {n[: -len(".weight")] for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() >= 2}
    for arch, last, width, ffn in (("wan", 39, 5120, 13824), ("wan-1.3b", 29, 1536, 8960)):
        shipped = load_manifest(arch)["components"]["transformer"]
        assert tiny <= set(shipped) and f"blocks.{last + 1}.attn1.to_q" not in shipped
        assert shipped[f"blocks.{last}.attn1.to_q"] == [width, width]
        assert shipped[f"blocks.{last}.ffn.net.0.proj"] == [ffn, width]


def _lora_file(tmp_path, model, seed=1):
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    model.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False))
    sd = get_peft_model_state_dict(model)
    folder = tmp_path / "wan_lora"
    WanPipeline.save_lora_weights(str(folder), transformer_lora_layers=sd,
                                  transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    return folder, sd


def test_diffusers_wan_lora_read_and_written_as_diffusers_reads_it(tmp_path):
    torch.manual_seed(0)
    folder, sd = _lora_file(tmp_path, WanTransformer3DModel(**TINY))
    path = str(folder / "pytorch_lora_weights.safetensors")
    adapter = read_adapter(path)
    assert adapter_family(adapter)[0] == WAN
    want, want_meta = WanPipeline.lora_state_dict(path, return_lora_metadata=True)
    assert {m.scale for m in adapter} == {1.5} and len(adapter) == len(sd) // 2 == len(want) // 2
    for m in adapter:  # our factors are diffusers' own
        torch.testing.assert_close(m.down, want[f"{m.name}.lora_A.weight"], rtol=0, atol=0)
        torch.testing.assert_close(m.up, want[f"{m.name}.lora_B.weight"], rtol=0, atol=0)
    out = write_adapter(adapter, tmp_path / "again", format="diffusers")
    out = out if str(out).endswith(".safetensors") else os.path.join(out, "pytorch_lora_weights.safetensors")
    assert detect(out) == "diffusers"
    got, meta = WanPipeline.lora_state_dict(out, return_lora_metadata=True)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert meta["transformer.lora_alpha"] == 6 and meta["transformer.r"] == 4


def test_merge_wan_pipeline_matches_fuse_lora(tmp_path):
    torch.manual_seed(2)
    comps = {"transformer": WanTransformer3DModel(**TINY),
             "text_encoder": UMT5EncoderModel(UMT5Config(d_model=12, d_ff=24, d_kv=6, num_heads=2, num_layers=1,
                                                         vocab_size=100)).eval()}
    root = tmp_path / "wanpipe"
    for c, model in comps.items():
        model.save_pretrained(root / c)
    with open(root / "model_index.json", "w") as f:
        json.dump({"_class_name": "WanPipeline", **{c: ["x", "y"] for c in comps}}, f)
    assert pipeline_family(str(root), comps) == WAN
    folder, _ = _lora_file(tmp_path, comps["transformer"])
    pipe = WanPipeline(tokenizer=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       **{c: copy.deepcopy(m) for c, m in comps.items()})
    pipe.load_lora_weights(str(folder))
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    out = tmp_path / "merged"
    merge(str(root), [str(folder / "pytorch_lora_weights.safetensors")], str(out))
    got, want, base = Checkpoint(str(out / "transformer")), pipe.transformer.state_dict(), comps["transformer"]
    for k, v in want.items():
        torch.testing.assert_close(got.read(k), v, rtol=1e-5, atol=1e-5, msg=k)
    changed = [k for k, v in base.state_dict().items() if not torch.equal(want[k], v)]
    assert len(changed) == len(TARGETS) * TINY["num_layers"]


def test_wan_is_written_under_wan_names_not_flux_names(tmp_path):
    torch.manual_seed(0)
    folder, _ = _lora_file(tmp_path, WanTransformer3DModel(**TINY))
    path = str(folder / "pytorch_lora_weights.safetensors")
    adapter = read_adapter(path)
    for fmt, key in (("kohya", "lora_unet_blocks_0_self_attn_q.lora_down.weight"),
                     ("comfyui", "diffusion_model.blocks.0.self_attn.q.lora_down.weight")):
        out = write_adapter(adapter, tmp_path / f"x.{fmt}.safetensors", format=fmt)
        keys = Checkpoint(out).infos
        assert key in keys and not any("double_blocks" in k or "attn1" in k for k in keys)
        back = read_adapter(out)  # the same modules, factors and scales
        assert all(torch.equal(m.up, adapter.modules[m.name].up) and m.scale == 1.5 for m in back)
    adapter.add(dataclasses.replace(next(iter(adapter)), name="transformer.blocks.0.norm2"))
    out = tmp_path / "x.safetensors"
    with pytest.raises(IncompatibleError, match="blocks.0.norm2: Wan's original"):
        write_adapter(adapter, out, format="comfyui")
    assert not out.exists()


def test_inspect_shows_wan(tmp_path, capsys):
    torch.manual_seed(0)
    folder, sd = _lora_file(tmp_path, WanTransformer3DModel(**TINY))
    code, out, err = run_cli(capsys, "inspect", str(folder / "pytorch_lora_weights.safetensors"), "--format", "json")
    rep = json.loads(out)
    assert code == 0 and err == "" and rep["unresolved"] == []
    assert rep["family"]["name"] == WAN and rep["family"]["evidence"].startswith("module transformer.blocks.")
