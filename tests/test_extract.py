"""extract: recovers a known low-rank fine-tune (oracles: PEFT loading + merging the written adapter,
transformers logits, dense torch.linalg.svd truncation error), filters, formats and errors."""
from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from loratools import read_adapter
from loratools.cli.main import main
from loratools.errors import IncompatibleError, ShapeMismatchError, UsageError
from loratools.extraction import extract

warnings.filterwarnings("ignore", message=".*loratools._C is not built.*")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def fine_tune(model, rank=8, noise=1e-4, seed=1, targets=TARGETS):
    """A copy with W += B @ A (a known rank-`rank` update) + noise on every target weight."""
    g = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith(".weight") and name.split(".")[-2] in targets:
                out, inp = p.shape[0], p.flatten(1).shape[1]
                upd = torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g) * 0.02
                p += (upd + noise * torch.randn(out, inp, generator=g)).reshape(p.shape)
    return tuned


def peft_merge(base, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload()


def truncation_error(diff: torch.Tensor, k: int) -> float:
    """The best rank-k error of a difference (Eckart-Young), from a dense SVD in fp64."""
    s = torch.linalg.svdvals(diff.double().reshape(diff.shape[0], -1))
    return float(s[k:].norm())


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama()
    tuned = fine_tune(base)
    base.save_pretrained(root / "base", safe_serialization=True)
    tuned.save_pretrained(root / "tuned", safe_serialization=True, max_shard_size="100KB")  # sharded
    return base, tuned, str(root / "base"), str(root / "tuned")


def test_extract_recovers_a_rank8_fine_tune(llama_pair, tmp_path, capsys):
    base, tuned, base_dir, tuned_dir = llama_pair
    out = str(tmp_path / "ex")
    assert main(["extract", base_dir, tuned_dir, "-o", out, "--rank", "8", "--format", "json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["modules"]) == 2 * len(TARGETS)
    assert all(m["new_rank"] == 8 and m["fro_retained"] > 0.9999 for m in report["modules"])
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["base_model_name_or_path"] == os.path.abspath(base_dir) and config["task_type"] == "CAUSAL_LM"
    merged = peft_merge(base, out)  # the oracle: PEFT applies the written adapter
    wb, wt, wm = base.state_dict(), tuned.state_dict(), merged.state_dict()
    for key in wt:
        err = float((wm[key].double() - wt[key].double()).norm())
        if key.split(".")[-2] in TARGETS:
            optimal = truncation_error(wt[key] - wb[key], 8)
            assert err <= optimal * 1.001 + 1e-6, key  # the truncation error, no more
            assert err < 0.02 * float((wt[key] - wb[key]).norm())  # only the noise is lost
        else:
            assert err == 0, key
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lt, lm, lb = tuned(ids).logits, merged(ids).logits, base(ids).logits
    assert (lm - lt).abs().max() < 0.02 * (lb - lt).abs().max()


def test_dynamic_rank_and_randomized_svd_match_a_dense_extraction(tmp_path):
    # 320x256 weights: big enough for the randomized path; a decaying spectrum plus noise
    g = torch.Generator().manual_seed(0)
    base = {f"l{i}.weight": torch.randn(320, 256, generator=g) for i in range(3)}
    tuned = {}
    for i, (k, w) in enumerate(base.items()):
        u, _ = torch.linalg.qr(torch.randn(320, 40, generator=g))
        v, _ = torch.linalg.qr(torch.randn(256, 40, generator=g))
        sigma = torch.exp(-torch.arange(40.0) / (3 + 2 * i))
        tuned[k] = w + (u * sigma) @ v.T + 1e-3 * torch.randn(320, 256, generator=g)
    os.makedirs(tmp_path / "b"), os.makedirs(tmp_path / "t")
    save_file(base, str(tmp_path / "b" / "model.safetensors"))
    save_file(tuned, str(tmp_path / "t" / "model.safetensors"))
    for svd in ("auto", "exact"):
        res = extract(tmp_path / "b", tmp_path / "t", tmp_path / svd, rank=12, svd=svd)
        assert set(res.methods.values()) == {"randomized" if svd == "auto" else "exact"}
        ad = read_adapter(tmp_path / svd)
        for k in base:
            m = ad.modules[k[:-7]]
            diff = tuned[k] - base[k]
            optimal = truncation_error(diff, 12)
            err = float((m.dense_delta().double() - diff.double()).norm())
            assert optimal <= err * (1 + 1e-6) and err <= optimal * (1.01 if svd == "auto" else 1.0001)
    for rule, p in (("sv_fro", 0.9), ("sv_ratio", 5.0)):
        res = extract(tmp_path / "b", tmp_path / "t", rank=30, dynamic=rule, param=p)
        assert set(res.methods.values()) == {"randomized"}
        for m in res.modules:
            s = torch.linalg.svdvals((tuned[m.name + ".weight"] - base[m.name + ".weight"]).double())
            if rule == "sv_fro":
                want = int((torch.cumsum(s ** 2, 0) < p ** 2 * (s ** 2).sum()).sum()) + 1
                assert m.fro_retained == pytest.approx(float(s[:m.new_rank].norm() / s.norm()), rel=1e-4)
            else:
                want = int((s > s[0] / p).sum())
            assert m.new_rank == min(want, 30)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, ids, img):
        return self.head(self.embed(ids).mean(1) + self.conv(img).mean((2, 3)))


@pytest.fixture(scope="module")
def net_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("net")
    torch.manual_seed(0)
    base = Net().eval()
    tuned = fine_tune(base, rank=3, noise=0.0, targets=("embed", "conv", "head"))
    with torch.no_grad():
        tuned.head.bias += 0.1  # a changed 1-D tensor a LoRA cannot hold
    for name, model in (("b", base), ("t", tuned)):
        os.makedirs(root / name)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / name / "model.safetensors"))
    return base, tuned, str(root / "b"), str(root / "t")


def test_conv_and_embeddings(net_pair, tmp_path, capsys):
    base, tuned, b, t = net_pair
    res = extract(b, t, tmp_path / "default", rank=3)
    assert sorted(m.name for m in res.modules) == ["conv", "head"]
    assert res.skipped["differs but embedding (use --embeddings)"] == ["embed.weight"]
    assert res.skipped["differs but not a 2-D or conv weight"] == ["head.bias"]
    out = str(tmp_path / "all")
    assert main(["extract", b, t, "-o", out, "--rank", "3", "--embeddings"]) == 0
    err = capsys.readouterr().err
    assert "head.bias" in err and "changed but were not extracted" in err
    ad = read_adapter(out)
    assert {n: m.kind for n, m in ad.modules.items()} == {"embed": "embedding", "conv": "conv", "head": "linear"}
    merged = peft_merge(base, out).state_dict()  # PEFT's embedding and conv LoRA layers apply it
    for key in ("embed.weight", "conv.weight", "head.weight"):
        assert torch.allclose(merged[key], tuned.state_dict()[key], atol=1e-5), key


def test_include_exclude_and_min_diff(llama_pair, tmp_path):
    _, _, b, t = llama_pair
    res = extract(b, t, rank=4, include=[r"layers\.0\."], exclude=["mlp"])
    assert sorted(m.name.split(".")[-1] for m in res.modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert all(".layers.0." in m.name for m in res.modules)
    assert res.skipped["excluded"] and res.skipped["not included"]
    with pytest.raises(UsageError, match="nothing to extract"):
        extract(b, t, tmp_path / "none", rank=4, min_diff=1e3)
    assert not (tmp_path / "none").exists()
    res = extract(b, t, rank=4, include=["lm_head|q_proj"])  # an include that names lm_head takes it
    assert {m.name.split(".")[-1] for m in res.modules} == {"q_proj"}
    assert "lm_head.weight" in res.skipped["unchanged"]  # a candidate (unchanged), not skipped as embedding


def test_dtype_and_base_model_name(net_pair, tmp_path):
    _, _, b, t = net_pair
    extract(b, t, tmp_path / "o", rank=2, dtype="bf16", base_model_name="org/net")
    ad = read_adapter(tmp_path / "o")
    assert ad.base_model == "org/net" and all(m.down.dtype == torch.bfloat16 for m in ad)


def test_errors_are_one_line_and_write_nothing(llama_pair, net_pair, tmp_path, capsys):
    _, _, lb, lt = llama_pair
    _, _, nb, nt = net_pair
    out = str(tmp_path / "o")
    cases = [
        (["extract", lb, nt, "-o", out, "--rank", "4"], 1, "different tensors"),
        (["extract", lb, lb, "-o", out, "--rank", "4"], 2, "same checkpoint"),
        (["extract", lb, lt, "-o", out, "--rank", "4", "--include", "("], 2, "invalid regular expression"),
        (["extract", lb, lt, "-o", out, "--rank", "4", "--dynamic", "sv_cumulative", "--param", "0.9",
          "--svd", "randomized"], 2, "sv_cumulative needs every"),
        (["extract", lb, str(tmp_path / "missing"), "-o", out, "--rank", "4"], 1, "no such file"),
    ]
    for argv, code, msg in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("loratools: error:") and msg in err and "\n" not in err, err
        assert not os.path.exists(out)
    assert main(["extract", lb, lt, "-o", out]) == 2  # --rank is required (click's message)
    assert "--rank" in capsys.readouterr().err
    with pytest.raises(UsageError, match="cannot write format"):
        extract(lb, lt, out, rank=4, to="lycoris")
    assert not os.path.exists(out)


def test_shape_mismatch(tmp_path):
    for name, shape in (("b", (4, 6)), ("t", (4, 7))):
        os.makedirs(tmp_path / name)
        save_file({"x.weight": torch.zeros(shape)}, str(tmp_path / name / "model.safetensors"))
    with pytest.raises(ShapeMismatchError, match="x.weight"):
        extract(tmp_path / "b", tmp_path / "t", rank=2)
    with pytest.raises(IncompatibleError):
        save_file({"y.weight": torch.zeros(4, 6)}, str(tmp_path / "t" / "model.safetensors"))
        extract(tmp_path / "b", tmp_path / "t", rank=2)


def test_extract_to_kohya_loads_in_diffusers(tmp_path):
    """The oracle: diffusers' own kohya loader applies the extracted file to the base UNet."""
    import _formats_models as M

    base = M.unet()
    tuned = fine_tune(base, rank=3, noise=0.0, targets=("to_q", "to_v", "proj_in", "conv1"))
    base.save_pretrained(tmp_path / "b")
    tuned.save_pretrained(tmp_path / "t")
    out = str(tmp_path / "lora.safetensors")
    assert main(["extract", str(tmp_path / "b"), str(tmp_path / "t"), "-o", out, "--rank", "3", "--to", "kohya",
                 "--component", "unet", "-q"]) == 0
    pipe = M.pipeline()
    pipe.load_lora_weights(out)
    want, got, before = M.unet_out(tuned), M.unet_out(pipe.unet), M.unet_out(base)
    assert (want - before).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_provenance_is_recorded_for_the_model_card(tmp_path):
    """extract and resize stamp how the adapter was made; push's model card reads it back."""
    from _tiny import save_base, tiny_llama
    from loratools import extract, read_adapter, resize
    from loratools.share import provenance

    base, tuned = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.add_(0.1)
    save_base(base, str(tmp_path / "base"))
    save_base(tuned, str(tmp_path / "tuned"))
    extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "ex", rank=2)
    info = provenance(read_adapter(tmp_path / "ex"))
    assert info["operation"] == "extract" and info["inputs"] == ["base", "tuned"] and info["rank"] == 2
    resize(tmp_path / "ex", tmp_path / "small", rank=1)
    info = provenance(read_adapter(tmp_path / "small"))
    assert info["operation"] == "resize" and info["inputs"] == ["ex"] and info["rank"] == 1


@pytest.mark.parametrize("flag", [None, True], ids=["from_config", "explicit"])
def test_gpt2_conv1d_extract_matches_peft(tmp_path, flag):
    """GPT-2 stores linear weights as [in, out] (Conv1D): the extracted adapter must say
    fan_in_fan_out, and PEFT merging it into the base must give the tuned model back."""
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=80, n_positions=32)).eval()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in tuned.transformer.h:
            w = block.attn.c_attn.weight  # [in 32, out 96]
            w.add_(0.05 * torch.randn(w.shape[0], 3, generator=g) @ torch.randn(3, w.shape[1], generator=g))
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "ex", rank=3, fan_in_fan_out=flag)
    cfg = json.load(open(tmp_path / "ex" / "adapter_config.json"))
    assert cfg["fan_in_fan_out"] is True
    merged = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ex").merge_and_unload()
    for blk_m, blk_t in zip(merged.transformer.h, tuned.transformer.h):
        torch.testing.assert_close(blk_m.attn.c_attn.weight, blk_t.attn.c_attn.weight, rtol=0, atol=1e-5)
    ids = torch.randint(0, 80, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-5)


def test_default_base_name_keeps_hub_references(tmp_path):
    from loratools.extraction import default_base_name

    assert default_base_name("someone/llama@v2") == "someone/llama@v2"  # not turned into a local path
    os.makedirs(tmp_path / "base")
    assert default_base_name(str(tmp_path / "base")) == os.path.abspath(tmp_path / "base")
