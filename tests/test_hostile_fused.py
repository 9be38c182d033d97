"""Regressions from a hostile review of the fused-projection wave (`--fused-rank`, LyCORIS on DiT families, FLUX.2):
each attack that once got through. Every refusal is one line, exit 1, with no output left and the input unchanged."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

from safetensors.torch import save_file

from loratools import merge, safetensors_io
from loratools.formats import read_adapter
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


def test_a_flux2_lycoris_file_in_original_names_is_read_as_flux2(tmp_path):
    """FLUX.2's widths (linear1 9·hidden, img_mlp.0 6·hidden) tell it from Flux.1 in plain kohya files; a LyCORIS file
    of the same names was read as Flux.1 (its LoKr tensors gave no shape): linear1 split as Flux.1's q, k, v, mlp and
    every FLUX.2 base refused it as a "Flux LoRA". Oracle: lycoris-lora's own LoKr ΔW, added to the single file."""
    lokr = pytest.importorskip("lycoris.functional.lokr")
    sd = _flux2.original_state_dict(_flux2.tiny())
    g = torch.Generator().manual_seed(0)
    tensors, want = {}, {}
    for name in ("single_blocks.0.linear1", "double_blocks.0.img_mlp.0", "double_blocks.0.img_attn.qkv"):
        rows, cols = sd[f"{name}.weight"].shape
        w1, w2a, w2b = (torch.randn(*s, generator=g) * 0.1 for s in ((rows // 8, 2), (8, 2), (2, cols // 2)))
        ln = "lora_unet_" + name.replace(".", "_")
        tensors.update({f"{ln}.lokr_w1": w1, f"{ln}.lokr_w2_a": w2a, f"{ln}.lokr_w2_b": w2b,
                        f"{ln}.alpha": torch.tensor(3.0)})
        want[f"{name}.weight"] = sd[f"{name}.weight"] + lokr.diff_weight(w1, None, None, None, w2a, w2b, None,
                                                                          gamma=3.0)  # its scale: gamma / rank
    path = tmp_path / "flux2_lokr.safetensors"
    save_file(tensors, str(path))
    names = set(read_adapter(str(path)).modules)
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj" in names, names
    assert "transformer.transformer_blocks.0.ff.linear_in" in names, names
    base = tmp_path / "flux2.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(base))
    merge(str(base), [str(path)], str(tmp_path / "out.safetensors"))
    got, _ = safetensors_io.load(str(tmp_path / "out.safetensors"))
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=1e-5, atol=1e-6, msg=key)
