"""One grammar for every command: ADAPTER:W and -w in merge and blend, -q, examples in every --help."""
from __future__ import annotations

import os

import pytest
import torch

from _tiny import load_folder, peft_adapter, run_cli as run, tiny_project
from loratools.cli.main import COMMANDS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root, model = tiny_project(tmp_path_factory, "grammar")
    peft_adapter(model, str(root / "b"), seed=7)
    peft_adapter(model, str(root / "odd:0.5"), seed=3)  # an existing path that looks like ADAPTER:W
    return root


def test_merge_accepts_both_weight_forms(setup, tmp_path, capsys):
    code, _, err = run(capsys, "merge", setup / "base", f"{setup / 'a'}:0.5", "-o", tmp_path / "colon", "-q")
    assert code == 0, err
    code, _, err = run(capsys, "merge", setup / "base", setup / "a", "-w", "0.5", "-o", tmp_path / "flag", "-q")
    assert code == 0, err
    colon, flag, base = load_folder(tmp_path / "colon"), load_folder(tmp_path / "flag"), load_folder(setup / "base")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(colon[name], base[name])
    assert all(torch.equal(colon[k], flag[k]) for k in base)


def test_blend_accepts_both_weight_forms(setup, tmp_path, capsys):
    outs = []
    for i, args in enumerate([(f"{setup / 'a'}:0.7", f"{setup / 'b'}:-0.2"),
                              (setup / "a", setup / "b", "-w", "0.7", "-w", "-0.2")]):
        out = tmp_path / f"o{i}"
        code, _, err = run(capsys, "blend", *args, "-m", "cat", "-o", out, "-q")
        assert code == 0, err
        outs.append(load_folder(out))
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_existing_path_with_colon_wins(setup, tmp_path, capsys):
    code, _, err = run(capsys, "merge", setup / "base", setup / "odd:0.5", "-o", tmp_path / "m", "--dry-run")
    assert code == 0, err
    code, _, err = run(capsys, "blend", setup / "odd:0.5", setup / "a", "-m", "cat", "-o", tmp_path / "b", "-q")
    assert code == 0, err


@pytest.mark.parametrize("args, message", [
    (["a:0.5", "b", "-w", "1"], "give weights as ADAPTER:WEIGHT or with -w, not both"),
    (["a", "b", "-w", "1"], "1 -w value(s) for 2 adapter(s)"),
    (["a:x"], "expected ADAPTER or ADAPTER:WEIGHT with a number as WEIGHT"),
])
@pytest.mark.parametrize("command", ["merge", "blend"])
def test_weight_errors_are_one_line_usage_errors(setup, tmp_path, capsys, command, args, message):
    args = [str(setup / a) if not a.startswith("-") and a[0] != "1" else a for a in args]
    lead = [setup / "base"] if command == "merge" else []
    code, _, err = run(capsys, command, *lead, *args, "-o", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_help_ends_with_examples(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    body = out.split("Options:")[0].rstrip().splitlines()
    examples = [line for line in body if line.strip().startswith("loratools ")]
    assert 2 <= len(examples) <= 4, body
    assert body[-1].strip().startswith("loratools "), "the examples end the description"


def test_quiet_silences_report_tables(setup, tmp_path, capsys):
    code, _, err = run(capsys, "blend", setup / "a", setup / "b", "-m", "svd", "-o", tmp_path / "b", "-q")
    assert code == 0 and "retained" not in err and "---" not in err
    code, _, err = run(capsys, "resize", setup / "a", "--rank", "2", "-o", tmp_path / "r", "-q")
    assert code == 0 and err == ""
    code, _, err = run(capsys, "convert", setup / "a", "--to", "kohya", "-o", tmp_path / "k.safetensors", "-q",
                       "--component", "unet")
    assert code == 0 and "---" not in err


@pytest.fixture(scope="module")
def pipeline_lora(setup, tmp_path_factory):
    """A kohya SD file with unet and text_encoder modules (from a PEFT adapter given components)."""
    from loratools import read_adapter
    from loratools.conversion import add_component
    import dataclasses

    root = tmp_path_factory.mktemp("pipe")
    a = read_adapter(str(setup / "a"))
    unet, te = add_component(a, "unet"), add_component(a, "text_encoder")
    both = dataclasses.replace(unet, modules={**unet.modules, **te.modules}, extra={})
    return both, root


def test_convert_refuses_a_pipeline_adapter_as_one_peft_adapter(pipeline_lora, tmp_path, capsys):
    from loratools import convert
    from loratools.errors import IncompatibleError

    both, _ = pipeline_lora
    with pytest.raises(IncompatibleError, match="--to peft_diffusion .* --component unet"):
        convert(both, tmp_path / "p", "peft")
    rep = convert(both, tmp_path / "p", "peft", component="text_encoder")
    assert rep.modules == len(both) // 2 and os.path.isfile(tmp_path / "p" / "adapter_config.json")
    assert "ConvertReport(" in repr(rep) and len(repr(rep)) < 300


def test_output_kind_follows_o(setup, tmp_path, capsys):
    code, _, err = run(capsys, "resize", setup / "a", "--rank", "2", "-o", tmp_path / "r.safetensors")
    assert code == 2 and "peft is a folder" in err and err.count("\n") == 1
    code, _, err = run(capsys, "convert", setup / "a", "--component", "unet", "--to", "kohya", "-o", tmp_path / "k/")
    assert code == 2 and "kohya is one .safetensors file" in err
    code, _, err = run(capsys, "convert", setup / "a", "--component", "unet", "--to", "diffusers", "-o",
                       f"{tmp_path / 'd'}/", "-q")
    assert code == 0, err
    assert os.listdir(tmp_path / "d") == ["pytorch_lora_weights.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_convert_dry_run_writes_nothing(setup, tmp_path, capsys):
    code, _, err = run(capsys, "convert", setup / "a", "--component", "unet", "--to", "kohya", "-o",
                       tmp_path / "k.safetensors", "--dry-run")
    assert code == 0 and "nothing written (dry run)" in err and "peak memory" in err
    assert os.listdir(tmp_path) == []


def test_blend_offers_only_writable_formats(setup, tmp_path, capsys):
    code, _, err = run(capsys, "blend", setup / "a", "--to", "lycoris", "-o", tmp_path / "x.safetensors")
    assert code == 2 and "'lycoris' is not one of" in err
    code, out, _ = run(capsys, "blend", "--help")
    assert "lycoris" not in out


@pytest.mark.parametrize("args", [
    ["resize", "{a}", "--rank", "2", "-o", "{out}"],
    ["blend", "{a}", "{b}:0.5", "-m", "svd", "--rank", "3", "-o", "{out}"],
    ["merge", "{base}", "{a}:0.5", "-o", "{out}"],
])
def test_dry_run_prints_plan_and_writes_nothing(setup, tmp_path, capsys, args):
    names = dict(a=setup / "a", b=setup / "b", base=setup / "base", out=tmp_path / "out")
    code, out, err = run(capsys, *[a.format(**names) for a in args], "--dry-run")
    assert code == 0, err
    assert "nothing written (dry run)" in out + err
    if args[0] != "merge":
        assert "peak memory about" in err and "would write" in err
    assert os.listdir(tmp_path) == []


def test_resize_dry_run_reports_new_ranks(setup, tmp_path, capsys):
    code, _, err = run(capsys, "resize", setup / "a", "--rank", "2", "-o", tmp_path / "out", "--dry-run")
    assert code == 0 and "new rank" in err and " 4 " in err and " 2 " in err
