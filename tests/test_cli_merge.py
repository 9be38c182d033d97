"""`loratools merge` from the command line: success, dry run and the one-line errors."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from _tiny import foreign_adapters, load_folder, peft_adapter, run_cli as run, tiny_project
from loratools.cli.main import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root, model = tiny_project(tmp_path_factory, "cli")
    peft_adapter(model, str(root / "b"), seed=7, target_modules=["up_proj"])
    foreign_adapters(root)
    return root


def no_leftovers(folder):
    return [p for p in os.listdir(folder) if p.startswith(".")] == []


def test_merge_two_adapters(setup, tmp_path, capsys):
    code, _, err = run(capsys, "merge", setup / "base", setup / "a", setup / "b", "-o", tmp_path / "out",
                       "--weight", "0.5", "--weight", "2", "-q")
    assert code == 0, err
    assert "merged" in err
    out = load_folder(tmp_path / "out")
    base = load_folder(setup / "base")
    assert not torch.equal(out["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(out["model.norm.weight"], base["model.norm.weight"])


def test_dry_run_writes_nothing(setup, tmp_path, capsys):
    code, out, _ = run(capsys, "merge", setup / "base", setup / "a", "-o", tmp_path / "out", "--dry-run")
    assert code == 0
    assert "4 weights would be merged" in out and "dry run" in out
    assert not os.path.exists(tmp_path / "out")


def test_existing_output_refused_then_overwritten(setup, tmp_path, capsys):
    os.makedirs(tmp_path / "out")
    code, _, err = run(capsys, "merge", setup / "base", setup / "a", "-o", tmp_path / "out")
    assert code == 1 and err.count("\n") == 1 and "--overwrite" in err
    code, _, err = run(capsys, "merge", setup / "base", setup / "a", "-o", tmp_path / "out", "--overwrite", "-q")
    assert code == 0, err
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")
    assert no_leftovers(tmp_path)


@pytest.mark.parametrize("adapter,message", [
    ("gpt2", "match no weight in the base: transformer.h.0.attn.c_attn"),
    ("wrong_shape", "has shape (48, 48) but the base weight"),
    ("missing", "no such file or folder"),
])
def test_bad_adapter_is_one_line_error(setup, tmp_path, capsys, adapter, message):
    code, out, err = run(capsys, "merge", setup / "base", setup / adapter, "-o", tmp_path / "out")
    assert code == 1
    assert err.startswith("loratools: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    assert not os.path.exists(tmp_path / "out") and no_leftovers(tmp_path)


def test_weight_count_mismatch_is_usage_error(setup, tmp_path, capsys):
    code, _, err = run(capsys, "merge", setup / "base", setup / "a", setup / "b", "-o", tmp_path / "o", "-w", "1")
    assert code == 2 and "2 adapter(s)" in err


def test_bad_option_is_usage_error(setup, tmp_path, capsys):
    code, _, err = run(capsys, "merge", setup / "base", setup / "a", "-o", tmp_path / "o", "--dtype", "int4")
    assert code == 2 and "int4" in err


def test_non_finite_result_writes_nothing(setup, tmp_path, capsys):
    import shutil

    shutil.copytree(setup / "a", tmp_path / "nan")
    path = tmp_path / "nan" / "adapter_model.safetensors"
    sd = load_file(path)
    key = sorted(k for k in sd if k.endswith("lora_B.weight"))[-1]
    sd[key][0, 0] = float("inf")
    save_file(sd, path)
    code, _, err = run(capsys, "merge", setup / "base", tmp_path / "nan", "-o", tmp_path / "out")
    assert code == 1 and "NaN or Inf" in err
    assert not os.path.exists(tmp_path / "out") and no_leftovers(tmp_path)


def test_base_not_a_model(setup, tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    code, _, err = run(capsys, "merge", tmp_path / "empty", setup / "a", "-o", tmp_path / "out")
    assert code == 1 and "no .safetensors weights" in err


def test_output_dtype_option(setup, tmp_path, capsys):
    code, _, err = run(capsys, "merge", setup / "base", setup / "a", "-o", tmp_path / "out", "--dtype", "fp16", "-q")
    assert code == 0, err
    assert all(v.dtype == torch.float16 for v in load_folder(tmp_path / "out").values())


def test_debug_shows_traceback(setup, tmp_path, monkeypatch):
    from loratools.errors import IncompatibleError

    monkeypatch.setenv("LORATOOLS_DEBUG", "1")
    with pytest.raises(IncompatibleError):
        main(["merge", str(setup / "base"), str(setup / "gpt2"), "-o", str(tmp_path / "out")])


def test_python_entry_point(setup, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "loratools", "merge", str(setup / "base"), str(setup / "gpt2"),
                        "-o", str(tmp_path / "o")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.returncode == 1 and r.stderr.startswith("loratools: error:") and "Traceback" not in r.stderr
