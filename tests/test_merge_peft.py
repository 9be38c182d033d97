"""`loratools.merge` against PEFT's merge_and_unload and transformers' logits on tiny models."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from _tiny import (TinyConvNet, assert_close_rel, load_folder, peft_adapter, save_base, save_state_dict_folder,
                   tiny_llama, ulp)
from loratools import merge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import PeftModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402


def peft_merge(base_model, adapters, weights=None):
    """The oracle: PEFT merges each adapter in turn; a weight scales that adapter's LoRA layers."""
    model = copy.deepcopy(base_model)
    for i, path in enumerate(adapters):
        pm = PeftModel.from_pretrained(model, path)
        w = 1.0 if weights is None else weights[i]
        if w != 1.0:
            for mod in pm.modules():
                if isinstance(mod, LoraLayer):
                    mod.scale_layer(w)
        model = pm.merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


def compare_all(ours: dict, ref: dict, rel=1e-5):
    missing = set(ref) - set(ours)
    # tied/shared tensors may be absent from a checkpoint but present in a state dict
    assert not {k for k in missing if "lm_head" not in k}, missing
    for k, v in ours.items():
        assert_close_rel(v, ref[k], rel, k)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    model = tiny_llama()
    save_base(model, str(root / "base"))
    save_base(model, str(root / "sharded"), shard="20KB")
    return model, root


def test_single_adapter_matches_peft_and_logits(llama, tmp_path):
    model, root = llama
    pm = peft_adapter(model, str(tmp_path / "a"), target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"])
    merge(root / "base", [tmp_path / "a"], tmp_path / "out")
    compare_all(load_folder(tmp_path / "out"), peft_merge(model, [tmp_path / "a"]))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_rel(reloaded(ids).logits, pm(input_ids=ids).logits, 1e-5, "logits")
    # config and other files are copied
    assert json.load(open(tmp_path / "out" / "config.json")) == json.load(open(root / "base" / "config.json"))


def test_several_adapters_with_weights(llama, tmp_path):
    model, root = llama
    a = [str(tmp_path / n) for n in "abc"]
    peft_adapter(model, a[0], seed=1)
    peft_adapter(model, a[1], seed=2, r=8, lora_alpha=4, target_modules=["v_proj", "down_proj"])
    peft_adapter(model, a[2], seed=3, r=2, lora_alpha=16)
    weights = [0.7, -0.4, 1.3]
    merge(root / "base", a, tmp_path / "out", weights=weights)
    compare_all(load_folder(tmp_path / "out"), peft_merge(model, a, weights))


def test_negative_weight_undoes_merge(llama, tmp_path):
    model, root = llama
    peft_adapter(model, str(tmp_path / "a"))
    merge(root / "base", [tmp_path / "a"], tmp_path / "m")
    merge(tmp_path / "m", [tmp_path / "a"], tmp_path / "u", weights=[-1])
    base, back = load_folder(root / "base"), load_folder(tmp_path / "u")
    for k in base:
        torch.testing.assert_close(back[k], base[k], rtol=0, atol=1e-6)


def test_sharded_base_keeps_layout(llama, tmp_path):
    model, root = llama
    peft_adapter(model, str(tmp_path / "a"))
    merge(root / "sharded", [tmp_path / "a"], tmp_path / "out")
    src = sorted(f for f in os.listdir(root / "sharded") if f.endswith(".safetensors"))
    assert len(src) > 2
    assert sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")) == src
    idx_in = json.load(open(root / "sharded" / "model.safetensors.index.json"))
    idx_out = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    assert idx_out["weight_map"] == idx_in["weight_map"]
    compare_all(load_folder(tmp_path / "out"), peft_merge(model, [tmp_path / "a"]))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert_close_rel(reloaded.model.layers[1].self_attn.q_proj.weight.detach(),
                     load_folder(tmp_path / "out")["model.layers.1.self_attn.q_proj.weight"], 0)


def test_rank_and_alpha_patterns(llama, tmp_path):
    model, root = llama
    peft_adapter(model, str(tmp_path / "a"), target_modules=["q_proj", "v_proj", "up_proj"],
                 rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"up_proj": 3})
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    merge(root / "base", [tmp_path / "a"], tmp_path / "out")
    compare_all(load_folder(tmp_path / "out"), peft_merge(model, [tmp_path / "a"]))


def test_rslora(llama, tmp_path):
    model, root = llama
    peft_adapter(model, str(tmp_path / "a"), use_rslora=True, r=8, lora_alpha=5)
    merge(root / "base", [tmp_path / "a"], tmp_path / "out")
    compare_all(load_folder(tmp_path / "out"), peft_merge(model, [tmp_path / "a"]))


def test_dora(llama, tmp_path):
    model, root = llama
    peft_adapter(model, str(tmp_path / "a"), use_dora=True, target_modules=["q_proj", "down_proj"])
    merge(root / "base", [tmp_path / "a"], tmp_path / "out")
    compare_all(load_folder(tmp_path / "out"), peft_merge(model, [tmp_path / "a"]))


def test_embeddings_and_modules_to_save(llama, tmp_path):
    model, root = llama
    peft_adapter(model, str(tmp_path / "a"), target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"])
    ref = peft_merge(model, [tmp_path / "a"])
    assert not torch.equal(ref["lm_head.weight"], model.lm_head.weight)
    merge(root / "base", [tmp_path / "a"], tmp_path / "out")
    compare_all(load_folder(tmp_path / "out"), ref)


def test_bf16_within_one_rounding_step(tmp_path):
    model = tiny_llama(seed=5, dtype=torch.bfloat16)
    save_base(model, str(tmp_path / "base"))
    peft_adapter(model, str(tmp_path / "a"), target_modules=["q_proj", "gate_proj"])
    merge(tmp_path / "base", [tmp_path / "a"], tmp_path / "out")
    ours = load_folder(tmp_path / "out")
    ref = peft_merge(model, [tmp_path / "a"])  # PEFT rounds twice (delta, then sum)
    base = load_folder(tmp_path / "base")
    for k, v in ours.items():
        assert v.dtype == torch.bfloat16
        step = ulp(ref[k], torch.bfloat16)
        assert ((v.float() - ref[k].float()).abs() <= step).all(), k
    # against the exact fp64 sum: ours is rounded once, so within half a step
    name = "model.layers.0.self_attn.q_proj"
    from loratools.formats import read_adapter

    m = read_adapter(tmp_path / "a").modules[name]
    exact = base[name + ".weight"].double() + m.scale * (m.up.double() @ m.down.double())
    err = (ours[name + ".weight"].double() - exact).abs()
    assert (err <= 0.5 * ulp(exact, torch.bfloat16).double() * (1 + 1e-9)).all()


def test_output_dtype_conversion(llama, tmp_path):
    model, root = llama
    peft_adapter(model, str(tmp_path / "a"))
    merge(root / "base", [tmp_path / "a"], tmp_path / "out", dtype="bf16")
    ours, ref = load_folder(tmp_path / "out"), peft_merge(model, [tmp_path / "a"])
    for k, v in ours.items():
        assert v.dtype == torch.bfloat16, k
        if "q_proj" in k or "v_proj" in k:  # merged in fp32, then rounded: within one bf16 step
            assert (v.float() - ref[k]).abs().le(ulp(ref[k], torch.bfloat16)).all(), k
        else:  # untouched tensors are converted exactly like torch does
            assert torch.equal(v, ref[k].to(torch.bfloat16)), k


def test_conv_model(tmp_path):
    torch.manual_seed(0)
    net = TinyConvNet()
    save_state_dict_folder(net, str(tmp_path / "base"))
    pm = peft_adapter(net, str(tmp_path / "a"), target_modules=["conv1", "conv2", "head"], r=3, lora_alpha=6)
    merge(tmp_path / "base", [tmp_path / "a"], tmp_path / "out")
    ref = {k: v for k, v in peft_merge(net, [tmp_path / "a"]).items()}
    compare_all(load_folder(tmp_path / "out"), ref)
    x = torch.randn(2, 3, 9, 9)
    merged_net = TinyConvNet()
    merged_net.load_state_dict(load_folder(tmp_path / "out"))
    with torch.no_grad():
        assert_close_rel(merged_net(x), pm(x), 1e-5, "conv outputs")


def test_fan_in_fan_out_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=80, n_positions=32)).eval()
    save_base(gpt2, str(tmp_path / "base"))
    pm = peft_adapter(gpt2, str(tmp_path / "a"), target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    merge(tmp_path / "base", [tmp_path / "a"], tmp_path / "out")
    compare_all(load_folder(tmp_path / "out"), peft_merge(gpt2, [tmp_path / "a"]))
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 80, (1, 9))
    with torch.no_grad():
        assert_close_rel(reloaded(ids).logits, pm(input_ids=ids).logits, 1e-5, "gpt2 logits")


def test_locon_tucker_merge_matches_chained_convolutions(tmp_path):
    """A kohya LoCon Tucker module (down 1x1, mid kxk, up 1x1) merges like its three chained convolutions."""
    from loratools import LoraAdapter, LoraModule

    torch.manual_seed(4)
    net = TinyConvNet()
    save_state_dict_folder(net, str(tmp_path / "base"))
    down, mid, up = torch.randn(2, 3, 1, 1), torch.randn(2, 2, 3, 3), torch.randn(8, 2, 1, 1)
    adapter = LoraAdapter(format="kohya")
    adapter.add(LoraModule("conv1", down=down, up=up, alpha=1.0, kind="conv", mid=mid))
    merge(tmp_path / "base", [adapter], tmp_path / "out", weights=[0.75])
    merged = load_folder(tmp_path / "out")
    x = torch.randn(2, 3, 7, 7)
    conv = torch.nn.functional.conv2d
    chained = conv(conv(conv(x, down), mid, padding=1), up)  # the dense reference, from torch's convolutions
    want = conv(x, net.conv1.weight.detach(), padding=1) + 0.75 * (1.0 / 2) * chained
    torch.testing.assert_close(conv(x, merged["conv1.weight"], padding=1), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(merged["conv2.weight"], net.conv2.weight.detach())
