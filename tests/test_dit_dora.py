"""DoRA in original-names files (kohya / ComfyUI `dora_scale`) for Flux.1 and SD3: read, written back
bit-exactly, merged into single-file checkpoints and pipeline folders, against the dense reference.

Two forms exist. kohya/LyCORIS `wd_on_output` files store `dora_scale` [out, 1]: the magnitude of each output
row, PEFT's DoRA (W' = m · V / ||V||_row, V = W + ΔW); it splits onto fused q/k/v parts row by row. ComfyUI
(comfy/weight_adapter/base.py `weight_decompose`) and LyCORIS' default store [1, in]: each input column is
normed over all rows of the (fused) weight, so that form stays on the original module."""
from __future__ import annotations

import json
import os

import pytest
import torch

from loratools import LoraModule, merge, safetensors_io
from loratools.adapter import LoraAdapter
from loratools.checkpoint import Checkpoint
from loratools.errors import IncompatibleError
from loratools.formats import read_adapter, write_adapter
from loratools.loaders import compatibility
from tests import _flux, _sd3
from tests._dit import assert_round_trip

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")


class Family:
    def __init__(self, name):
        self.name = name
        if name == "flux":
            self.model = _flux.transformer()
            self.kohya = _flux.kohya_lora(self.model)
            self.original = _flux.bfl_state_dict(self.model.state_dict())
            self.to_diffusers, self.meta, self.pipeline = _flux.diffusers_from_bfl, "flux1", "FluxPipeline"
        else:
            self.model = _sd3.transformer()
            names = {n for n, p in _sd3.original_modules(self.model).items()
                     if len(_sd3.weight_shapes(self.model)[p[0]]) == 2}
            self.kohya = _sd3.kohya_lora(self.model, names=names)
            self.original = _sd3.original_state_dict(self.model.state_dict())
            self.to_diffusers, self.meta = _sd3.diffusers_from_original, "sd3"
            self.pipeline = "StableDiffusion3Pipeline"

    def modules(self):
        """kohya name -> (original weight key, ΔW in fp64)."""
        out = {}
        for ln in {k.split(".")[0] for k in self.kohya}:
            flat = ln[len("lora_unet_"):]
            key = next(k for k in self.original if k.endswith(".weight") and k[:-7].replace(".", "_") == flat)
            out[ln] = (key, _sd3.delta(self.kohya, ln, self.original[key].shape))
        return out


@pytest.fixture(scope="module", params=["flux", "sd3"])
def family(request):
    return Family(request.param)


def _with_dora(fam, axis):
    """The family's kohya LoRA with a positive `dora_scale` on every module: per output row ([out, 1]) or per
    input column ([1, in])."""
    g = torch.Generator().manual_seed(7)
    sd = dict(fam.kohya)
    for ln, (key, _) in fam.modules().items():
        rows, cols = fam.original[key].shape
        shape = (rows, 1) if axis == "row" else (1, cols)
        sd[ln + ".dora_scale"] = 0.5 + torch.rand(shape, generator=g)
    return sd


def _dense_merge(fam, sd, axis):
    """The reference in the original layout, fp64: W' = m · V / ||V|| (V = W + ΔW), rows or columns."""
    out = {k: v.double() for k, v in fam.original.items()}
    for ln, (key, delta) in fam.modules().items():
        v = out[key] + delta
        norm = v.norm(dim=1, keepdim=True) if axis == "row" else v.norm(dim=0, keepdim=True)
        out[key] = sd[ln + ".dora_scale"].double() / norm * v
    return out


def _single_file(tmp_path, fam):
    base = tmp_path / f"{fam.name}.safetensors"
    safetensors_io.save(str(base), {"model.diffusion_model." + k: v.clone() for k, v in fam.original.items()}, {})
    return str(base)


def _pipeline_folder(tmp_path, fam):
    root = tmp_path / "pipe"
    fam.model.save_pretrained(root / "transformer")
    with open(root / "model_index.json", "w") as f:
        json.dump({"_class_name": fam.pipeline, "transformer": ["x", "y"]}, f)
    return str(root)


@pytest.mark.parametrize("axis", ["row", "column"])
def test_dora_merges_into_single_file_as_the_dense_math(family, tmp_path, axis):
    sd = _with_dora(family, axis)
    path = tmp_path / "dora.safetensors"
    safetensors_io.save(str(path), sd, {"ss_base_model_version": family.meta})
    adapter = read_adapter(str(path))
    fused = [m for m in adapter if m.op is not None and m.name.endswith((".qkv", ".linear1"))]
    assert (len(fused) > 0) == (axis == "column")  # a column-normed DoRA stays on the fused module
    out = tmp_path / "merged.safetensors"
    merge(_single_file(tmp_path, family), [str(path)], str(out))
    got, _ = safetensors_io.load(str(out))
    want = _dense_merge(family, sd, axis)
    for k, v in want.items():
        torch.testing.assert_close(got["model.diffusion_model." + k].double(), v, rtol=1e-5, atol=1e-5, msg=k)
    if axis == "column":  # its norm spans q, k and v: no diffusers module holds it
        with pytest.raises(IncompatibleError, match="single-file checkpoint"):
            merge(_pipeline_folder(tmp_path, family), [str(path)], str(tmp_path / "pipe_out"))
        assert not os.path.exists(tmp_path / "pipe_out")


def test_row_dora_splits_exactly_onto_diffusers_modules(family, tmp_path):
    sd = _with_dora(family, "row")
    path = tmp_path / "dora.safetensors"
    safetensors_io.save(str(path), sd, {"ss_base_model_version": family.meta})
    out = tmp_path / "merged"
    merge(_pipeline_folder(tmp_path, family), [str(path)], str(out))
    got = Checkpoint(str(out / "transformer"))
    # the dense reference in the original layout, converted by diffusers' own single-file converter
    want = family.to_diffusers({k: v.float() for k, v in _dense_merge(family, sd, "row").items()})
    for k, v in want.items():
        torch.testing.assert_close(got.read(k), v, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("axis", ["row", "column"])
def test_dora_round_trips_are_bit_exact(family, tmp_path, axis):
    sd = {k: v.to(torch.bfloat16) for k, v in _with_dora(family, axis).items()}
    path = tmp_path / "dora.safetensors"
    safetensors_io.save(str(path), sd, {"ss_base_model_version": family.meta})
    adapter = read_adapter(str(path))
    chain = ("kohya", "diffusers") if axis == "row" else ("kohya", "comfyui")
    for fmt in chain:
        assert_round_trip(adapter, sd, fmt, tmp_path)
    loads = compatibility(adapter)["ComfyUI"]
    assert loads["ok"] == (axis == "column")  # ComfyUI norms an [out, 1] dora_scale with W, not W + ΔW
    if axis == "row":  # so no ComfyUI file is written for a per-row magnitude
        with pytest.raises(IncompatibleError, match="not W"):
            write_adapter(adapter, tmp_path / "c.safetensors", format="comfyui")
        assert not os.path.exists(tmp_path / "c.safetensors")
    else:
        keys = set(safetensors_io.load(str(tmp_path / "a.comfyui.safetensors"))[0])
        assert any(k.startswith("diffusion_model.") and k.endswith("qkv.dora_scale") for k in keys)


def test_dora_on_some_parts_only_is_not_fused(tmp_path):
    g = torch.Generator().manual_seed(3)
    mods = {}
    for n in ("attn.to_q", "attn.to_k", "attn.to_v"):
        name = f"transformer.transformer_blocks.0.{n}"
        mods[name] = LoraModule(name, torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), 2.0,
                                magnitude=torch.rand(16, generator=g) + 0.5 if n == "attn.to_q" else None)
    adapter = LoraAdapter(modules=mods, metadata={"ss_base_model_version": "sd3"})
    with pytest.raises(IncompatibleError, match="DoRA on some of"):
        write_adapter(adapter, tmp_path / "k.safetensors", format="kohya")
    assert not os.path.exists(tmp_path / "k.safetensors")
