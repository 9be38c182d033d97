"""inspect, blend, resize, validate and convert --base on Qwen-Image adapters (musubi-tuner's kohya names,
ComfyUI's names): the family and loaders shown, blends and resizes checked against the dense ΔW and read back
by diffusers' `QwenImagePipeline.lora_state_dict`, a Qwen-Image LoRA named as such against a Flux pipeline."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, QwenImagePipeline,
                       QwenImageTransformer2DModel)
from safetensors.torch import save_file

from _tiny import run_cli as run
from loratools.archs.family import QWEN
from loratools.formats import read_adapter, write_adapter
from tests._dit import delta, lora_files
from test_qwen_image import (TINY, _pipeline_folder, alphas, assert_loads_as_ours, assert_reads_as_diffusers, layout,
                             lora_sd, tiny)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")


def _files(tmp_path, kinds=("musubi", "comfy")):
    model = tiny()
    return lora_files(tmp_path, kinds, lambda seed, kind: layout(lora_sd(model, seed=seed), kind))


def test_inspect_shows_qwen_and_where_it_loads(tmp_path, capsys):
    musubi, comfy = _files(tmp_path)
    for path, fmt in ((musubi, "kohya"), (comfy, "comfyui")):
        code, out, err = run(capsys, "inspect", path, "--format", "json")
        rep = json.loads(out)
        assert code == 0 and err == "" and rep["unresolved"] == [] and rep["format"] == fmt
        assert rep["family"]["name"] == QWEN and "img_m" in rep["family"]["evidence"]
        assert rep["loads_in"]["diffusers"]["ok"] and rep["loads_in"]["ComfyUI"]["ok"], rep["loads_in"]
    # ComfyUI reads a diffusers file's names but not the alphas in its metadata
    out = write_adapter(read_adapter(musubi), tmp_path / "d.safetensors", format="diffusers")
    rep = json.loads(run(capsys, "inspect", out, "--format", "json")[1])["loads_in"]
    assert rep["diffusers"]["ok"] and not rep["ComfyUI"]["ok"] and "lora_adapter_metadata" in rep["ComfyUI"]["why"]


def test_blend_cat_is_the_exact_weighted_sum(tmp_path, capsys):
    musubi, comfy = _files(tmp_path)
    out = tmp_path / "blend.safetensors"
    code, _, err = run(capsys, "blend", f"{musubi}:0.7", f"{comfy}:-0.4", "-m", "cat", "-o", out, "-q")
    assert code == 0, err
    a, b = read_adapter(musubi), read_adapter(comfy)
    got = assert_reads_as_diffusers(str(out), len(a))
    for m in got:
        want = 0.7 * delta(a.modules[m.name]) - 0.4 * delta(b.modules[m.name])
        torch.testing.assert_close(delta(m), want, rtol=1e-6, atol=1e-7, msg=m.name)  # fp32 factors


def test_resize_is_the_best_lower_rank(tmp_path, capsys):
    (musubi,) = _files(tmp_path, ("musubi",))
    out = tmp_path / "r2.safetensors"
    code, _, err = run(capsys, "resize", musubi, "--rank", "2", "-o", out, "-q")
    assert code == 0, err
    src = read_adapter(musubi)
    got = assert_reads_as_diffusers(str(out), len(src))
    for m in got:
        u, s, vh = torch.linalg.svd(delta(src.modules[m.name]), full_matrices=False)
        assert m.rank == 2
        torch.testing.assert_close(delta(m), (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-5, atol=1e-6, msg=m.name)


def test_validate_against_qwen_and_flux_pipelines(tmp_path, capsys):
    musubi, comfy = _files(tmp_path)
    root = _pipeline_folder(tmp_path / "qwenpipe", tiny())
    for path in (musubi, comfy):
        code, out, err = run(capsys, "validate", path, "--base", root, "--no-norms")  # random updates are large
        assert (code, out) == (0, "") and "18 module(s) checked against" in err, (path, out, err)
    torch.manual_seed(0)
    flux = tmp_path / "fluxpipe"
    FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                           num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=8,
                           axes_dims_rope=(2, 2, 4)).save_pretrained(flux / "transformer")
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    for path in (musubi, comfy):
        code, out, err = run(capsys, "validate", path, "--base", flux)
        want = "error: Qwen-Image LoRA, Flux pipeline (the adapter was made for another"
        assert code == 1 and out.startswith(want), (out, err)
        code, _, err = run(capsys, "merge", flux, path, "-o", tmp_path / "never")
        assert code == 1 and err.startswith("loratools: error: Qwen-Image LoRA, Flux pipeline"), err
    assert not (tmp_path / "never").exists()


def test_diffusers_names_with_alpha_keys(tmp_path, capsys):
    """diffusers 0.42 renames these `transformer.transformer.…` and fails to load them; we read them (ΔW equal
    to the dense update with the file's alphas), inspect says so, and `--to diffusers` writes what it loads."""
    model = tiny()
    sd = lora_sd(model)
    path = tmp_path / "alpha_keys.safetensors"
    save_file({**{f"transformer.{k}": v for k, v in sd.items()},
               **{f"transformer.{m}.alpha": torch.tensor(a) for m, a in alphas(sd).items()}}, str(path))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                             tokenizer=None, transformer=copy.deepcopy(model))
    with pytest.raises(ValueError, match="not found in the base model"):
        pipe.load_lora_weights(str(path))
    adapter = read_adapter(str(path))
    for m in adapter:
        local = m.name[len("transformer."):]
        want = alphas(sd)[local] / 4 * sd[f"{local}.lora_B.weight"].double() @ sd[f"{local}.lora_A.weight"].double()
        torch.testing.assert_close(delta(m), want, rtol=1e-12, atol=0, msg=m.name)
    rep = json.loads(run(capsys, "inspect", path, "--format", "json")[1])["loads_in"]
    assert not rep["diffusers"]["ok"] and "transformer.transformer." in rep["diffusers"]["why"]
    out = tmp_path / "fixed"
    assert run(capsys, "convert", path, "--to", "diffusers", "-o", out, "-q")[0] == 0
    assert_loads_as_ours(str(out / "pytorch_lora_weights.safetensors"), adapter, model)


def test_convert_resolves_kohya_names_from_a_base(tmp_path, capsys):
    """`--base` takes a Qwen-Image pipeline; a base of other widths is refused by validate."""
    (musubi,) = _files(tmp_path, ("musubi",))
    root = _pipeline_folder(tmp_path / "qwenpipe", tiny())
    out = tmp_path / "c.safetensors"
    code, _, err = run(capsys, "convert", musubi, "--base", root, "--to", "comfyui", "-o", out, "-q")
    assert code == 0, err
    assert_reads_as_diffusers(str(out), len(read_adapter(musubi)))
    wide = QwenImageTransformer2DModel(**{**TINY, "attention_head_dim": 16, "axes_dims_rope": (4, 4, 8)})
    other = _pipeline_folder(tmp_path / "wider", wide)
    code, out, _ = run(capsys, "validate", musubi, "--base", other, "--no-norms")
    assert code == 1 and out.startswith("error: module transformer.") and "adapter for another model?" in out, out
