"""Regressions from a hostile review of the DiT single-file merges: each attack that once got through."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools import merge
from loratools.adapter import LoraAdapter, LoraModule
from loratools.bases.core import Term, merge_tensor
from loratools.errors import IncompatibleError, NonFiniteError
from loratools.quant import QuantWeight, quantize
from tests import _flux
from tests._late_backend import use_late_backend
from tests._tiny import run_cli

QKV = "lora_unet_double_blocks_0_img_attn_qkv"


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_rounding_never_clips_an_overflow(dtype):
    big = torch.finfo(dtype).max
    w = torch.zeros(2, 4, dtype=dtype)
    # a plain LoRA whose B @ A puts 1.2·max in one element
    m = LoraModule(name="m", down=torch.tensor([[1.0, 0, 0, 0]]), up=torch.tensor([[1.2 * big], [0.5]]), alpha=1.0)
    with pytest.raises(NonFiniteError, match="beyond its range"):
        merge_tensor("m.weight", w.clone(), [Term(m, 1.0)], None, dtype)
    # what rounds to max by round-to-nearest is no overflow: kept, bit for bit as torch rounds it
    m.up = torch.tensor([[big * 1.01], [0.5]])
    got = merge_tensor("m.weight", w.clone(), [Term(m, 1.0)], None, dtype)
    assert float(got[0, 0].float()) == big and float(got[1, 0].float()) == 0.5


def test_fp8_flux_file_refuses_a_merge_past_448(tmp_path, capsys):
    model = _flux.transformer()
    bfl = _flux.bfl_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    base = tmp_path / "flux_fp8.safetensors"
    save_file({k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 else v).contiguous() for k, v in bfl.items()}, str(base))
    sd = _flux.kohya_lora(model)
    sd[QKV + ".alpha"] = torch.tensor(1e4)
    lora = tmp_path / "k.safetensors"
    save_file(sd, str(lora), {"ss_base_model_version": "flux1"})
    dense = 1e4 / 4 * sd[QKV + ".lora_up.weight"].double() @ sd[QKV + ".lora_down.weight"].double()
    assert (dense.abs() > 464).any()  # the oracle: the exact sum leaves fp8's range
    before = {p: open(p, "rb").read() for p in (base, lora)}
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "merge", base, lora, "-o", out, "-q")
    assert code == 1 and "beyond its range" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == ["flux_fp8.safetensors", "k.safetensors"]
    assert all(open(p, "rb").read() == b for p, b in before.items())
    sd[QKV + ".alpha"] = torch.tensor(6.0)  # within range: merges
    save_file(sd, str(lora), {"ss_base_model_version": "flux1"})
    merge(str(base), [str(lora)], str(out))
    assert load_file(str(out))["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float8_e4m3fn



def test_unscaled_fp8_requantize_refuses_what_it_would_clip():
    qw = QuantWeight("w", "fp8", {"data": "w"}, (2, 2), torch.bfloat16, {"qdtype": torch.float8_e4m3fn, "block": None})
    like = {"data": torch.zeros(2, 2, dtype=torch.float8_e4m3fn)}
    ok = quantize(qw, torch.tensor([[1.0, -448.0], [460.0, 0.5]]), like)["data"]
    assert ok.float().tolist() == [[1.0, -448.0], [448.0, 0.5]]  # round-to-nearest, as a cast does
    with pytest.raises(NonFiniteError, match="beyond its range"):
        quantize(qw, torch.tensor([[1.0, 600.0], [0.0, 0.0]]), like)


def test_ctrl_c_while_a_class_is_made_is_an_interrupt(tmp_path, capsys, monkeypatch):
    """Ctrl-C that lands in a class body's __set_name__ (a lazy import: dataclass fields) reaches the CLI
    as a RuntimeError in Python 3.11; it is still an interrupt (130), not an unexpected failure (1)."""
    class Field:
        def __set_name__(self, owner, name):
            raise KeyboardInterrupt

    def importing(*args, **kwargs):
        type("Late", (), {"f": Field()})

    monkeypatch.setattr("loratools.cli.merge.open_base", importing)
    base, lora = tmp_path / "b.safetensors", tmp_path / "l.safetensors"
    save_file({"w": torch.zeros(1)}, str(base))
    save_file(_flux.kohya_lora(_flux.transformer()), str(lora))
    code, _, err = run_cli(capsys, "merge", base, lora, "-o", tmp_path / "o.safetensors")
    assert (code, err) == (130, "loratools: interrupted; no output was written\n")
    assert sorted(os.listdir(tmp_path)) == ["b.safetensors", "l.safetensors"]


def test_fused_rows_that_do_not_split_evenly_are_refused_not_cut(tmp_path, capsys):
    """A kohya Flux qkv LoRA with 47 rows: three parts of 15 would silently drop two rows of ΔW."""
    sd = _flux.kohya_lora(_flux.transformer())
    sd[QKV + ".lora_up.weight"] = torch.randn(47, sd[QKV + ".lora_up.weight"].shape[1])
    lora = tmp_path / "k.safetensors"
    save_file(sd, str(lora), {"ss_base_model_version": "flux1"})
    for cmd in (("validate", lora), ("convert", lora, "--to", "diffusers", "-o", tmp_path / "d.safetensors")):
        code, _, err = run_cli(capsys, *cmd)
        assert code == 1 and "47 rows do not split" in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == ["k.safetensors"]


def _flux_file(path, edit=None):
    bfl = _flux.bfl_state_dict({k: v.detach().clone() for k, v in _flux.transformer().state_dict().items()})
    sd = {"model.diffusion_model." + k: v.contiguous() for k, v in bfl.items()}
    save_file(edit(sd) if edit else sd, str(path))


@pytest.mark.parametrize("case", ["1-D qkv", "two prefixes", "bool alpha"])
def test_malformed_flux_single_file_merges_fail_in_one_line(tmp_path, capsys, case):
    key = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    base, lora = tmp_path / "flux.safetensors", tmp_path / "k.safetensors"
    edits = {"1-D qkv": lambda sd: {**sd, key: torch.zeros(768)},  # was an IndexError from the catch-all
             # the bare copy would have been left unmerged beside the merged one
             "two prefixes": lambda sd: {**sd, key[len("model.diffusion_model."):]: sd[key].clone()}}
    _flux_file(base, edits.get(case))
    sd = _flux.kohya_lora(_flux.transformer())
    if case == "bool alpha":  # read as alpha 1
        sd[QKV + ".alpha"] = torch.tensor(True)
    save_file(sd, str(lora), {"ss_base_model_version": "flux1"})
    before = {p: open(p, "rb").read() for p in (base, lora)}
    code, _, err = run_cli(capsys, "merge", base, lora, "-o", tmp_path / "o.safetensors")
    want = {"1-D qkv": "does not split into", "two prefixes": "under two prefixes", "bool alpha": "must be a number"}
    assert code == 1 and want[case] in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["flux.safetensors", "k.safetensors"]
    assert all(open(p, "rb").read() == b for p, b in before.items())


def test_fp8_overflow_is_found_on_the_streamed_device_path_too(tmp_path, monkeypatch):
    """The GPU pipeline defers its finite checks (no sync): the fp8 overflow still fails the merge there, with
    the CPU's message, and an in-range merge streams to the CPU merge's bytes (scheduling driven on the CPU)."""
    late = use_late_backend(monkeypatch)
    model = _flux.transformer()
    bfl = _flux.bfl_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    base = tmp_path / "flux_fp8.safetensors"
    save_file({k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 else v).contiguous() for k, v in bfl.items()}, str(base))
    sd = _flux.kohya_lora(model)
    lora = tmp_path / "k.safetensors"
    save_file(sd, str(lora), {"ss_base_model_version": "flux1"})
    merge(str(base), [str(lora)], str(tmp_path / "cpu.safetensors"), device="cpu")
    merge(str(base), [str(lora)], str(tmp_path / "gpu.safetensors"), device="cuda")
    assert (tmp_path / "gpu.safetensors").read_bytes() == (tmp_path / "cpu.safetensors").read_bytes()
    assert sum(b.h2d for b in late) > 0
    save_file({**sd, QKV + ".alpha": torch.tensor(1e4)}, str(lora), {"ss_base_model_version": "flux1"})
    errors = []
    for device in ("cpu", "cuda"):
        with pytest.raises(NonFiniteError) as e:
            merge(str(base), [str(lora)], str(tmp_path / f"o_{device}.safetensors"), device=device)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "beyond its range" in errors[0]
    assert sorted(os.listdir(tmp_path)) == ["cpu.safetensors", "flux_fp8.safetensors", "gpu.safetensors",
                                            "k.safetensors"]


def test_an_sd_adapter_into_a_dit_file_names_the_files_own_component(tmp_path):
    base = tmp_path / "flux.safetensors"
    _flux_file(base)
    a = LoraAdapter(format="kohya")
    a.add(LoraModule(name="text_encoder.text_model.encoder.layers.0.mlp.fc1", down=torch.ones(2, 16),
                     up=torch.ones(16, 2), alpha=2.0))
    with pytest.raises(IncompatibleError, match=r"e\.g\. transformer\.…; an adapter for another model\?"):
        merge(str(base), [a], str(tmp_path / "o.safetensors"))
    assert os.listdir(tmp_path) == ["flux.safetensors"]
