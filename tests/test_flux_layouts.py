"""Flux.1 LoRA layouts of other trainers: XLabs-AI's x-flux (`double_blocks.0.processor.qkv_lora1.down.weight`,
read only) read exactly as `FluxPipeline.lora_state_dict` converts it, inspected as Flux, converted and merged
into a tiny Flux pipeline folder as `load_lora_weights` + `fuse_lora` does."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import save_file

from loratools.archs.family import FLUX, adapter_family
from loratools.formats import WRITABLE, detect, read_adapter, write_adapter
from loratools.loaders import compatibility
from tests import _flux
from tests._pipes import merge_matches_fuse_lora
from tests._tiny import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
D, MLP = _flux.DIM, 4 * _flux.DIM


def _xlabs_file(path, prefix="", rank=4, seed=0):
    """An x-flux LoRA on every processor of the tiny transformer (shapes as x-flux's LoRA processors have them)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"qkv_lora1": (3 * D, D), "proj_lora1": (D, D), "qkv_lora2": (3 * D, D), "proj_lora2": (D, D)}
    single = {"qkv_lora": (3 * D, D), "proj_lora": (D, D + MLP)}
    sd = {}
    for kind, table, n in (("double_blocks", shapes, _flux.CONFIG["num_layers"]),
                           ("single_blocks", single, _flux.CONFIG["num_single_layers"])):
        for i in range(n):
            for lora, (out, inp) in table.items():
                key = f"{prefix}{kind}.{i}.processor.{lora}"
                sd[f"{key}.down.weight"] = torch.randn(rank, inp, generator=g) * 0.3
                sd[f"{key}.up.weight"] = torch.randn(out, rank, generator=g) * 0.3
    save_file(sd, str(path))
    return sd


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_reads_as_diffusers_converts_it(tmp_path, prefix):
    path = tmp_path / "xlabs.safetensors"
    _xlabs_file(path, prefix)
    assert detect(str(path)) == "xlabs" and "xlabs" not in WRITABLE
    adapter = read_adapter(str(path))
    assert adapter_family(adapter)[0] == FLUX
    want = FluxPipeline.lora_state_dict(str(path))
    assert len(want) == 2 * len(adapter) == 2 * 2 * (8 + 4)  # q, k, v split in both streams; single qkv + proj
    for m in adapter:
        assert m.scale == 1.0
        assert torch.equal(m.down, want[f"{m.name}.lora_A.weight"]), m.name
        assert torch.equal(m.up, want[f"{m.name}.lora_B.weight"]), m.name
    assert not any("proj_mlp" in m.name for m in adapter)  # linear1's MLP rows are not adapted


def test_xlabs_converts_exactly_and_inspects_as_flux(tmp_path, capsys):
    path = tmp_path / "xlabs.safetensors"
    _xlabs_file(path)
    adapter = read_adapter(str(path))
    for fmt in ("kohya", "comfyui", "diffusers"):
        back = read_adapter(str(write_adapter(adapter, tmp_path / f"x.{fmt}.safetensors", format=fmt)))
        extra = set(back.modules) - set(adapter.modules)  # linear1 fused with zero MLP rows: a zero proj_mlp LoRA
        assert set(adapter.modules) <= set(back.modules) and all("proj_mlp" in n for n in extra), fmt
        assert all(not back.modules[n].up.any() for n in extra)
        for m in adapter:  # kohya / ComfyUI fuse q, k, v back with a zero MLP part: same update
            torch.testing.assert_close(back.modules[m.name].dense_delta(torch.float64), m.dense_delta(torch.float64),
                                       rtol=0, atol=0)
    code, out, err = run_cli(capsys, "inspect", str(path), "--format", "json")
    rep = json.loads(out)
    assert code == 0 and rep["format"] == "xlabs" and rep["family"]["name"] == FLUX
    assert "XLabs layout" in rep["family"]["evidence"]
    code, out, err = run_cli(capsys, "convert", str(path), "--to", "xlabs", "-o", str(tmp_path / "y.safetensors"))
    assert code == 2 and "xlabs" in err


def test_merge_xlabs_into_flux_pipeline_matches_fuse_lora(tmp_path):
    transformer = _flux.transformer(seed=5)
    path = tmp_path / "xlabs.safetensors"
    _xlabs_file(path, seed=6)
    assert merge_matches_fuse_lora(tmp_path, FluxPipeline, transformer, path) == 2 * 8 + 2 * 4


def _flat_file(path, prefix="lora_transformer_", attention_only=False, t5=False, seed=0):
    """A LoRA under diffusers' Flux names flattened as OneTrainer (`lora_transformer_`, T5 as `lora_te2_`) or an
    older ai-toolkit (`lora_unet_`) writes them, with kohya alphas."""
    g = torch.Generator().manual_seed(seed)
    shapes = _flux.weight_shapes(_flux.transformer())
    if attention_only:  # diffusers' OneTrainer conversion knows attention and the global modules only
        shapes = {n: s for n, s in shapes.items() if ".attn." in n or "blocks." not in n}
    mods = [(prefix + n.replace(".", "_"), s) for n, s in sorted(shapes.items())]  # same draws for either prefix
    if t5:
        mods.append(("lora_te2_encoder_block_0_layer_0_SelfAttention_q", (8, 8)))  # no base given: shapes unchecked
    sd = {}
    for i, (ln, (out, inp)) in enumerate(mods):
        sd[f"{ln}.lora_down.weight"] = torch.randn(4, inp, generator=g)
        sd[f"{ln}.lora_up.weight"] = torch.randn(out, 4, generator=g)
        sd[f"{ln}.alpha"] = torch.tensor((1.0, 4.0, 6.0)[i % 3])
    save_file(sd, str(path))
    return sd


def test_onetrainer_names_read_as_diffusers_converts_them(tmp_path):
    path = tmp_path / "onetrainer.safetensors"
    _flat_file(path, attention_only=True)
    assert detect(str(path)) == "kohya"
    adapter = read_adapter(str(path))
    want = FluxPipeline.lora_state_dict(str(path))
    assert len(want) == 2 * len(adapter)
    for m in adapter:  # diffusers splits alpha/rank between A and B (`scale_down`/`scale_up`); redo it on ours
        down, up = m.scale, 1.0
        while down * 2 < up:
            down, up = down * 2, up / 2
        assert torch.equal(m.down * down, want[f"{m.name}.lora_A.weight"]), m.name
        assert torch.equal(m.up * up, want[f"{m.name}.lora_B.weight"]), m.name


def test_flattened_diffusers_names_resolve_and_convert_exactly(tmp_path):
    onetrainer, aitk = tmp_path / "ot.safetensors", tmp_path / "aitk.safetensors"
    sd = _flat_file(onetrainer, t5=True)
    _flat_file(aitk, prefix="lora_unet_")
    first, second = read_adapter(str(onetrainer)), read_adapter(str(aitk))
    assert adapter_family(first)[0] == FLUX
    assert "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q" in first.modules
    assert len(first) == len(sd) // 3 == len(second) + 1 and first.config["unresolved"] == []
    for m in second:  # the same factors under either prefix
        assert torch.equal(m.down, first.modules[m.name].down) and m.scale == first.modules[m.name].scale
    kohya = read_adapter(str(write_adapter(first, tmp_path / "k.safetensors", format="kohya")))  # BFL names
    assert set(kohya.modules) == set(first.modules)
    for name, m in first.modules.items():  # q, k, v with unequal alphas fuse with each scale folded into B (fp32)
        torch.testing.assert_close(kohya.modules[name].dense_delta(torch.float64), m.dense_delta(torch.float64),
                                   rtol=1e-6, atol=1e-6)


def test_ai_toolkit_diffusers_names_read_as_diffusers_reads_them(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, (out, inp) in _flux.weight_shapes(_flux.transformer()).items():
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, inp, generator=g)
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(out, 4, generator=g)
    path = tmp_path / "aitk.safetensors"
    save_file(sd, str(path), {"format": "pt"})
    adapter = read_adapter(str(path))
    want = FluxPipeline.lora_state_dict(str(path))
    assert detect(str(path)) == "diffusers" and set(want) == set(sd)
    assert all(torch.equal(m.down, want[f"{m.name}.lora_A.weight"]) and m.scale == 1.0 for m in adapter)


def test_loads_in_says_what_diffusers_does(tmp_path):
    """inspect's "loads in" verdicts for XLabs and OneTrainer files, checked against diffusers itself."""
    xl, ot_attn, ot_t5 = tmp_path / "xl.safetensors", tmp_path / "ot1.safetensors", tmp_path / "ot2.safetensors"
    _xlabs_file(xl)
    _flat_file(ot_attn, attention_only=True)
    _flat_file(ot_t5, attention_only=True, t5=True)
    verdicts = {p.name: compatibility(read_adapter(str(p))) for p in (xl, ot_attn, ot_t5)}
    assert [v["diffusers"]["ok"] for v in verdicts.values()] == [True, True, False]
    assert not verdicts["xl.safetensors"]["ComfyUI"]["ok"]
    FluxPipeline.lora_state_dict(str(xl))
    FluxPipeline.lora_state_dict(str(ot_attn))
    with pytest.raises(AssertionError):  # its OneTrainer branch asserts on any other prefix (T5's lora_te2_)
        FluxPipeline.lora_state_dict(str(ot_t5))


def test_malformed_xlabs_and_onetrainer_files_fail_in_one_line(tmp_path, capsys):
    sd = _xlabs_file(tmp_path / "xl.safetensors")
    del sd["double_blocks.0.processor.qkv_lora1.up.weight"]
    save_file(sd, str(tmp_path / "no_up.safetensors"))
    ot = _flat_file(tmp_path / "ot.safetensors")
    ot["lora_transformer_no_such_module.lora_down.weight"] = torch.zeros(4, 16)
    ot["lora_transformer_no_such_module.lora_up.weight"] = torch.zeros(16, 4)
    save_file(ot, str(tmp_path / "unknown.safetensors"))
    for name, says in (("no_up", "double_blocks.0.img_attn.qkv has no up"), ("unknown", "lora_transformer_no_such")):
        out = tmp_path / f"{name}.out.safetensors"
        code, _, err = run_cli(capsys, "convert", str(tmp_path / f"{name}.safetensors"), "--to", "diffusers",
                               "-o", str(out))
        assert code == 1 and says in err and len(err.strip().splitlines()) == 1 and not out.exists(), err
