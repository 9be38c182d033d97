"""`loratools merge BASE.gguf ADAPTER...`: streamed, metadata and order kept, exact for float types,
requantized for block types; checked against PEFT's merged weights and llama.cpp's logits."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from _gguf import gguf, llama_cpp_logits, llama_permute, small_llama, write_llama_gguf
from _tiny import peft_adapter, run_cli, save_base, tiny_llama, ulp

pytest.importorskip("peft")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = [1, 5, 17, 42, 99, 7, 64, 3, 120, 33]
LOGIT_ATOL_F32 = 1e-4  # llama.cpp fp32 kernels vs transformers: measured 1.8e-5 (the adapter moves 8e-2)
# Q8_0: the base's own quantization moves logits by 1.1e-3, base + merge by 1.4e-3 (the adapter: 8e-2)
LOGIT_ATOL_Q8 = 5e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_merge")
    model = small_llama()
    save_base(model, str(root / "base"))
    for qtype in ("F32", "F16", "Q8_0"):
        write_llama_gguf(model, str(root / f"base-{qtype}.gguf"), qtype)
    pm = peft_adapter(model, str(root / "lora"), r=4, lora_alpha=8, target_modules=ALL, use_rslora=True,
                      rank_pattern={"down_proj": 6})
    pm2 = peft_adapter(model, str(root / "lora2"), seed=2, r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"])
    return root, model, pm, pm2


def read(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def peft_reference(model, adapters, weights):
    """PEFT's merged state dict (each adapter scaled by its weight), in llama.cpp's layout."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    m = copy.deepcopy(model)
    for path, w in zip(adapters, weights):
        pm = PeftModel.from_pretrained(m, str(path))
        for mod in pm.modules():
            if isinstance(mod, LoraLayer) and w != 1.0:
                mod.scale_layer(w)
        m = pm.merge_and_unload()
    cfg = model.config
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    out = {}
    for name, t in m.state_dict().items():
        data = t.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            data = llama_permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = llama_permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        out[tmap.get_name(name[: -len(".weight")]) + ".weight"] = torch.from_numpy(data.copy())
    return m, out


@pytest.mark.parametrize("qtype", ["F32", "F16"])
def test_float_merge_is_exact_and_keeps_everything(setup, tmp_path, capsys, qtype):
    root, model, _, _ = setup
    base = root / f"base-{qtype}.gguf"
    out = tmp_path / "merged.gguf"
    code, _, err = run_cli(capsys, "merge", base, root / "lora", root / "lora2", "--weight", "0.7",
                           "--weight", "-1.5", "-o", out)
    assert code == 0, err
    rb, tb = read(base)
    ro, to = read(out)
    assert list(tb) == list(to)  # tensor order kept
    kv_base = {k: f.contents() for k, f in rb.fields.items() if not k.startswith("GGUF.")}
    kv_out = {k: f.contents() for k, f in ro.fields.items() if not k.startswith("GGUF.")}
    assert kv_base == kv_out and list(kv_base) == list(kv_out)
    _, ref = peft_reference(model, [root / "lora", root / "lora2"], [0.7, -1.5])
    _, t32 = read(root / "base-F32.gguf")
    changed = 0
    for name, t in to.items():
        assert t.tensor_type == tb[name].tensor_type
        got = torch.from_numpy(np.array(t.data)).float()
        if "norm" in name or name in ("token_embd.weight", "output.weight"):
            assert np.array_equal(np.array(t.data), np.array(tb[name].data)), name  # copied byte for byte
            continue
        changed += 1
        expected = ref[name].reshape(got.shape)
        if qtype == "F32":
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5, msg=name)
        else:  # the f16 weight plus PEFT's ΔW, rounded once: within one f16 step
            delta = expected - torch.from_numpy(np.array(t32[name].data)).reshape(got.shape)
            expected = torch.from_numpy(np.array(tb[name].data)).float() + delta
            assert ((got - expected).abs() <= ulp(expected, torch.float16) + 1e-6).all(), name
    assert changed == 14


def test_q8_0_requantized_with_error_reported(setup, tmp_path, capsys):
    root, model, _, _ = setup
    out = tmp_path / "merged-q8.gguf"
    code, _, err = run_cli(capsys, "merge", root / "base-Q8_0.gguf", root / "lora", "-o", out)
    assert code == 0, err
    assert "requantized 14 tensor(s) to Q8_0" in err
    _, ref = peft_reference(model, [root / "lora"], [1.0])
    _, to = read(out)
    _, tb = read(root / "base-Q8_0.gguf")
    for name, t in to.items():
        assert t.tensor_type == tb[name].tensor_type
        if name in ref and ref[name].dim() == 2 and "embd" not in name and name != "output.weight":
            got = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type)).reshape(ref[name].shape)
            blocks = ref[name].reshape(-1, 32)
            # Q8_0 round-trips a block to within half a step of absmax/127 (plus the base's own Q8_0 error, same size)
            step = blocks.abs().amax(1, keepdim=True) / 127
            assert ((got.reshape(-1, 32) - blocks).abs() <= step * 1.01 + 1e-7).all(), name


def test_out_type_and_refusals(setup, tmp_path, capsys):
    root, model, _, _ = setup
    out = tmp_path / "to-f16.gguf"
    code, _, err = run_cli(capsys, "merge", root / "base-F32.gguf", root / "lora", "--out-type", "f16", "-o", out)
    assert code == 0, err
    _, to = read(out)
    assert to["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert to["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    # a type the gguf package cannot quantize is refused before anything is written
    bad = tmp_path / "q4k.gguf"
    code, _, err = run_cli(capsys, "merge", root / "base-F32.gguf", root / "lora", "--out-type", "q4_k", "-o", bad)
    assert code == 2 and "--out-type" in err and not bad.exists()
    # an adapter for another model
    other = tiny_llama(3, vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2)
    peft_adapter(other, str(tmp_path / "other"), target_modules=["q_proj"])
    code, _, err = run_cli(capsys, "merge", root / "base-F32.gguf", tmp_path / "other", "-o", bad)
    assert code == 1 and "has shape (64, 64)" in err and not bad.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporaries left


def test_gguf_adapter_merges_like_peft(setup, tmp_path, capsys):
    root, model, _, _ = setup
    code, _, err = run_cli(capsys, "convert", root / "lora", "--to", "gguf", "--base", root / "base",
                           "-o", tmp_path / "lora.gguf")
    assert code == 0, err
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert run_cli(capsys, "merge", root / "base-F32.gguf", tmp_path / "lora.gguf", "-o", a)[0] == 0
    assert run_cli(capsys, "merge", root / "base-F32.gguf", root / "lora", "-o", b)[0] == 0
    _, ta = read(a)
    _, tb = read(b)
    for name in ta:
        torch.testing.assert_close(torch.from_numpy(np.array(ta[name].data)), torch.from_numpy(np.array(tb[name].data)),
                                   atol=1e-7, rtol=1e-6)


def test_llama_cpp_runs_our_merged_models(setup, tmp_path, capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the test oracle) is not installed")
    root, model, _, _ = setup
    merged_model, _ = peft_reference(model, [root / "lora"], [1.0])
    with torch.no_grad():
        expected = merged_model(torch.tensor([TOKENS])).logits[0].float()
        assert (expected - model(torch.tensor([TOKENS])).logits[0]).abs().max() > 10 * LOGIT_ATOL_Q8
    for qtype, atol in (("F32", LOGIT_ATOL_F32), ("Q8_0", LOGIT_ATOL_Q8)):
        out = tmp_path / f"m-{qtype}.gguf"
        code, _, err = run_cli(capsys, "merge", root / f"base-{qtype}.gguf", root / "lora", "-o", out)
        assert code == 0, err
        got = llama_cpp_logits(str(out), TOKENS)
        torch.testing.assert_close(got, expected, atol=atol, rtol=0, msg=qtype)


@pytest.mark.parametrize("prefix", ["lora_unet_", "lora_te_"])
def test_kohya_named_llm_lora_merges_like_peft(setup, tmp_path, capsys, prefix):
    """An LLM LoRA saved with kohya names (`<prefix>model_layers_0_self_attn_q_proj.lora_down.weight`,
    per-module `.alpha`) resolves against the GGUF model's own module names and merges as PEFT does."""
    root, model, _, _ = setup
    peft_sd = load_file(str(root / "lora2" / "adapter_model.safetensors"))
    kohya = {}
    for key, t in peft_sd.items():
        module, part = key[len("base_model.model."):].rsplit(".lora_", 1)
        name = prefix + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = t
        kohya[f"{name}.alpha"] = torch.tensor(4.0)  # lora2: r=2, lora_alpha=4
    save_file(kohya, str(tmp_path / "llm_kohya.safetensors"))
    out = tmp_path / "merged.gguf"
    code, _, err = run_cli(capsys, "merge", root / "base-F32.gguf", tmp_path / "llm_kohya.safetensors", "-o", out)
    assert code == 0, err
    _, ref = peft_reference(model, [root / "lora2"], [1.0])
    _, to = read(out)
    changed = [n for n in to if ".attn_q." in n or ".attn_k." in n]
    assert len(changed) == 4
    for name, t in to.items():
        got = torch.from_numpy(np.array(t.data)).float()
        torch.testing.assert_close(got, ref[name].reshape(got.shape), atol=1e-6, rtol=1e-5, msg=name)


def test_gguf_outputs_never_replace_inputs(setup, tmp_path, capsys):
    """A .gguf output goes through the same checks as every output: never the base itself (also not
    through a link, also not with --overwrite), never an existing file without --overwrite, no partial file."""
    root, _, _, _ = setup
    base = tmp_path / "base.gguf"
    base.write_bytes((root / "base-F32.gguf").read_bytes())
    before = base.read_bytes()
    code, _, err = run_cli(capsys, "merge", base, root / "lora", "-o", base, "--overwrite")
    assert code == 2 and "itself" in err
    link = tmp_path / "link.gguf"
    link.symlink_to(base)
    code, _, err = run_cli(capsys, "merge", base, root / "lora", "-o", link, "--overwrite")
    assert code == 2 and "itself" in err and link.is_symlink()
    assert base.read_bytes() == before
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"mine")
    for args in (["merge", base, root / "lora"], ["convert", root / "lora", "--to", "gguf", "--base", base]):
        code, _, err = run_cli(capsys, *args, "-o", taken)
        assert code == 1 and "--overwrite" in err and taken.read_bytes() == b"mine"
    assert sorted(os.listdir(tmp_path)) == ["base.gguf", "link.gguf", "taken.gguf"]  # no temporaries left


def test_out_type_and_dtype_each_for_their_own_bases(setup, tmp_path, capsys):
    root, _, _, _ = setup
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "merge", root / "base", root / "lora", "--out-type", "q8_0", "-o", out)
    assert code == 2 and "--out-type q8_0" in err and "--dtype" in err and not out.exists()
    code, _, err = run_cli(capsys, "merge", root / "base-F32.gguf", root / "lora", "--dtype", "fp16", "-o", out)
    assert code == 2 and "--out-type" in err and not out.exists()
