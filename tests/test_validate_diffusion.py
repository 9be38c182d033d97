"""`validate --base` takes every base `merge` takes (diffusers pipeline folders, single-file SD
checkpoints), and a LoRA for another family is named as such ("SDXL LoRA, SD 1.x checkpoint").

Oracle for the base weights validate reads: diffusers' own single-file converters.
"""
from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file

from _tiny import run_cli as run
from loratools import write_adapter
from loratools.bases import open_base
from test_merge_diffusion import Case, build_single_file, from_single_file, _text_model

pytestmark = pytest.mark.filterwarnings("ignore:loratools._C is not built:RuntimeWarning")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("validate_diffusion")
    out = {}
    for arch in ("sd1", "sdxl"):
        case = Case(arch, str(tmp))
        pipe, single = str(tmp / f"{arch}-pipe"), str(tmp / f"{arch}.safetensors")
        case.pipeline().save_pretrained(pipe)
        build_single_file(case, single)
        kohya = str(tmp / f"{arch}-kohya.safetensors")
        write_adapter(case.adapter(), kohya, format="kohya")
        out[arch] = dict(case=case, pipe=pipe, single=single, kohya=kohya)
    return out


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", ["pipe", "single"])
def test_validate_base_accepts_what_merge_accepts(bases, tmp_path, capsys, arch, kind):
    b = bases[arch]
    for adapter in (b["case"].lora_file, b["kohya"]):
        code, out, err = run(capsys, "validate", adapter, "--base", b[kind])
        assert (code, out) == (0, ""), (adapter, out, err)
        assert err.strip().endswith(f"module(s) checked against {b[kind]})")
    # and merge goes ahead where validate did
    assert run(capsys, "merge", b[kind], b["kohya"], "-o", tmp_path / "m.safetensors" if kind == "single"
               else tmp_path / "m", "-q")[0] == 0


def test_single_file_base_reads_the_weights_diffusers_converts(bases):
    """The virtual weights validate compares ‖ΔW‖ with (fused q/k/v rows, transposed projections)."""
    b = bases["sdxl"]
    base = open_base(b["single"])
    want = {c: _text_model(sd) if c != "unet" else sd
            for c, sd in from_single_file(b["case"], load_file(b["single"])).items()}
    names = [m.name for m in b["case"].adapter()]
    assert any("text_encoder_2" in n and "q_proj" in n for n in names)
    for name in names:
        comp, _, rest = name.partition(".")
        assert base.read(name + ".weight").equal(want[comp][rest + ".weight"]), name


@pytest.mark.parametrize("kind", ["pipe", "single"])
def test_family_mismatch_is_named(bases, tmp_path, capsys, kind):
    sd1 = bases["sd1"][kind]
    noun = "checkpoint" if kind == "single" else "pipeline"
    for adapter in (bases["sdxl"]["kohya"], bases["sdxl"]["case"].lora_file):
        code, _, err = run(capsys, "merge", sd1, adapter, "-o", tmp_path / "never")
        assert code == 1 and err.startswith(f"loratools: error: SDXL LoRA, SD 1.x {noun}") and err.count("\n") == 1
        code, out, err = run(capsys, "validate", adapter, "--base", sd1)
        assert code == 1 and out.startswith(f"error: SDXL LoRA, SD 1.x {noun} (the adapter was made for another model")
    assert not os.path.exists(tmp_path / "never")
