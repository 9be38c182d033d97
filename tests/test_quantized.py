"""Quantized bases: bitsandbytes 4-bit (NF4/FP4, with and without double quantization) and 8-bit
checkpoints saved by transformers on CPU, and FP8 checkpoints. Oracles: bitsandbytes' own
dequantization (its C++ CPU kernel on the flattened weight and its pure-torch backend), transformers'
FP8 dequantization, PEFT's merge_and_unload on the dequantized model, transformers loading the output.

Sizes are chosen so rows (40, 56) are not multiples of bitsandbytes' 64-value blocks and the last
block of most weights is partial: blocks run over the flattened weight, not per row.
"""
from __future__ import annotations

import json
import os

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from bitsandbytes.backends.default import ops as bnb_torch_ops
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

from _tiny import load_folder, peft_adapter, run_cli as run, save_base, tiny_llama
from loratools import read_adapter
from loratools.bases import QuantizedBase, open_base

SIZES = dict(hidden_size=40, intermediate_size=56)
BNB = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
TARGETS = ["q_proj", "k_proj", "down_proj", "gate_proj"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    model = tiny_llama(**SIZES)
    save_base(model, str(root / "base"))
    peft_adapter(model, str(root / "lora"), target_modules=TARGETS)
    for name, cfg in BNB.items():  # saved before any forward (a CPU forward repacks 4-bit weights)
        q = AutoModelForCausalLM.from_pretrained(root / "base", quantization_config=BitsAndBytesConfig(**cfg),
                                                 device_map="cpu")
        q.save_pretrained(root / name)
    return root


def bnb_dequantize(base: QuantizedBase, name: str) -> torch.Tensor:
    """bitsandbytes' own dequantization of one weight of a transformers-saved checkpoint."""
    qw = base.weights[name]
    if qw.scheme == "bnb-int8":
        return bnb_functional.int8_vectorwise_dequant(base.ckpt.read(qw.parts["data"]), base.ckpt.read(qw.parts["scb"]))
    parts = {p[len(name) + 1:]: base.ckpt.read(p) for p in qw.parts.values() if p != name}
    data = base.ckpt.read(name)
    state = bnb_functional.QuantState.from_dict(parts, device=torch.device("cpu"))
    shape, n = state.shape, state.shape.numel()
    # its CPU kernel indexes blocks per row: give it the flattened weight as one row
    state.shape = torch.Size([1, n])
    kernel = bnb_functional.dequantize_4bit(data, state).reshape(shape)
    absmax = state.absmax.float()
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    plain = getattr(bnb_torch_ops._dequantize_4bit_compute, "__wrapped__", bnb_torch_ops._dequantize_4bit_compute)
    torch_backend = plain(data.reshape(-1), absmax, state.code, state.blocksize, (n,), torch.float32).reshape(shape)
    assert torch.equal(kernel, torch_backend)
    return kernel


@pytest.mark.parametrize("kind", list(BNB))
def test_dequantize_matches_bitsandbytes(models, kind):
    base = open_base(str(models / kind))
    assert isinstance(base, QuantizedBase)
    assert len(base.weights) == 14  # 7 linears per layer, lm_head stays unquantized
    plain = load_folder(models / "base")
    for name in base.weights:
        ours = base.read(name)
        assert ours.shape == plain[name].shape and ours.dtype == torch.float32
        assert torch.equal(ours, bnb_dequantize(base, name)), name
        err = float((ours - plain[name]).norm() / plain[name].norm())
        assert 0 < err < (0.02 if kind == "int8" else 0.2), (name, err)  # quantized, but the same weight
    assert "model.embed_tokens.weight" in base and "lm_head.weight" in base
    assert not any(p in base for qw in base.weights.values() for p in qw.parts.values() if p != qw.name)


def dequantized_peft_merge(models, kind):
    """PEFT merge_and_unload on the fp32 model whose quantized weights hold bitsandbytes' values."""
    base = open_base(str(models / kind))
    model = AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in base.weights:
            params[name].copy_(bnb_dequantize(base, name))
    merged = PeftModel.from_pretrained(model, models / "lora").merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("kind", list(BNB))
def test_merge_dequantizes_like_peft(models, tmp_path, capsys, kind):
    code, out, err = run(capsys, "merge", models / kind, models / "lora", "-o", tmp_path / "fp32", "--dtype", "fp32")
    assert code == 0, err
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype", config.get("torch_dtype")) == "float32"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")  # plain from_pretrained, no bitsandbytes
    ours = {k: v.detach() for k, v in loaded.state_dict().items()}
    want = dequantized_peft_merge(models, kind)
    assert set(ours) == set(want)
    for k in want:
        torch.testing.assert_close(ours[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    files = load_folder(tmp_path / "fp32")
    assert not any(k.endswith((".SCB", ".absmax", ".quant_map", "weight_format")) or "quant_state" in k for k in files)
    # default: bf16
    code, _, err = run(capsys, "merge", models / kind, models / "lora", "-o", tmp_path / "bf16", "-q")
    assert code == 0, err
    bf16 = load_folder(tmp_path / "bf16")
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    assert torch.equal(bf16["model.layers.0.self_attn.q_proj.weight"],
                       want["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("kind", ["nf4-dq", "nf4", "int8"])
def test_requantize_same_format(models, tmp_path, capsys, kind):
    code, _, err = run(capsys, "merge", models / kind, models / "lora", "-o", tmp_path / "rq", "--requantize")
    assert code == 0, err
    assert "requantized 8 tensor(s) to " in err and ": relative error max" in err
    src, out = load_folder(models / kind), load_folder(tmp_path / "rq")
    assert {k: (v.dtype, v.shape) for k, v in src.items() if "quant_state" not in k} == \
        {k: (v.dtype, v.shape) for k, v in out.items() if "quant_state" not in k}
    assert json.loads((tmp_path / "rq" / "config.json").read_text())["quantization_config"]
    unmerged = "model.layers.0.self_attn.v_proj"
    for k in src:
        if k.startswith(unmerged):
            assert torch.equal(src[k], out[k]), k  # untouched weights keep their bytes
    rq = open_base(str(tmp_path / "rq"))
    want = dequantized_peft_merge(models, kind)
    base = open_base(str(models / kind))
    for name in rq.weights:
        got = rq.read(name)
        assert torch.equal(got, bnb_dequantize(rq, name)), name  # bitsandbytes reads what we wrote
        err_new = float((got - want[name]).norm() / want[name].norm())
        if any(t in name for t in TARGETS):
            err_old = float((base.read(name) - load_folder(models / "base")[name]).norm() / want[name].norm())
            assert 0 < err_new < 3 * err_old + 1e-3, (name, err_new, err_old)  # the quantizer's usual error
    # transformers loads it back as a quantized model
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "rq", device_map="cpu")
    assert type(loaded.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")


def test_detection_and_reports(models, tmp_path, capsys):
    code, out, err = run(capsys, "merge", models / "nf4-dq", models / "lora", "-o", tmp_path / "o", "--dry-run")
    assert code == 0, err
    assert "quantized model folder (bnb-nf4+double-quant (block 64) x 14)" in out and "(bf16)" in out
    code, _, err = run(capsys, "validate", models / "lora", "--base", models / "int8")
    assert code == 0 and "ok (8 module(s) checked" in err, err
    code, _, err = run(capsys, "inspect", models / "fp4-dq")
    assert code == 1 and "a base model" in err and "bnb-fp4+double-quant" in err, err
    code, _, err = run(capsys, "merge", models / "base", models / "lora", "-o", tmp_path / "x", "--requantize")
    assert code == 2 and "--requantize needs a quantized base" in err
    assert not os.path.exists(tmp_path / "x")
    code, _, err = run(capsys, "merge", models / "int8", models / "lora", "-o", tmp_path / "x", "--out-type", "q8_0")
    assert code == 2 and "--out-type q8_0 is for GGUF bases" in err and "--requantize" in err, err
    assert not os.path.exists(tmp_path / "x")


def test_unsupported_quantization_refused(models, tmp_path, capsys):
    folder = tmp_path / "gptq"
    folder.mkdir()
    config = json.loads((models / "base" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(load_folder(models / "base"), str(folder / "model.safetensors"))
    code, _, err = run(capsys, "merge", folder, models / "lora", "-o", tmp_path / "o")
    assert code == 1 and "GPTQ checkpoints cannot be dequantized" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o")


# ---- FP8 --------------------------------------------------------------------------------------


def fp8_checkpoint(models, folder, block):
    """A DeepSeek-V3-style FP8 checkpoint: float8_e4m3fn linears with float32 weight_scale_inv per
    block (or per tensor), quantization_config quant_method fp8."""
    tensors = load_folder(models / "base")
    out = {}
    for name, w in tensors.items():
        if name.endswith("proj.weight"):
            if block is None:
                scale = (w.abs().amax() / 448).reshape(())
                full = scale
            else:
                rows, cols = w.shape
                sr, sc = -(-rows // block[0]), -(-cols // block[1])
                scale = torch.stack([torch.stack([
                    w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].abs().amax() / 448
                    for j in range(sc)]) for i in range(sr)])
                full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
            out[name] = (w / full).to(torch.float8_e4m3fn)
            out[name + "_scale_inv"] = scale.float()
        else:
            out[name] = w.to(torch.bfloat16)
    os.makedirs(folder)
    save_file(out, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((models / "base" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block) if block else None}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return out


@pytest.mark.parametrize("block", [(16, 16), None], ids=["block16", "per-tensor"])
def test_fp8_dequantize_merge_requantize(models, tmp_path, capsys, block):
    raw = fp8_checkpoint(models, str(tmp_path / "fp8"), block)
    base = open_base(str(tmp_path / "fp8"))
    assert len(base.weights) == 14
    for name in base.weights:
        want = _dequantize_fp8_weight(raw[name], raw[name + "_scale_inv"], list(block) if block else None,
                                      torch.float32)
        assert torch.equal(base.read(name), want), name
    code, _, err = run(capsys, "merge", tmp_path / "fp8", models / "lora", "-o", tmp_path / "m", "--dtype", "fp32")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(base.read(k).float())
    want = {k: v.detach() for k, v in PeftModel.from_pretrained(model, models / "lora").merge_and_unload()
            .state_dict().items()}
    ours = {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict().items()}
    for k in want:
        torch.testing.assert_close(ours[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    code, _, err = run(capsys, "merge", tmp_path / "fp8", models / "lora", "-o", tmp_path / "rq", "--requantize")
    assert code == 0, err
    out = load_file(str(tmp_path / "rq" / "model.safetensors"))
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {k: (v.dtype, v.shape) for k, v in raw.items()}
    rq = open_base(str(tmp_path / "rq"))
    for name in rq.weights:
        err_rel = float((rq.read(name) - want[name]).norm() / want[name].norm())
        assert err_rel < 0.05, (name, err_rel)
        if not any(t in name for t in TARGETS):
            assert torch.equal(out[name].view(torch.uint8), raw[name].view(torch.uint8))


def test_fp8_without_scales_is_a_cast(models, tmp_path, capsys):
    """fp8 weights stored without scales (ComfyUI-style casts) are read as they are and merged."""
    tensors = {k: (v.to(torch.float8_e4m3fn) if k.endswith("proj.weight") else v)
               for k, v in load_folder(models / "base").items()}
    os.makedirs(tmp_path / "cast")
    save_file(tensors, str(tmp_path / "cast" / "model.safetensors"))
    base = open_base(str(tmp_path / "cast" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert isinstance(base, QuantizedBase) and torch.equal(base.read(name), tensors[name].float())
    code, _, err = run(capsys, "merge", tmp_path / "cast" / "model.safetensors", models / "lora", "-o", tmp_path / "m",
                       "--dtype", "fp32")
    assert code == 0, err
    delta = load_folder(tmp_path / "m")[name] - tensors[name].float()
    lora = read_adapter(str(models / "lora")).modules["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(delta, lora.dense_delta(), rtol=1e-4, atol=1e-6)
