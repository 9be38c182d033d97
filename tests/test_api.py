"""The Python API next to the CLI: loratools.inspect / validate, one option name in both, and every
operation's result with a to_dict() and a one-line repr (no tensors, no per-module lists)."""
from __future__ import annotations

import json

import pytest
import torch

import loratools
from _tiny import peft_adapter, run_cli as run, save_base, tiny_project
from loratools.report import Report


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root, model = tiny_project(tmp_path_factory, "api")
    peft_adapter(model, str(root / "b"), seed=7)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_base(model, str(root / "tuned"))
    return root


def _short(obj, *words):
    text = repr(obj)
    assert isinstance(obj, Report)
    assert "\n" not in text and len(text) < 300 and "tensor" not in text, text
    for w in words:
        assert w in text, text
    json.dumps(obj.to_dict())  # JSON-able


def test_results_share_one_short_shape(setup, tmp_path):
    plan = loratools.merge(setup / "base", [setup / "a", setup / "b"], tmp_path / "m", weights=[0.5, 1.0])
    _short(plan, "MergePlan(", "adapters=2", "weights=[0.5, 1.0]")
    _, rep = loratools.blend([setup / "a", setup / "b"], method="cat", output=tmp_path / "bl")
    _short(rep, "BlendReport(", "method='cat'")
    res = loratools.resize(str(setup / "a"), tmp_path / "r", rank=2)
    _short(res, "ResizeResult(", "rank_out=")
    ext = loratools.extract(setup / "base", setup / "tuned", tmp_path / "e", rank=2, svd="randomized", power_iters=1)
    _short(ext, "ExtractResult(", "rank='2'")
    conv = loratools.convert(setup / "a", None, "peft")
    _short(conv, "ConvertReport(", "dry_run=True")


def test_power_iters_is_one_name(setup, tmp_path, capsys):
    """--power-iters and power_iters= do the same thing (the API used to call it n_iter)."""
    with pytest.raises(loratools.LoraToolsError, match="--power-iters must not be negative"):
        loratools.extract(setup / "base", setup / "tuned", tmp_path / "x", rank=2, power_iters=-1)
    code, _, err = run(capsys, "extract", setup / "base", setup / "tuned", "-o", tmp_path / "y", "--rank", "2",
                       "--power-iters", "-1")
    assert code == 2 and err.strip().endswith("--min-diff and --power-iters must not be negative"), err


def test_inspect_api_matches_cli(setup, capsys):
    rep = loratools.inspect(str(setup / "a"))
    _short(rep, "InspectReport(", "format='peft'", "problems=0")
    code, out, _ = run(capsys, "inspect", setup / "a", "--format", "json")
    assert code == 0
    cli = json.loads(out)
    assert cli["modules"] == rep.to_dict()["modules"] and cli["rank"] == rep.to_dict()["rank"]
    assert cli["problems"] == rep.to_dict()["problems"] == []


def test_validate_api_reports_instead_of_raising(setup, tmp_path):
    a = loratools.read_adapter(str(setup / "a"))
    rep = loratools.validate(a, base=str(setup / "base"))
    assert rep.ok and rep.errors == 0 and rep.modules == len(a)
    _short(rep, "ValidateReport(", "ok=True")
    name = next(iter(a.modules))
    a.modules[name].up[0, 0] = float("nan")
    bad = loratools.validate(a)  # no exception: the findings are the answer
    assert not bad.ok and bad.errors >= 1
    assert any(f.code == "non-finite" and f.module == name for f in bad.findings)


def test_blend_error_names_no_option_blend_lacks(setup, tmp_path, capsys):
    """PEFT inputs of one model blended --to kohya: the refusal may not tell blend to use --component."""
    code, _, err = run(capsys, "blend", setup / "a", setup / "b", "-m", "cat", "--to", "kohya",
                       "-o", tmp_path / "k.safetensors")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "loratools convert ADAPTER --component unet --to kohya" in err
    assert "with --component" not in err
    assert not (tmp_path / "k.safetensors").exists()


def test_push_keeps_the_users_readme(setup, tmp_path, capsys):
    """push merges its metadata into a README.md the adapter folder already has; --card replace drops it."""
    import shutil
    folder = tmp_path / "mine"
    shutil.copytree(setup / "a", folder)
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- style\n---\n\n# My adapter\n\nTrained on my cat.\n")
    code, out, err = run(capsys, "push", folder, "me/mine", "--dry-run", "--format", "json")
    assert code == 0, err
    card = json.loads(out)["model_card"]
    assert "Trained on my cat." in card and "license: mit" in card
    assert "- style" in card and "- loratools" in card  # tags joined
    assert "Uploaded with [loratools]" not in card
    code, out, err = run(capsys, "push", folder, "me/mine", "--dry-run", "--format", "json", "--card", "replace")
    assert code == 0, err
    card = json.loads(out)["model_card"]
    assert "Trained on my cat." not in card and "Uploaded with [loratools]" in card
    assert (folder / "README.md").read_text().endswith("Trained on my cat.\n")  # input unchanged
