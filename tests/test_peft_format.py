"""PEFT adapters: read, write bit-exactly, and PEFT loads what we write."""
from __future__ import annotations

import json
import math
import os
import pickle

import pytest
import torch

from _tiny import TinyConvNet, peft_adapter, tiny_llama
from loratools import read_adapter, write_adapter
from loratools.adapter import LoraAdapter, LoraModule
from loratools.errors import FormatError, OutputExistsError
from loratools.formats import detect

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

CASES = {
    "plain": dict(),
    "patterns": dict(target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 2},
                     alpha_pattern={"up_proj": 3}),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
    "embed_and_save": dict(target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_bit_exact_and_peft_loads_it(model, tmp_path, case):
    pm = peft_adapter(model, str(tmp_path / "a"), **CASES[case])
    adapter = read_adapter(tmp_path / "a")
    assert detect(str(tmp_path / "a")) == "peft"
    write_adapter(adapter, tmp_path / "b")
    orig = load_file(tmp_path / "a" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert orig.keys() == ours.keys()
    for k in orig:
        assert orig[k].dtype == ours[k].dtype and torch.equal(orig[k], ours[k]), k
    again = read_adapter(tmp_path / "b")
    for name, m in adapter.modules.items():
        m2 = again.modules[name]
        assert (m2.rank, m2.alpha_value, m2.use_rslora, m2.kind, m2.is_dora) == \
               (m.rank, m.alpha_value, m.use_rslora, m.kind, m.is_dora)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "b").eval()
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_scale_rules(model, tmp_path):
    peft_adapter(model, str(tmp_path / "a"), r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})
    a = read_adapter(tmp_path / "a")
    assert a.modules["model.layers.0.self_attn.q_proj"].scale == 3 / 4
    assert a.modules["model.layers.0.self_attn.v_proj"].scale == 8 / 2
    peft_adapter(model, str(tmp_path / "r"), r=4, lora_alpha=8, use_rslora=True)
    assert read_adapter(tmp_path / "r").modules["model.layers.0.self_attn.q_proj"].scale == 8 / math.sqrt(4)


def test_mixed_rslora_is_folded_into_alpha(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = LoraAdapter()
    a.add(LoraModule("x.q", torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g), alpha=8, use_rslora=True))
    a.add(LoraModule("x.v", torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), alpha=3))
    write_adapter(a, tmp_path / "o")
    b = read_adapter(tmp_path / "o")
    for name in a.modules:
        assert b.modules[name].scale == pytest.approx(a.modules[name].scale, rel=1e-12)


def test_conv_adapter_round_trip(tmp_path):
    net = TinyConvNet()
    peft_adapter(net, str(tmp_path / "a"), target_modules=["conv1", "head"], r=3)
    a = read_adapter(tmp_path / "a")
    assert a.modules["conv1"].kind == "conv" and a.modules["conv1"].weight_shape == (8, 3, 3, 3)
    write_adapter(a, tmp_path / "b")
    for k, v in load_file(tmp_path / "a" / "adapter_model.safetensors").items():
        assert torch.equal(v, load_file(tmp_path / "b" / "adapter_model.safetensors")[k])


def test_bin_read_with_weights_only(model, tmp_path):
    peft_adapter(model, str(tmp_path / "a"))
    sd = load_file(tmp_path / "a" / "adapter_model.safetensors")
    os.remove(tmp_path / "a" / "adapter_model.safetensors")
    torch.save(sd, tmp_path / "a" / "adapter_model.bin")
    a = read_adapter(tmp_path / "a")
    assert len(a) == 4


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/loratools_pwned",))


def test_malicious_pickle_is_refused(model, tmp_path):
    peft_adapter(model, str(tmp_path / "a"))
    os.remove(tmp_path / "a" / "adapter_model.safetensors")
    with open(tmp_path / "a" / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(FormatError, match="cannot be loaded safely"):
        read_adapter(tmp_path / "a")
    assert not os.path.exists("/tmp/loratools_pwned")


def test_config_rank_disagreeing_with_tensors(model, tmp_path):
    peft_adapter(model, str(tmp_path / "a"))
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    cfg["r"] = 16
    json.dump(cfg, open(tmp_path / "a" / "adapter_config.json", "w"))
    with pytest.raises(FormatError, match="rank 4 but the config says 16"):
        read_adapter(tmp_path / "a")


def test_missing_factor(model, tmp_path):
    peft_adapter(model, str(tmp_path / "a"))
    sd = load_file(tmp_path / "a" / "adapter_model.safetensors")
    sd.pop(next(k for k in sd if k.endswith("lora_B.weight")))
    save_file(sd, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(FormatError, match="no lora_B"):
        read_adapter(tmp_path / "a")


def test_existing_output_refused(model, tmp_path):
    peft_adapter(model, str(tmp_path / "a"))
    a = read_adapter(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    with pytest.raises(OutputExistsError):
        write_adapter(a, tmp_path / "b")
    write_adapter(a, tmp_path / "b", overwrite=True)
    assert os.path.isfile(tmp_path / "b" / "adapter_config.json")
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_old_pattern_keys_are_not_reused_when_they_would_be_wrong(model, tmp_path):
    """A read config's `v_proj` pattern covers every v_proj; once those modules differ in rank,
    writing must not reuse the shared key (PEFT would give them all one rank)."""
    peft_adapter(model, str(tmp_path / "a"), rank_pattern={"v_proj": 2})
    a = read_adapter(tmp_path / "a")
    m = a.modules["model.layers.1.self_attn.v_proj"]
    a.modules[m.name] = LoraModule(m.name, m.down[:1].clone(), m.up[:, :1].clone(), alpha=m.alpha)
    write_adapter(a, tmp_path / "b")
    cfg = json.load(open(tmp_path / "b" / "adapter_config.json"))
    assert "v_proj" not in cfg["rank_pattern"]
    b = read_adapter(tmp_path / "b")  # the reader checks every module's rank against the config
    assert b.modules[m.name].rank == 1 and b.modules["model.layers.0.self_attn.v_proj"].rank == 2
    PeftModel.from_pretrained(tiny_llama(), tmp_path / "b")
