"""--uniform-scale (issue 14 §2): one lora_alpha for every module, each module's scale folded into B,
so loaders that ignore alpha_pattern (llama.cpp's convert_lora_to_gguf.py: alpha / rank from the
tensor shapes) get the right updates. Oracles: PEFT loading the result, and that one-alpha rule."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from _tiny import peft_adapter, run_cli, tiny_llama
from loratools import read_adapter
from loratools.blending import BlendOptions, blend
from loratools.conversion import ConvertOptions, convert
from loratools.errors import UsageError
from loratools.extraction import ExtractOptions, extract
from loratools.resizing import ResizeOptions, resize

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

PATTERNS = dict(target_modules=["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8, rank_pattern={"v_proj": 2},
                alpha_pattern={"up_proj": 3, "v_proj": 5})


def _config(folder):
    with open(folder / "adapter_config.json") as f:
        return json.load(f)


def _one_alpha_deltas(folder, bound=False):
    """ΔW per A/B pair as a loader that reads only lora_alpha and the tensor shapes computes it (with
    `bound`: also one fp32 rounding of each B entry, 2^-24·s·|B|@|A|, the most folding may change)."""
    cfg, t = _config(folder), load_file(folder / "adapter_model.safetensors")
    out = {}
    for k, a in t.items():
        if k.endswith("lora_A.weight"):
            b, s = t[k.replace("lora_A", "lora_B")].double(), cfg["lora_alpha"] / a.shape[0]
            out[k] = (s * (b @ a.double()), 2.0 ** -24 * s * (b.abs() @ a.double().abs())) if bound else s * (b @ a.double())
    return out


def _logits(folder, ids):
    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_llama(), folder).eval()(input_ids=ids).logits


@pytest.mark.parametrize("case", [PATTERNS, dict(PATTERNS, use_rslora=True), dict(PATTERNS, use_dora=True)],
                         ids=["patterns", "rslora", "dora"])
def test_convert_folds_every_scale_into_b(tmp_path, case, capsys):
    pm = peft_adapter(tiny_llama(), str(tmp_path / "a"), **case)
    code, _, err = run_cli(capsys, "convert", tmp_path / "a", "--to", "peft", "--uniform-scale", "-o", tmp_path / "u")
    assert code == 0, err
    cfg = _config(tmp_path / "u")
    assert not cfg["alpha_pattern"] and not cfg["use_rslora"]
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    torch.testing.assert_close(_logits(tmp_path / "u", ids), want, rtol=1e-5, atol=1e-6)
    before = read_adapter(tmp_path / "a")
    deltas = _one_alpha_deltas(tmp_path / "u", bound=True)
    for name, m in before.modules.items():
        delta, bound = deltas[f"base_model.model.{name}.lora_A.weight"]
        assert ((delta - m.dense_delta(torch.float64)).abs() <= bound * 1.01).all(), name
    # without the option, the same adapter needs alpha_pattern: the one-alpha rule gets v_proj wrong
    convert(tmp_path / "a", tmp_path / "p", "peft")
    assert _config(tmp_path / "p")["alpha_pattern"] or _config(tmp_path / "p")["use_rslora"]
    wrong = _one_alpha_deltas(tmp_path / "p")
    v = "base_model.model.model.layers.0.self_attn.v_proj"
    assert not torch.allclose(wrong[v + ".lora_A.weight"], before.modules[v[17:]].dense_delta(torch.float64))


def test_resize_blend_and_extract_take_it(tmp_path):
    base = tiny_llama()
    peft_adapter(base, str(tmp_path / "a"), **PATTERNS)
    peft_adapter(base, str(tmp_path / "b"), seed=2, r=8, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    ids = torch.randint(0, 96, (2, 9))
    for label, run in (
        ("resize", lambda out, u: resize(tmp_path / "a", out, rank=3, dynamic="sv_fro", param=0.9, uniform_scale=u)),
        ("blend", lambda out, u: blend([tmp_path / "a", tmp_path / "b"], [0.5, 1.0], method="cat", output=out,
                                       uniform_scale=u)),
    ):
        run(tmp_path / f"{label}_plain", False)
        run(tmp_path / f"{label}_uniform", True)
        assert _config(tmp_path / f"{label}_plain")["alpha_pattern"], label  # the case needs it without
        assert not _config(tmp_path / f"{label}_uniform")["alpha_pattern"], label
        torch.testing.assert_close(_logits(tmp_path / f"{label}_uniform", ids),
                                   _logits(tmp_path / f"{label}_plain", ids), rtol=1e-5, atol=1e-6)
    # extract: dynamic ranks, alpha = rank each (scale 1) -> one alpha, B rescaled
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for i, (name, p) in enumerate(tuned.named_parameters()):
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                g = torch.Generator().manual_seed(i)
                k = 2 + i % 3
                p += torch.randn(p.shape[0], k, generator=g) @ torch.randn(k, p.shape[1], generator=g) * 0.05
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    tuned.save_pretrained(tmp_path / "tuned", safe_serialization=True)
    for u in (False, True):
        extract(tmp_path / "base", tmp_path / "tuned", tmp_path / f"x{u}", rank=8, dynamic="sv_fro", param=0.999999,
                include=["q_proj|v_proj"], uniform_scale=u)
    assert _config(tmp_path / "xFalse")["rank_pattern"] and not _config(tmp_path / "xTrue")["alpha_pattern"]
    for key, d in _one_alpha_deltas(tmp_path / "xTrue").items():
        name = key[len("base_model.model."):-len(".lora_A.weight")]
        torch.testing.assert_close(d.float(), read_adapter(tmp_path / "xFalse").modules[name].dense_delta(),
                                   rtol=1e-5, atol=1e-6)


def test_refused_where_files_keep_each_alpha(tmp_path, capsys):
    peft_adapter(tiny_llama(), str(tmp_path / "a"))
    code, _, err = run_cli(capsys, "convert", tmp_path / "a", "--to", "kohya", "--uniform-scale",
                           "-o", tmp_path / "k.safetensors")
    assert code == 2 and "--uniform-scale" in err and err.count("\n") == 1, err
    assert not (tmp_path / "k.safetensors").exists()
    with pytest.raises(UsageError, match="uniform-scale"):
        blend([tmp_path / "a"], to="kohya", uniform_scale=True)


def test_a_field_of_each_operations_options(tmp_path):
    """The frozen Options carry it: refused on creation where the output format is known, and an
    Options object and the keyword give the same adapter."""
    for make in (lambda: BlendOptions(to="kohya", uniform_scale=True),
                 lambda: ConvertOptions(to="kohya", uniform_scale=True),
                 lambda: ExtractOptions(to="kohya", uniform_scale=True)):
        with pytest.raises(UsageError, match="uniform-scale"):
            make()
    peft_adapter(tiny_llama(), str(tmp_path / "a"), **PATTERNS)
    by_options = resize(tmp_path / "a", options=ResizeOptions(rank=2, uniform_scale=True)).adapter
    by_keyword = resize(tmp_path / "a", rank=2, uniform_scale=True).adapter
    assert {m.alpha for m in by_options} == {m.alpha for m in by_keyword} and len({m.alpha for m in by_options}) == 1
    for name, m in by_keyword.modules.items():
        torch.testing.assert_close(by_options.modules[name].dense_delta(), m.dense_delta())
    with pytest.raises(UsageError, match="not both"):
        resize(tmp_path / "a", uniform_scale=True, options=ResizeOptions(rank=2))
