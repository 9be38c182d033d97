"""MoE adapters (issue 18 §4): PEFT `target_parameters` LoRAs on 3-D fused expert stacks
(lora.ParamWrapper) and ordinary LoRAs on per-expert linears, checked against PEFT's own
merge_and_unload on tiny transformers MoE models built here: Qwen3-MoE (experts [E, out, in],
stored unfused per expert in its checkpoint), Mixtral (likewise, as block_sparse_moe w1/w3/w2) and
gpt-oss (experts [E, in, out], stored fused)."""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import (GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

from _late_backend import use_late_backend
from _tiny import load_folder, peft_adapter, run_cli as run, save_base
from loratools import read_adapter, write_adapter
from loratools.merging import merge

EXPERTS = 4
TARGET_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def qwen3_moe():
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=12,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         num_experts=EXPERTS, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen3MoeForCausalLM(cfg).eval()


def gpt_oss():
    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=EXPERTS,
                       num_experts_per_tok=2, layer_types=["full_attention", "full_attention"])
    return GptOssForCausalLM(cfg).eval()


def mixtral():
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=EXPERTS,
                        num_experts_per_tok=2)
    return MixtralForCausalLM(cfg).eval()


MODELS = {"qwen3_moe": qwen3_moe, "gpt_oss": gpt_oss, "mixtral": mixtral}


def peft_merged(model, adapter_dir, folder):
    """PEFT's merge_and_unload of the saved adapter, saved as transformers saves the model."""
    merged = PeftModel.from_pretrained(copy.deepcopy(model), adapter_dir).merge_and_unload()
    save_base(merged, folder)
    return load_folder(folder)


@pytest.fixture(scope="module", params=sorted(MODELS))
def moe(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = MODELS[request.param]()
    save_base(model, root / "base")
    peft_adapter(model, root / "lora", r=2, lora_alpha=6, target_modules=["q_proj"],
                 target_parameters=TARGET_PARAMS)
    want = peft_merged(model, root / "lora", root / "peft_merged")
    return request.param, model, root, want


def assert_same(got: dict, want: dict, names=None):
    assert set(got) == set(want)
    for k in names or want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_read_and_inspect_per_expert_modules(moe, capsys):
    kind, model, root, _ = moe
    lora = read_adapter(root / "lora")
    stacks = [m for m in lora if m.expert is not None]
    assert len(stacks) == 2 * 2 * EXPERTS  # two layers, two stacks, four experts
    assert {m.param for m in stacks} == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                         for p in ("gate_up_proj", "down_proj")}
    assert all(m.rank == 2 and m.scale == 3.0 for m in lora)
    code, out, err = run(capsys, "inspect", root / "lora", "--format", "json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["modules"] == len(lora) and "model.layers.1.mlp.experts.down_proj.3" in out


def test_merge_matches_peft(moe, tmp_path, capsys):
    kind, model, root, want = moe
    code, _, err = run(capsys, "merge", root / "base", root / "lora", "-o", tmp_path / "m")
    assert code == 0, err
    got = load_folder(tmp_path / "m")
    changed = [k for k in want if not torch.equal(want[k], load_folder(root / "base")[k])]
    assert any("experts" in k for k in changed) and any("q_proj" in k for k in changed)
    assert_same(got, want)


def test_merge_streamed_on_the_gpu_path(moe, tmp_path, monkeypatch):
    """merge --device cuda (on a CPU stand-in for CUDA, tests/_late_backend.py): the expert stacks,
    merged slice by slice, stream through the GPU pipeline to PEFT's result and the CPU merge's bytes."""
    kind, model, root, want = moe
    made = use_late_backend(monkeypatch)
    merge(root / "base", [root / "lora"], tmp_path / "cpu", device="cpu")
    plan = merge(root / "base", [root / "lora"], tmp_path / "gpu", device="cuda")
    assert sum(b.h2d for b in made) == len(plan.terms) and any("experts" in n for n in plan.terms)
    assert_same(load_folder(tmp_path / "gpu"), want)
    for f in os.listdir(tmp_path / "cpu"):
        assert (tmp_path / "gpu" / f).read_bytes() == (tmp_path / "cpu" / f).read_bytes(), f


def test_merge_undo_and_validate(moe, tmp_path, capsys):
    kind, model, root, _ = moe
    code, out, err = run(capsys, "validate", root / "lora", "--base", root / "base")
    assert code == 0 and "ok" in err, err
    run(capsys, "merge", root / "base", root / "lora", "-o", tmp_path / "m")
    code, _, err = run(capsys, "merge", tmp_path / "m", root / "lora:-1", "-o", tmp_path / "back")
    assert code == 0, err
    assert_same(load_folder(tmp_path / "back"), load_folder(root / "base"))


def test_write_round_trip_loads_in_peft(moe, tmp_path, capsys):
    """loratools writes target_parameters adapters PEFT loads: same merged model."""
    kind, model, root, want = moe
    code, _, err = run(capsys, "convert", root / "lora", "-o", tmp_path / "copy", "--to", "peft")
    assert code == 0, err
    config = json.loads((tmp_path / "copy" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(TARGET_PARAMS)
    assert_same(peft_merged(model, tmp_path / "copy", tmp_path / "pm"), want)


def _dense(lora):
    return {m.name: m.dense_delta() for m in lora}


def test_resize_per_expert(moe, tmp_path, capsys):
    """Rank 1 per expert is the best rank-1 approximation of each expert's update; PEFT loads it."""
    kind, model, root, _ = moe
    code, _, err = run(capsys, "resize", root / "lora", "-o", tmp_path / "r1", "--rank", "1")
    assert code == 0, err
    before, after = _dense(read_adapter(root / "lora")), _dense(read_adapter(tmp_path / "r1"))
    for name, d in before.items():
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        best = (u[:, :1] * s[:1]) @ vh[:1]
        torch.testing.assert_close(after[name].double(), best, rtol=1e-4, atol=1e-6, msg=name)
    merged = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "r1").merge_and_unload()
    base = dict(model.named_parameters())
    lora = read_adapter(tmp_path / "r1", transposed_experts=kind == "gpt_oss")  # as the base would say
    after = _dense(lora)
    for m in lora:
        if m.expert is None:
            continue
        delta = dict(merged.named_parameters())[m.param][m.expert] - base[m.param][m.expert]
        torch.testing.assert_close(delta, after[m.name], rtol=1e-4, atol=1e-5, msg=m.name)


def test_blend_cat_halves(moe, tmp_path, capsys):
    """Two halves of one adapter, concatenated, merge to the adapter itself (PEFT's merge)."""
    kind, model, root, want = moe
    code, _, err = run(capsys, "blend", root / "lora:0.5", root / "lora:0.5", "--method", "cat",
                       "-o", tmp_path / "b")
    assert code == 0, err
    assert all(m.rank == 4 for m in read_adapter(tmp_path / "b"))
    assert_same(peft_merged(model, tmp_path / "b", tmp_path / "bm"), want)


def test_unfused_expert_linears(tmp_path, capsys):
    """Ordinary per-expert LoRAs on a checkpoint's per-expert linears (as Qwen3-MoE stores them)."""
    model = qwen3_moe()
    save_base(model, tmp_path / "base")
    stored = load_folder(tmp_path / "base")
    assert "model.layers.0.mlp.experts.2.gate_proj.weight" in stored
    torch.manual_seed(3)
    lora = {}
    for e in range(EXPERTS):
        for proj, (out, inp) in {"gate_proj": (12, 16), "up_proj": (12, 16), "down_proj": (16, 12)}.items():
            name = f"base_model.model.model.layers.1.mlp.experts.{e}.{proj}"
            lora[name + ".lora_A.weight"] = torch.randn(2, inp)
            lora[name + ".lora_B.weight"] = torch.randn(out, 2)
    folder = tmp_path / "lora"
    folder.mkdir()
    save_file(lora, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            "target_modules": ["gate_proj", "up_proj", "down_proj"]}))
    code, _, err = run(capsys, "merge", tmp_path / "base", folder, "-o", tmp_path / "m")
    assert code == 0, err
    got = load_folder(tmp_path / "m")
    for e in range(EXPERTS):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            key = f"model.layers.1.mlp.experts.{e}.{proj}"
            want = stored[key + ".weight"] + 2.0 * lora[f"base_model.model.{key}.lora_B.weight"] @ \
                lora[f"base_model.model.{key}.lora_A.weight"]
            torch.testing.assert_close(got[key + ".weight"], want, rtol=1e-5, atol=1e-6)


def test_refusals(moe, tmp_path, capsys):
    """Expert stacks written to a format without keys for them, and factors that hold no whole number
    of experts: one line each, nothing written."""
    kind, model, root, _ = moe
    code, _, err = run(capsys, "convert", root / "lora", "-o", tmp_path / "k.safetensors", "--to", "kohya")
    assert code == 1 and "written as PEFT only" in err and "Traceback" not in err, err
    assert not (tmp_path / "k.safetensors").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((root / "lora" / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(dict(config, r=3)))
    (broken / "adapter_model.safetensors").write_bytes((root / "lora" / "adapter_model.safetensors").read_bytes())
    code, _, err = run(capsys, "inspect", broken)
    assert code == 1 and "whole number of experts" in err, err


def test_uneven_expert_ranks_written_exactly(moe, tmp_path, capsys):
    """Experts of one stack with different ranks and scales (a dynamic resize) share PEFT's one rank and
    alpha: padded with zeros, scale folded into lora_B; PEFT merges what loratools merges."""
    kind, model, root, _ = moe
    lora = read_adapter(root / "lora", transposed_experts=kind == "gpt_oss")
    name = "model.layers.1.mlp.experts.down_proj.2"
    m = lora.modules[name]
    lora.modules[name] = dataclasses.replace(m, down=m.down[:1].clone(), up=m.up[:, :1].clone(), alpha=5.0)
    write_adapter(lora, tmp_path / "uneven", format="peft")
    back = read_adapter(tmp_path / "uneven", transposed_experts=kind == "gpt_oss")
    for mod in lora:
        torch.testing.assert_close(back.modules[mod.name].dense_delta(), mod.dense_delta(), rtol=1e-6, atol=1e-7)
    code, _, err = run(capsys, "merge", root / "base", tmp_path / "uneven", "-o", tmp_path / "m")
    assert code == 0, err
    assert_same(load_folder(tmp_path / "m"), peft_merged(model, tmp_path / "uneven", tmp_path / "pm"))
