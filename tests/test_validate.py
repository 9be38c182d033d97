"""`validate`: findings, exit codes, and `merge` refusing what validate calls an error."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from _tiny import foreign_adapters, load_folder, peft_adapter, run_cli as run, save_base, tiny_llama
from loratools import merge, read_adapter
from loratools.adapter import LoraAdapter, LoraModule
from loratools.errors import IncompatibleError, NonFiniteError, ShapeMismatchError
from loratools import checks, safetensors_io
from loratools.bases import open_base
from loratools.checks import check_adapter, check_all, raise_errors


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    model = tiny_llama()
    save_base(model, str(root / "base"), shard="20KB")
    peft_adapter(model, str(root / "a"))
    with torch.no_grad():  # a clean adapter: small B, as after real training
        sd = load_file(root / "a" / "adapter_model.safetensors")
        save_file({k: v * (0.05 if "lora_B" in k else 1) for k, v in sd.items()}, root / "a" / "adapter_model.safetensors")
    foreign_adapters(root)
    return root


def edit(src, dst, fn):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "adapter_model.safetensors")
    sd = load_file(path)
    fn(sd)
    save_file(sd, path)
    return dst


def b_key(sd, i=0):
    return sorted(k for k in sd if k.endswith("lora_B.weight"))[i]


def test_clean_adapter_exits_zero(setup, capsys):
    code, out, err = run(capsys, "validate", setup / "a", "--base", setup / "base")
    assert code == 0 and out == "" and err.strip().endswith("ok (4 module(s) checked against " + str(setup / "base") + ")")
    code, out, _ = run(capsys, "validate", setup / "a", "--format", "json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_one_line_per_finding(setup, tmp_path, capsys):
    def two_bad(sd):
        sd[b_key(sd, 0)][1, 1] = float("nan")
        sd[b_key(sd, 2)][0, 0] = float("-inf")

    edit(setup / "a", tmp_path / "nan", two_bad)
    code, out, err = run(capsys, "validate", tmp_path / "nan")
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: module ") and "NaN or Inf (1 of" in line for line in lines)
    assert err.startswith("loratools: error: ") and err.count("\n") == 1 and "2 problem(s) (2 error(s)" in err


def test_base_findings(setup, capsys):
    code, out, _ = run(capsys, "validate", setup / "wrong_shape", "--base", setup / "base")
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 4 and all(line.startswith("error: module ") and "but the base weight" in line for line in lines)
    code, out, _ = run(capsys, "validate", setup / "gpt2", "--base", setup / "base", "--format", "json")
    data = json.loads(out)
    assert code == 1 and [f["code"] for f in data["findings"]] == ["absent"]
    assert data["findings"][0]["module"] == "transformer.h.0.attn.c_attn"


def test_suspicious_scales_are_warnings(setup, tmp_path, capsys):
    shutil.copytree(setup / "a", tmp_path / "big")
    cfg_path = tmp_path / "big" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["alpha_pattern"] = {"q_proj": 400, "v_proj": -8}
    cfg_path.write_text(json.dumps(cfg))
    code, out, err = run(capsys, "validate", tmp_path / "big")  # warnings alone: listed, exit 0, no "error:"
    assert code == 0 and "error" not in out + err and err.strip().endswith("ok (4 module(s) checked, 5 warning(s))")
    assert out.splitlines()[0].startswith("warning: alpha_pattern gives module(s) matching q_proj, v_proj their own "
                                          "alpha; GGUF converters")
    code, out, err = run(capsys, "validate", tmp_path / "big", "--strict")
    assert code == 1 and "0 error(s), 5 warning(s)" in err and "--strict fails on warnings" in err
    assert sum("scale alpha/r = 100 (alpha 400, rank 4) is unusually large" in x for x in out.splitlines()) == 2
    assert sum("negative alpha -8 flips" in x for x in out.splitlines()) == 2
    # warnings do not stop a merge; validate's errors do
    merge(setup / "base", [tmp_path / "big"], tmp_path / "merged")


def test_update_larger_than_weight_is_flagged_with_base(setup, tmp_path, capsys):
    edit(setup / "a", tmp_path / "huge", lambda sd: sd[b_key(sd)].mul_(1e4))
    code, out, _ = run(capsys, "validate", tmp_path / "huge", "--base", setup / "base")
    assert code == 0 and out.count("warning: ") == 1 and "the base weight's" in out
    assert run(capsys, "validate", tmp_path / "huge", "--base", setup / "base", "--strict")[0] == 1
    code, out, _ = run(capsys, "validate", tmp_path / "huge", "--base", setup / "base", "--no-norms")
    assert code == 0


def test_norms_read_each_shard_once_and_match_the_weights(setup, monkeypatch):
    """validate --base on a sharded folder: ‖W‖ from a bulk read (one open per shard, not per weight)
    equals the norm of the weight itself."""
    base = open_base(str(setup / "base"))
    targets = sorted({m.target for m in base.fit(read_adapter(setup / "a"))})
    opened = []
    real = safetensors_io.SafetensorsFile.__init__
    monkeypatch.setattr(safetensors_io.SafetensorsFile, "__init__",
                        lambda self, path, *a, **k: (opened.append(path), real(self, path, *a, **k))[1])
    norms = checks._weight_norms(base, set(targets))
    assert len(opened) == len(set(opened)) and len(set(base.ckpt.shard_of[t] for t in targets)) == len(opened) > 1
    ref = load_folder(setup / "base")
    assert sorted(norms) == targets
    for t in targets:
        assert torch.allclose(norms[t], torch.linalg.vector_norm(ref[t].float()), rtol=1e-6)


def test_merge_runs_the_same_checks_on_adapter_objects(setup, tmp_path):
    """An in-memory adapter (no reader involved) with NaN, a rank broken after construction, or
    integer factors: merge refuses before it writes, with validate's message."""
    good = read_adapter(setup / "a")
    name = sorted(good.modules)[0]

    def variant(**changes):
        mods = dict(good.modules)
        m = mods[name]
        mods[name] = LoraModule(name, m.down.clone(), m.up.clone(), m.alpha)
        for k, v in changes.items():
            setattr(mods[name], k, v)
        return LoraAdapter(modules=mods)

    nan_up = good.modules[name].up.clone()
    nan_up[0, 0] = float("nan")
    cases = [(variant(up=nan_up), NonFiniteError, "NaN or Inf"),
             (variant(down=good.modules[name].down[:2].clone()), ShapeMismatchError, "rank mismatch"),
             (variant(down=torch.ones(4, 32, dtype=torch.int64)), Exception, "must be floating point"),
             (LoraAdapter(), Exception, "no LoRA modules")]
    for adapter, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            merge(setup / "base", [adapter], tmp_path / "out")
        assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path) == []
        assert any(f.severity == "error" for f in check_all(adapter))


def test_non_finite_result_from_finite_factors(setup, tmp_path, capsys):
    """PEFT's safe_merge: a weight so large that the merged values overflow is caught before writing."""
    code, _, err = run(capsys, "merge", setup / "base", setup / "a", "-o", tmp_path / "out", "-w", "1e40")
    assert code == 2 and "beyond float32's range" in err
    code, _, err = run(capsys, "merge", setup / "base", setup / "a", "-o", tmp_path / "out", "-w", "nan")
    assert code == 2 and "weights must be finite" in err
    # finite in fp32, but beyond fp16's range once rounded into the output dtype
    code, _, err = run(capsys, "merge", setup / "base", setup / "a", "-o", tmp_path / "out", "-w", "1e7",
                       "--dtype", "fp16")
    assert code == 1 and "produced NaN or Inf in torch.float16" in err
    assert os.listdir(tmp_path) == []


def test_raise_errors_groups_absent_modules(setup):
    from loratools.checkpoint import Checkpoint
    from loratools.checks import check_base

    adapter = read_adapter(setup / "gpt2")
    findings = check_base(adapter, Checkpoint(setup / "base"))
    with pytest.raises(IncompatibleError, match=r"^1 adapter module\(s\) match no weight in the base: transformer"):
        raise_errors(findings)
    raise_errors([f for f in findings if f.severity == "warning"])  # warnings never raise


def test_check_adapter_flags_dora_magnitude_and_extra(setup):
    good = read_adapter(setup / "a")
    m = next(iter(good))
    bad = LoraAdapter(modules={m.name: LoraModule(m.name, m.down, m.up, m.alpha, magnitude=torch.ones(3))},
                      extra={"lm_head.weight": torch.full((2, 2), float("inf"))})
    codes = sorted(f.code for f in check_adapter(bad))
    assert codes == ["non-finite", "structure"]


def test_merge_output_unchanged_by_validation(setup, tmp_path):
    """Wiring validate into merge changed no result: the clean adapter still merges like PEFT."""
    from peft import PeftModel

    merge(setup / "base", [setup / "a"], tmp_path / "m")
    ref = PeftModel.from_pretrained(tiny_llama(), setup / "a").merge_and_unload().state_dict()
    out = load_folder(tmp_path / "m")
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6)


def test_rank_and_alpha_patterns_warn_for_gguf(setup, tmp_path, capsys):
    model = tiny_llama()
    peft_adapter(model, str(tmp_path / "p"), rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})
    code, out, _ = run(capsys, "validate", tmp_path / "p")
    lines = [x for x in out.splitlines() if "GGUF converters" in x]
    assert code == 0 and len(lines) == 2 and "rank_pattern gives module(s) matching v_proj their own rank" in lines[1]
    assert run(capsys, "validate", tmp_path / "p", "--strict")[0] == 1
    assert "GGUF" not in run(capsys, "validate", setup / "a")[1]  # one alpha for all: nothing to say
