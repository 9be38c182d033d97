"""`loratools convert --to gguf`: llama.cpp LoRA adapters, checked by llama.cpp itself against PEFT."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from _gguf import gguf, llama_cpp_logits, llama_permute, small_llama, write_llama_gguf
from _tiny import peft_adapter, run_cli, save_base
from loratools.formats import read_adapter, write_adapter

pytest.importorskip("peft")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = [1, 5, 17, 42, 99, 7, 64, 3, 120, 33]
# llama.cpp (F32 weights, fp32 CPU kernels) vs transformers fp32: only summation order differs
LOGIT_ATOL_F32 = 1e-4  # measured 1.8e-5 (the adapter moves logits by 8e-2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_export")
    model = small_llama()
    save_base(model, str(root / "base"))
    layout = write_llama_gguf(model, str(root / "base.gguf"), "F32")
    # per-module ranks and alphas: llama.cpp's one alpha must still give every module its own scale
    pm = peft_adapter(model, str(root / "lora"), r=4, lora_alpha=8, target_modules=ALL,
                      rank_pattern={"down_proj": 6}, alpha_pattern={"k_proj": 3, "up_proj": 20})
    return root, model, pm, layout


def hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def test_tensors_names_and_metadata(setup, capsys):
    root, model, pm, layout = setup
    out = root / "names.gguf"
    code, _, err = run_cli(capsys, "convert", root / "lora", "--to", "gguf", "--base", root / "base" / "config.json",
                           "-o", out)
    assert code == 0, err
    reader = gguf.GGUFReader(str(out))
    kv = {k: f.contents() for k, f in reader.fields.items()}
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["general.architecture"] == "llama"
    names = {t.name for t in reader.tensors}
    for i in range(2):
        for short in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert f"blk.{i}.{short}.weight.lora_a" in names and f"blk.{i}.{short}.weight.lora_b" in names
    # every module's ΔW (as llama.cpp computes it: alpha / rank · B @ A) equals PEFT's, in llama.cpp's layout
    alpha = kv["adapter.lora.alpha"]
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    cfg = model.config
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, w in model.state_dict().items():
        if not name.endswith("proj.weight"):
            continue
        delta = (merged[name] - w).numpy()
        if "q_proj" in name:
            delta = llama_permute(delta, cfg.num_attention_heads, cfg.num_attention_heads)
        elif "k_proj" in name:
            delta = llama_permute(delta, cfg.num_attention_heads, cfg.num_key_value_heads)
        gname = tmap.get_name(name[: -len(".weight")]) + ".weight"
        a, b = tensors[gname + ".lora_a"], tensors[gname + ".lora_b"]
        ours = alpha / b.shape[1] * b @ a
        torch.testing.assert_close(ours, torch.from_numpy(delta), atol=1e-6, rtol=1e-4, msg=name)


def test_llama_cpp_applies_our_adapter_like_peft(setup, tmp_path, capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the test oracle) is not installed")
    root, model, pm, _ = setup
    out = tmp_path / "lora.gguf"
    code, _, err = run_cli(capsys, "convert", root / "lora", "--to", "gguf", "--base", root / "base", "-o", out)
    assert code == 0, err
    expected = hf_logits(copy.deepcopy(pm).merge_and_unload())
    base_only = llama_cpp_logits(str(root / "base.gguf"), TOKENS)
    torch.testing.assert_close(base_only, hf_logits(model), atol=LOGIT_ATOL_F32, rtol=0)  # the base matches
    ours = llama_cpp_logits(str(root / "base.gguf"), TOKENS, lora_path=str(out))
    assert (expected - hf_logits(model)).abs().max() > 50 * LOGIT_ATOL_F32  # the adapter matters
    torch.testing.assert_close(ours, expected, atol=LOGIT_ATOL_F32, rtol=0)


def test_read_back_round_trip(setup, tmp_path):
    root, model, pm, _ = setup
    peft_in = read_adapter(str(root / "lora"))
    out = tmp_path / "rt.gguf"
    write_adapter(peft_in, out, format="gguf", base=str(root / "base"))
    back = read_adapter(str(out))  # head counts written by us: no base needed
    assert back.format == "gguf" and set(back.modules) == set(peft_in.modules)
    for name, m in peft_in.modules.items():
        torch.testing.assert_close(back.modules[name].dense_delta(), m.dense_delta(), atol=1e-7, rtol=1e-6)
    # and to PEFT again: PEFT loads it and gives the same model
    code = write_adapter(back, tmp_path / "peft_again", format="peft")
    assert code
    from peft import PeftModel

    again = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft_again")).merge_and_unload()
    torch.testing.assert_close(hf_logits(again), hf_logits(copy.deepcopy(pm).merge_and_unload()),
                               atol=1e-5, rtol=0)


def test_refusals(setup, tmp_path, capsys):
    root, model, _, _ = setup
    peft_adapter(model, str(tmp_path / "dora"), use_dora=True)
    code, _, err = run_cli(capsys, "convert", tmp_path / "dora", "--to", "gguf", "--base", root / "base",
                           "-o", tmp_path / "d.gguf")
    assert code == 1 and "DoRA" in err and "Traceback" not in err and not (tmp_path / "d.gguf").exists()
    code, _, err = run_cli(capsys, "convert", root / "lora", "--to", "gguf", "-o", tmp_path / "n.gguf")
    assert code == 2 and "--base" in err and not (tmp_path / "n.gguf").exists()
    cfg = json.loads((root / "base" / "config.json").read_text())
    cfg["model_type"] = "gpt_bigcode"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "convert", root / "lora", "--to", "gguf", "--base", tmp_path / "config.json",
                           "-o", tmp_path / "x.gguf")
    assert code == 1 and "gpt_bigcode" in err and not (tmp_path / "x.gguf").exists()


def test_gguf_adapters_feed_the_other_commands(setup, tmp_path, capsys):
    root, model, pm, _ = setup
    a = tmp_path / "a.gguf"
    assert run_cli(capsys, "convert", root / "lora", "--to", "gguf", "--base", root / "base", "-o", a)[0] == 0
    code, out, _ = run_cli(capsys, "inspect", a, "--format", "json")
    report = json.loads(out)
    assert code == 0 and report["format"] == "gguf" and report["modules"] == len(read_adapter(str(root / "lora")))
    # resize and blend write GGUF again (the architecture rides along); llama.cpp-style names stay
    assert run_cli(capsys, "resize", a, "--rank", "2", "-o", tmp_path / "r.gguf")[0] == 0
    assert run_cli(capsys, "blend", a, root / "lora", "-o", tmp_path / "b.gguf")[0] == 0
    for f in ("r.gguf", "b.gguf"):
        names = {t.name for t in gguf.GGUFReader(str(tmp_path / f)).tensors}
        assert "blk.0.attn_q.weight.lora_b" in names, f
    blended = read_adapter(str(tmp_path / "b.gguf"))
    peft_in = read_adapter(str(root / "lora"))
    for name, m in peft_in.modules.items():  # blend of a with itself: twice the update
        torch.testing.assert_close(blended.modules[name].dense_delta(), 2 * m.dense_delta(), atol=1e-6, rtol=1e-5)
    # a llama.cpp-written adapter has no head counts: q/k rows need the base to be put back in HF order
    reader = gguf.GGUFReader(str(a))
    w = gguf.GGUFWriter(str(tmp_path / "plain.gguf"), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", reader.fields["adapter.lora.alpha"].contents())
    for t in reader.tensors:
        w.add_tensor(t.name, t.data.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, _, err = run_cli(capsys, "convert", tmp_path / "plain.gguf", "--to", "peft", "-o", tmp_path / "p")
    assert code == 2 and "--base" in err
    code, _, err = run_cli(capsys, "convert", tmp_path / "plain.gguf", "--base", root / "base", "--to", "peft",
                           "-o", tmp_path / "p")
    assert code == 0, err
    back = read_adapter(str(tmp_path / "p"))
    for name, m in read_adapter(str(a)).modules.items():
        torch.testing.assert_close(back.modules[name].dense_delta(), m.dense_delta(), atol=1e-7, rtol=1e-6)
