"""inspect's "loads in" line (issue 14 §2): each ✓ is checked by loading the file in that tool where it
is installed here (PEFT, diffusers); ComfyUI's and llama.cpp's ✗ follow their naming and alpha rules
(ComfyUI's map spells diffusers UNet attention keys `.processor.to_q`; llama.cpp's converter writes
one alpha, each module scaled alpha / rank, as test_uniform_scale checks)."""
from __future__ import annotations

import os

import pytest
import torch

import _formats_models as M
from _tiny import peft_adapter, run_cli, tiny_llama
from tests import _flux
from loratools import safetensors_io
from loratools.formats import read_adapter, write_adapter
from loratools.inspection import inspect

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402


def _loads(path):
    return {k: v["ok"] for k, v in inspect(path).to_dict()["loads_in"].items()}


def _files(d, **alphas):
    models = M.peft_pipeline_lora(str(d / "peft"), **alphas)
    adapter = read_adapter(str(d / "peft"))
    files = {fmt: write_adapter(adapter, str(d / f"{fmt}.safetensors"), format=fmt) for fmt in ("diffusers", "kohya")}
    return d, models, adapter, files


@pytest.fixture(scope="module")
def pipeline_lora(tmp_path_factory):  # per-module alphas on attention (to_v) and the text encoder (fc1)
    return _files(tmp_path_factory.mktemp("loaders"))


@pytest.fixture(scope="module")
def even_alphas(tmp_path_factory):  # attention and text-encoder modules share their component's alpha
    return _files(tmp_path_factory.mktemp("even"), unet_alphas={"conv1": 5.5, "ff.net.2": 6}, te_alphas={})


def _diffusers_matches(files, fmt, models) -> bool:
    pipe = M.pipeline()
    pipe.load_lora_weights(files[fmt])
    return torch.allclose(M.unet_out(pipe.unet), M.unet_out(models["unet"]), rtol=1e-5, atol=1e-5) and \
        torch.allclose(M.te_out(pipe.text_encoder), M.te_out(models["text_encoder"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("which", ["pipeline_lora", "even_alphas"])
def test_diffusion_files(fmt, which, request):
    d, models, adapter, files = request.getfixturevalue(which)
    rep = inspect(files[fmt]).to_dict()["loads_in"]
    assert not rep["PEFT"]["ok"] and not rep["llama.cpp converter"]["ok"]
    # diffusers' ✓ and ✗ are what load_lora_weights does: the adapter's outputs or not
    assert rep["diffusers"]["ok"] == _diffusers_matches(files, fmt, models), rep["diffusers"]
    assert rep["diffusers"]["ok"] == (fmt == "diffusers" or which == "even_alphas")
    attention = [n for n in adapter.modules if n.startswith("unet.") and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")
                 or n.endswith("to_out.0")]
    assert attention
    if fmt == "kohya":
        assert rep["ComfyUI"]["ok"] and rep["A1111/Forge"]["ok"]
    else:  # every attention projection is one ComfyUI would skip
        assert not rep["ComfyUI"]["ok"] and not rep["A1111/Forge"]["ok"]
        assert rep["ComfyUI"]["why"].startswith(f"{len(attention)} of {len(adapter)} modules")
        assert "--to kohya" in rep["ComfyUI"]["why"]


def test_peft_pipeline_folder_loads_in_peft(pipeline_lora):
    d, models, _, _ = pipeline_lora
    loads = _loads(str(d / "peft"))
    assert loads["PEFT"] and not loads["ComfyUI"] and not loads["diffusers"]
    loaded = PeftModel.from_pretrained(M.unet(), str(d / "peft" / "unet")).eval()
    torch.testing.assert_close(M.unet_out(loaded), M.unet_out(models["unet"]), rtol=1e-5, atol=1e-5)


def test_llm_adapter_and_llama_cpp(tmp_path, capsys):
    peft_adapter(tiny_llama(), str(tmp_path / "a"), target_modules=["q_proj", "v_proj"], alpha_pattern={"v_proj": 2})
    loads = inspect(str(tmp_path / "a")).to_dict()["loads_in"]
    assert loads["PEFT"]["ok"] and not loads["diffusers"]["ok"] and not loads["ComfyUI"]["ok"]
    assert not loads["llama.cpp converter"]["ok"] and "--uniform-scale" in loads["llama.cpp converter"]["why"]
    PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))  # the PEFT ✓
    code, _, err = run_cli(capsys, "convert", tmp_path / "a", "--to", "peft", "--uniform-scale", "-o", tmp_path / "u")
    assert code == 0, err
    assert _loads(str(tmp_path / "u"))["llama.cpp converter"]
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "u", "--summary")
    line = next(x for x in out.splitlines() if x.startswith("loads in"))
    assert "PEFT ✓" in line and "llama.cpp converter ✓" in line and "ComfyUI ✗" in line
    assert "✗ ComfyUI: ComfyUI loads diffusion-model LoRAs" in out
    peft_adapter(tiny_llama(), str(tmp_path / "d"), use_dora=True)
    assert not _loads(str(tmp_path / "d"))["llama.cpp converter"]
    assert os.path.isdir(tmp_path / "u")


def test_flux_comfyui_file(tmp_path):
    src = str(tmp_path / "k.safetensors")
    safetensors_io.save(src, _flux.kohya_lora(_flux.transformer()), {"ss_base_model_version": "flux1"})
    out = write_adapter(read_adapter(src), str(tmp_path / "c.safetensors"), format="comfyui")
    loads = _loads(out)
    assert loads["ComfyUI"] and loads["diffusers"] and not loads["PEFT"] and not loads["llama.cpp converter"]
    # Forge's Flux map takes `diffusion_model.` original names and diffusers' `transformer.` ones
    diffusers = write_adapter(read_adapter(src), str(tmp_path / "d.safetensors"), format="diffusers")
    assert loads["A1111/Forge"] and _loads(diffusers)["A1111/Forge"]
