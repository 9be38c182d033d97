"""FLUX.2 (diffusers' Flux2Transformer2DModel): the name table against diffusers' single-file converter, the dev
manifest, Flux.1 / FLUX.2 told apart both ways, every layout read as `Flux2Pipeline.lora_state_dict` reads it
(diffusers, ai-toolkit's `diffusion_model.` + lora_A/B, kohya `lora_unet_` + alpha), what we write loaded by
`load_lora_weights`, round trips bit-exact, and merges (pipeline folder, single file bf16/fp8) against `fuse_lora`."""
from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import Flux2Pipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from loratools import merge, safetensors_io
from loratools.adapter import LoraAdapter, LoraModule
from loratools.archs import dit, flux, flux2, load_manifest
from loratools.archs.family import FLUX, FLUX2, SD3, adapter_family, mismatch, pipeline_family
from loratools.checkpoint import Checkpoint
from loratools.formats import detect, read_adapter, write_adapter
from tests._dit import assert_fp8_merge, assert_round_trip, merge_into_single
from tests._flux2 import (KOHYA_MAPPED, file_layout, folded, original_lora, original_modules, original_state_dict,
                          pipeline, tiny)
from tests._tiny import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
NORM_OUT = "transformer.norm_out.linear"


def _random(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.5
    return model


def test_name_table_against_diffusers_single_file_converter_and_manifest():
    model = _random(tiny())
    orig = original_state_dict(model)
    conv = convert_flux2_transformer_checkpoint_to_diffusers(dict(orig))
    sd = model.state_dict()
    assert set(conv) == set(sd) and all(torch.equal(conv[k], sd[k]) for k in sd)  # rows, order and the swap
    assert len(original_modules(model)) == 2 * 8 + 2 * 2 + 11
    table = load_manifest("flux2")["components"]["transformer"]
    names = flux2.LAYOUT.original_names(table)
    assert {p for parts in names.values() for p in parts} == set(table) and len(names) == 8 * 8 + 48 * 2 + 11
    assert table["transformer_blocks.7.attn.to_q"] == [6144, 6144] and "transformer_blocks.8.attn.to_q" not in table
    assert table["single_transformer_blocks.47.attn.to_qkv_mlp_proj"] == [55296, 6144]
    assert table["context_embedder"] == [6144, 15360] and table["x_embedder"] == [6144, 128]
    assert all(flux2.LAYOUT.unflatten(n.replace(".", "_")) == n for n in names)
    for arch, hidden, double, single, text in (("flux2-klein-4b", 3072, 5, 20, 7680),
                                               ("flux2-klein-9b", 4096, 8, 24, 12288)):
        klein = load_manifest(arch)["components"]["transformer"]
        names = flux2.LAYOUT.original_names(klein)  # the same names, no guidance embedder
        assert {p for parts in names.values() for p in parts} == set(klein) and len(names) == double * 8 + single * 2 + 9
        assert klein["context_embedder"] == [hidden, text] and f"double_blocks.{double - 1}.img_attn.qkv" in names


def _adapter(shapes, metadata=None):
    out = LoraAdapter(format="diffusers", metadata=metadata or {})
    for name, (o, i) in shapes.items():
        out.add(LoraModule(name, torch.zeros(1, i), torch.zeros(o, 1), None, "linear"))
    return out


def test_flux1_and_flux2_told_apart_both_ways(tmp_path):
    t = "transformer."
    assert adapter_family(_adapter({t + "single_transformer_blocks.0.attn.to_out": (16, 64)}))[0] == FLUX2
    assert adapter_family(_adapter({t + "transformer_blocks.0.ff.linear_in": (96, 16)}))[0] == FLUX2
    assert adapter_family(_adapter({t + "single_transformer_blocks.0.proj_out": (16, 80)}))[0] == FLUX
    assert adapter_family(_adapter({t + "transformer_blocks.0.ff.net.0.proj": (12288, 3072)}))[0] == FLUX
    # attention alone: the real models' widths (dev's 6144, Flux.1's 3072)
    assert adapter_family(_adapter({t + "transformer_blocks.7.attn.to_q": (6144, 6144)}))[0] == FLUX2
    assert adapter_family(_adapter({t + "transformer_blocks.7.attn.to_q": (3072, 3072)}))[0] == FLUX
    assert adapter_family(_adapter({t + "transformer_blocks.7.attn.to_q": (4096, 4096)}))[0] == FLUX2  # klein 9B
    assert adapter_family(_adapter({t + "context_embedder": (3072, 7680)}))[0] == FLUX2  # klein 4B's Qwen3 states
    # attention at 3072 alone is reported as Flux.1 but fits klein 4B (and Qwen-Image) bases too: not refused there
    attn = _adapter({t + "transformer_blocks.0.attn.to_q": (3072, 3072)})
    assert mismatch(attn, FLUX2, "pipeline") is None and mismatch(attn, FLUX, "pipeline") is None
    assert mismatch(attn, SD3, "pipeline").startswith("Flux LoRA, SD3 pipeline")
    assert mismatch(_adapter({t + "transformer_blocks.0.ff.linear_in": (96, 16)}), FLUX, "pipeline")
    for key, value in (("ss_base_model_version", "flux2_dev"), ("modelspec.architecture", "flux.2-klein-4b/lora"),
                       ("ss_architecture", "flux_2_dev")):
        assert adapter_family(_adapter({t + "x": (8, 8)}, {key: value}))[0] == FLUX2
    assert adapter_family(_adapter({t + "x": (8, 8)}, {"ss_base_model_version": "flux1"}))[0] == FLUX
    for cls, fam in (("Flux2Pipeline", FLUX2), ("Flux2KleinPipeline", FLUX2), ("FluxPipeline", FLUX)):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "model_index.json").write_text(json.dumps({"_class_name": cls}))
        assert pipeline_family(str(tmp_path / cls), ["transformer"]) == fam
    # the same original names: the MLP / linear1 widths tell, in files of either layout
    f2 = original_lora(tiny(), only=("linear1", "img_mlp"))
    flux1 = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    f1 = {n: (torch.randn(4, 16), torch.randn(flux1.get_submodule(p[0]).weight.shape[0] * (4 if len(p) == 4 else 1)
                                              if n.endswith("linear1") else 64, 4))
          for n, p in flux.original_names(1, 1, False).items() if n.endswith(("linear1", "img_mlp.0"))}
    for lora, fam, layout in ((f2, FLUX2, flux2.LAYOUT), (f1, FLUX, flux.LAYOUT)):
        for kind in ("comfy", "kohya"):
            path = tmp_path / f"{fam}{kind}.safetensors"
            save_file(file_layout(lora, kind), str(path))
            adapter = read_adapter(str(path))
            assert adapter_family(adapter)[0] == fam, (fam, kind)
            assert dit.for_adapter(adapter) is layout
    # single files: FLUX.2's shared modulation marks it; Flux.1's files have double_blocks.0's qkv only
    keys = set(original_state_dict(tiny()))
    assert dit.for_checkpoint(keys) is flux2.LAYOUT
    assert dit.for_checkpoint(keys - {"single_stream_modulation.lin.weight"}) is flux.LAYOUT


@pytest.mark.parametrize("kind,split", [("aitoolkit", False), ("kohya", False), ("kohya", True)])
def test_reads_as_lora_state_dict(tmp_path, kind, split):
    model = tiny()
    lora = original_lora(model, split_qkv=split, only=KOHYA_MAPPED if kind == "kohya" else None)
    path = str(tmp_path / f"{kind}.safetensors")
    save_file(file_layout(lora, kind), path)
    assert detect(path) == ("kohya" if kind == "kohya" else "comfyui")
    adapter = read_adapter(path)
    want = Flux2Pipeline.lora_state_dict(path)
    assert adapter_family(adapter)[0] == FLUX2 and len(want) == 2 * len(adapter)
    assert len(adapter) == len(lora) + 2 * sum(1 for n in lora if n.endswith(".qkv"))
    for m in adapter:
        down, up = (m.down, m.up) if kind == "aitoolkit" else folded(m)
        got_up = want[f"{m.name}.lora_B.weight"]
        if m.name == NORM_OUT:  # diffusers' LoRA converter leaves BFL's [shift; scale] (its weight converter swaps)
            got_up = torch.cat([got_up[got_up.shape[0] // 2:], got_up[: got_up.shape[0] // 2]])
        assert torch.equal(down, want[f"{m.name}.lora_A.weight"]) and torch.equal(up, got_up), m.name


def _assert_loads_as_ours(path, adapter, model):
    """`load_lora_weights` puts every module's update (PEFT's scaling · B @ A) where we read it."""
    pipe = pipeline(model)
    pipe.load_lora_weights(path, adapter_name="x")
    for m in adapter:
        layer = pipe.transformer.get_submodule(m.name[len("transformer."):])
        got = layer.scaling["x"] * layer.lora_B["x"].weight @ layer.lora_A["x"].weight
        torch.testing.assert_close(got, m.scale * m.up @ m.down, rtol=1e-6, atol=1e-6, msg=m.name)


@pytest.mark.parametrize("split", [False, True])
def test_what_we_write_loads_and_round_trips(tmp_path, split):
    """kohya -> diffusers / comfyui / kohya -> kohya is bit-exact (fused <-> split: shared A, or sd-scripts'
    block-diagonal B); diffusers loads our diffusers and kohya files to the updates we read."""
    model = tiny()
    sd = file_layout(original_lora(model, split_qkv=split, only=KOHYA_MAPPED), "kohya")
    src = tmp_path / "src.safetensors"
    safetensors_io.save(str(src), sd, {})
    adapter = read_adapter(str(src))
    for fmt in ("diffusers", "comfyui", "kohya"):
        out = assert_round_trip(adapter, sd, fmt, tmp_path)
        assert detect(out) == fmt
        if fmt != "comfyui":  # diffusers drops `diffusion_model.` + lora_down files (only a warning)
            _assert_loads_as_ours(out if out.endswith(".safetensors") else
                                  os.path.join(out, "pytorch_lora_weights.safetensors"), adapter, model)


def test_separately_trained_qkv_fuse_exactly(tmp_path):
    """q, k, v LoRAs trained apart become one on the fused qkv (A stacked, B block-diagonal: rank 3r), the same ΔW,
    and split back to the same factors."""
    model = tiny()
    pipe = pipeline(model)
    g = torch.Generator().manual_seed(3)
    layers = {}
    r = 3
    for p in ("to_q", "to_k", "to_v"):
        layers[f"transformer_blocks.0.attn.{p}.lora_A.weight"] = torch.randn(r, 16, generator=g)
        layers[f"transformer_blocks.0.attn.{p}.lora_B.weight"] = torch.randn(16, r, generator=g)
    pipe.save_lora_weights(str(tmp_path / "d"), transformer_lora_layers=layers)
    adapter = read_adapter(str(tmp_path / "d"))
    out = write_adapter(adapter, tmp_path / "k.safetensors", format="kohya")
    fused = load_file(out)
    down, up = (fused[f"lora_unet_double_blocks_0_img_attn_qkv.lora_{r}.weight"] for r in ("down", "up"))
    assert down.shape == (9, 16) and up.shape == (48, 9)
    dense = torch.cat([adapter.modules[f"transformer.transformer_blocks.0.attn.{p}"].up
                       @ adapter.modules[f"transformer.transformer_blocks.0.attn.{p}"].down
                       for p in ("to_q", "to_k", "to_v")])
    torch.testing.assert_close(up @ down, dense, rtol=0, atol=1e-6)
    back = read_adapter(out)
    for m in adapter:
        assert torch.equal(back.modules[m.name].down, m.down) and torch.equal(back.modules[m.name].up, m.up)


def _fused(model, lora):
    pipe = pipeline(model)
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    return pipe.transformer.state_dict()


def test_merge_pipeline_folder_matches_fuse_lora(tmp_path):
    base = tiny(2)
    root = tmp_path / "pipe"
    base.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline",
                                                       "transformer": ["diffusers", "Flux2Transformer2DModel"]}))
    lora = str(tmp_path / "k.safetensors")
    save_file(file_layout(original_lora(base, seed=4, split_qkv=True, only=KOHYA_MAPPED), "kohya"), lora)
    want = _fused(base, lora)
    merge(str(root), [lora], str(tmp_path / "merged"))
    got = Checkpoint(str(tmp_path / "merged" / "transformer"))
    for k, v in want.items():
        torch.testing.assert_close(got.read(k), v, rtol=1e-5, atol=1e-5, msg=k)
    assert sum(1 for k, v in base.state_dict().items() if not torch.equal(want[k], v)) == 33


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_merge_single_file_matches_fuse_lora(tmp_path, capsys, prefix):
    """A BFL single file (fp32, then fp8 rounded once from the fp32 sum) merged with a diffusers-layout LoRA on every
    module (the final adaLN too), converted back by diffusers' single-file converter = `fuse_lora`."""
    base = tiny(4)
    layers = {}
    g = torch.Generator().manual_seed(5)
    for parts in original_modules(base).values():
        for p in parts:
            w = base.get_submodule(p).weight
            layers[f"{p}.lora_A.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.2
            layers[f"{p}.lora_B.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.2
    Flux2Pipeline.save_lora_weights(str(tmp_path / "d"), transformer_lora_layers=layers)
    lora = str(tmp_path / "d" / "pytorch_lora_weights.safetensors")
    fused = tiny(4)
    fused.load_state_dict(_fused(base, lora))
    want, weights = original_state_dict(fused), original_state_dict(base)
    single, out = tmp_path / "flux2.safetensors", tmp_path / "merged.safetensors"
    got = merge_into_single(capsys, weights, prefix, single, lora, out)
    assert set(got) == {prefix + k for k in weights}
    conv = convert_flux2_transformer_checkpoint_to_diffusers({k[len(prefix):]: v for k, v in got.items()})
    for k, v in fused.state_dict().items():
        torch.testing.assert_close(conv[k], v, rtol=1e-5, atol=1e-5, msg=k)
    assert_fp8_merge(capsys, single, lora, out, weights, want, prefix)


def test_original_names_lora_merges_into_the_original_file_as_is(tmp_path, capsys):
    """An ai-toolkit LoRA on every BFL module (the final adaLN too: split, swapped into diffusers' order and back)
    adds B @ A to exactly its weight of a BFL single file."""
    base = tiny(6)
    lora = original_lora(base, seed=7)
    path = tmp_path / "a.safetensors"
    save_file(file_layout(lora, "aitoolkit"), str(path))
    weights = original_state_dict(base)
    single = tmp_path / "flux2.safetensors"
    save_file(weights, str(single))
    out = tmp_path / "merged.safetensors"
    code, _, err = run_cli(capsys, "merge", single, path, "-o", out, "-q")
    assert code == 0, err
    got = load_file(str(out))
    for k, v in weights.items():
        name = k[: -len(".weight")]
        want = v + lora[name][1] @ lora[name][0] if name in lora else v
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-5, msg=k)
