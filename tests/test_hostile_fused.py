"""Regressions from a hostile review of the fused-projection wave (`--fused-rank`, LyCORIS on DiT families, FLUX.2):
each attack that once got through. Every refusal is one line, exit 1, with no output left and the input unchanged."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

from safetensors.torch import save_file

from loratools import safetensors_io
from tests import _flux, _flux2
from tests._tiny import run_cli

QKV = "lora_unet_double_blocks_0_img_attn_qkv"  # 3·DIM x DIM in the tiny Flux
ROWS = 3 * _flux.DIM


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _refused(tmp_path, capsys, sd: dict, needle: str) -> None:
    """`convert` and `inspect` of the file refuse it in one line naming `needle`; nothing written, input unchanged."""
    path = tmp_path / "in.safetensors"
    safetensors_io.save(str(path), sd, {"ss_base_model_version": "flux1"})
    before = _digest(path)
    out = tmp_path / "out.safetensors"
    for args in (("convert", path, "--to", "diffusers", "-o", out), ("inspect", path)):
        code, _, err = run_cli(capsys, *args)
        assert code == 1 and needle in err and "\n" not in err.strip() and "Traceback" not in err, err
    assert not out.exists() and _digest(path) == before
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


@pytest.mark.parametrize("diff,bias,needle", [
    ((ROWS - 1, _flux.DIM), None, "rows do not split"),  # was "RuntimeError: split_with_sizes expects …"
    ((ROWS, _flux.DIM), (ROWS - 1,), "bias update has shape"),  # idem
    ((ROWS * _flux.DIM,), None, "which no weight has"),  # a 1-D diff: was an IndexError
])
def test_full_diff_on_a_fused_module_of_the_wrong_shape(tmp_path, capsys, diff, bias, needle):
    sd = {QKV + ".diff": _randn(*diff)}
    if bias is not None:
        sd[QKV + ".diff_b"] = _randn(*bias)
    _refused(tmp_path, capsys, sd, needle)


def test_one_module_under_its_kohya_and_its_dotted_name_is_refused(tmp_path, capsys):
    """Both names became the same kohya module and the dotted one silently replaced the other."""
    lokr = {"lokr_w1": _randn(4, 4), "lokr_w2_a": _randn(12, 2), "lokr_w2_b": _randn(2, 4), "alpha": torch.tensor(2.)}
    sd = {f"{QKV}.{k}": v for k, v in lokr.items()}
    sd.update({f"diffusion_model.double_blocks.0.img_attn.qkv.{k}": v * 2 for k, v in lokr.items()})
    _refused(tmp_path, capsys, sd, "appears twice")


def test_a_flux2_lora_on_qkv_only_is_not_called_flux1_by_a_wider_flux2_file(tmp_path, capsys):
    """Nothing tells a LoRA on the fused qkv only Flux.1's from FLUX.2's; merged into a FLUX.2 file of another width,
    the refusal named it a "Flux LoRA" (the checkpoint's `double_blocks` names read as Flux.1's): now it names the
    shapes. A Flux.1 LoRA that shows its family is still refused by name."""
    base = tmp_path / "flux2_wide.safetensors"
    save_file({k: v.contiguous() for k, v in _flux2.original_state_dict(_flux2.tiny(num_attention_heads=3)).items()},
              str(base))
    qkv = tmp_path / "qkv.safetensors"
    save_file(_flux2.file_layout(_flux2.original_lora(_flux2.tiny(), only=("qkv",)), "kohya"), str(qkv))
    flux1 = tmp_path / "flux1.safetensors"
    safetensors_io.save(str(flux1), _flux.kohya_lora(_flux.transformer()), {})
    before = _digest(base)
    for lora, needle in ((qkv, "the adapter's update has shape (48, 16) but the base weight"),
                         (flux1, "Flux LoRA, FLUX.2 checkpoint")):
        code, _, err = run_cli(capsys, "merge", base, lora, "-o", tmp_path / "out.safetensors")
        assert code == 1 and needle in err and "Flux LoRA" not in err.replace(needle, ""), err
    assert not (tmp_path / "out.safetensors").exists() and _digest(base) == before
