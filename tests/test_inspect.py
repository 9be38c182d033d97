"""`inspect` against PEFT: ranks, alphas, scales, parameter counts and ‖ΔW‖ per module come from
the PeftModel itself (its `get_delta_weight`, `scaling`, `r`, parameters), never from our reader."""
from __future__ import annotations

import json
import os

import pytest
import torch

from _tiny import TinyConvNet, peft_adapter, tiny_llama
from loratools import read_adapter
from loratools.cli.main import main
from loratools.inspection import report

peft = pytest.importorskip("peft")

CASES = {
    "patterns": dict(target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 2},
                     alpha_pattern={"up_proj": 3}),
    "rslora_dora": dict(use_rslora=True, use_dora=True),
    "embed_and_save": dict(target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]),
}


def peft_layers(pm):
    """module name (as in the base) -> PEFT LoRA layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in pm.named_modules():
        if isinstance(mod, LoraLayer):
            out[name.removeprefix("base_model.model.")] = mod
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.parametrize("case", sorted(CASES))
def test_report_matches_peft(model, tmp_path, case):
    pm = peft_adapter(model, str(tmp_path / "a"), **CASES[case])
    rep = report(read_adapter(tmp_path / "a"), path=str(tmp_path / "a"))
    layers = peft_layers(pm)
    rows = {r["name"]: r for r in rep["module_list"]}
    assert set(rows) == set(layers) and rep["modules"] == len(layers)
    for name, layer in layers.items():
        row = rows[name]
        assert row["rank"] == layer.r["default"]
        assert row["scale"] == pytest.approx(layer.scaling["default"], rel=1e-12)
        expected = torch.linalg.vector_norm(layer.get_delta_weight("default").double()).item()
        assert row["delta_norm"] == pytest.approx(expected, rel=1e-5), name
    # the modules that differ from the common rank / alpha are exactly the patterned ones
    ranks = {n: layer.r["default"] for n, layer in layers.items()}
    assert rep["rank"]["differs"] == {n: r for n, r in ranks.items() if r != rep["rank"]["common"]}
    lora_params = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert rep["lora_parameters"] == lora_params
    from safetensors.torch import load_file  # every tensor in the file (modules_to_save, saved embeddings)

    assert rep["parameters"] == sum(t.numel() for t in load_file(tmp_path / "a" / "adapter_model.safetensors").values())
    assert rep["dora"] == bool(CASES[case].get("use_dora"))
    on_disk = os.path.getsize(tmp_path / "a" / "adapter_model.safetensors")
    assert rep["bytes"] < on_disk < rep["bytes"] + 20_000  # tensors + header


def test_conv_and_tucker_norms(tmp_path):
    from loratools.adapter import LoraModule

    torch.manual_seed(0)
    pm = peft_adapter(TinyConvNet(), str(tmp_path / "c"), target_modules=["conv1", "conv2", "head"])
    rep = report(read_adapter(tmp_path / "c"))
    for name, layer in peft_layers(pm).items():
        row = next(r for r in rep["module_list"] if r["name"] == name)
        expected = torch.linalg.vector_norm(layer.get_delta_weight("default").double()).item()
        assert row["delta_norm"] == pytest.approx(expected, rel=1e-5)
    # Tucker (kohya LoCon lora_mid): against the dense einsum of the three factors
    up, mid, down = torch.randn(6, 3, 1, 1), torch.randn(3, 3, 3, 3), torch.randn(3, 5, 1, 1)
    m = LoraModule("t", down=down, up=up, alpha=2.0, kind="conv", mid=mid)
    dense = torch.einsum("oa,abhw,bi->oihw", up.flatten(1).double(), mid.double(), down.flatten(1).double()) * (2 / 3)
    assert m.delta_norm() == pytest.approx(torch.linalg.vector_norm(dense).item(), rel=1e-6)


def test_cli_table_and_json(model, tmp_path, capsys):
    peft_adapter(model, str(tmp_path / "a"), **CASES["patterns"])
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "format      peft" in out and "rank        4 (2 module(s) differ, 2..4" in out
    assert "model.layers.1.self_attn.v_proj" in out and "|ΔW|" in out
    assert main(["inspect", str(tmp_path / "a"), "--format", "json", "--summary"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["modules"] == 6 and data["targets"] == {"q_proj": 2, "up_proj": 2, "v_proj": 2}
    assert data["alpha"]["differs"] == {"model.layers.0.mlp.up_proj": 3, "model.layers.1.mlp.up_proj": 3}
    assert "module_list" not in data and data["problems"] == []


def test_json_has_no_nan_for_a_broken_adapter(model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    peft_adapter(model, str(tmp_path / "a"))
    path = tmp_path / "a" / "adapter_model.safetensors"
    sd = load_file(path)
    next(v for k, v in sorted(sd.items()) if k.endswith("lora_A.weight"))[0, 0] = float("nan")
    save_file(sd, path)
    assert main(["inspect", str(tmp_path / "a"), "--format", "json"]) == 0
    out = capsys.readouterr().out
    def no_constants(c):  # strict JSON: NaN / Infinity would not parse in most languages
        raise AssertionError(f"{c} in the JSON output")

    data = json.loads(out, parse_constant=no_constants)
    assert data["delta_norm_total"] is None
    assert [p["code"] for p in data["problems"]] == ["non-finite"]
