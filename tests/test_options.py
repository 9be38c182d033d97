"""One Options object per operation, checked once and shared by the CLI and the API; `--device`
resolution and its errors (tested on the CPU; the GPU results are in test_cuda_ops.py)."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from _tiny import run_cli, save_base, tiny_llama, tiny_project
from test_blend import make_three
from loratools import options as options_mod
from loratools.blending import BlendOptions, blend
from loratools.conversion import ConvertOptions
from loratools.errors import UsageError
from loratools.extraction import ExtractOptions, extract
from loratools.extraction_plan import plan_extract
from loratools.merging import MergeOptions, merge
from loratools.options import build, resolve_device
from loratools.resizing import ResizeOptions, resize

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU errors; this machine has a GPU")


def test_device_names_resolve_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") == "cpu" and resolve_device(None) == "cpu"
    assert resolve_device(torch.device("cpu")) == "cpu"
    for bad in ("gpu", "cuda:", "cuda:x", "mps", ""):
        with pytest.raises(UsageError, match="use auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    for spec in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device(spec)


def test_device_index_beyond_the_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == "cuda:0" and resolve_device("cuda") == "cuda:0"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(UsageError, match="2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("make, match", [
    (lambda: MergeOptions(weights=[1.0, float("nan")]), "finite"),
    (lambda: MergeOptions(dtype="fp8"), "unknown dtype"),
    (lambda: BlendOptions(method="cat", rank=4), "does not apply"),
    (lambda: BlendOptions(method="ties"), "needs --density"),
    (lambda: BlendOptions(to="nope"), "cannot write"),
    (lambda: ResizeOptions(), "give --rank"),
    (lambda: ResizeOptions(rank=0), "at least 1"),
    (lambda: ExtractOptions(svd="qr"), "unknown --svd"),
    (lambda: ExtractOptions(include=["("]), "--include"),
    (lambda: ExtractOptions(component="vae2"), "unknown component"),
    (lambda: ConvertOptions(to="kohya", device="tpu"), "unknown device"),
])
def test_options_are_checked_on_creation(make, match):
    with pytest.raises(UsageError, match=match):
        make()


def test_options_are_frozen_and_normalised():
    opts = BlendOptions(weights=[1, 2], dtype="bf16", device="cpu")
    assert opts.weights == (1.0, 2.0) and opts.dtype == torch.bfloat16 and opts.sign_rule == "total"
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.method = "cat"
    ext = ExtractOptions(include=["q_proj"], dtype="fp16", device="cpu")
    assert ext.include == ("q_proj",) and ext.dtype == torch.float16 and ext.patterns[0][0].search("a.q_proj")


def test_options_and_keywords_are_not_both_taken():
    opts = ResizeOptions(rank=2, device="cpu")
    assert build(ResizeOptions, opts, rank=None, device="auto") is opts
    with pytest.raises(UsageError, match="rank inside options= or as keywords"):
        build(ResizeOptions, opts, rank=3)
    with pytest.raises(UsageError, match="must be a ResizeOptions"):
        build(ResizeOptions, BlendOptions(device="cpu"))


def test_api_results_equal_with_device_cpu_and_with_options():
    adapters, weights = make_three()
    for kw in (dict(method="svd", rank=3), dict(method="ties", density=0.5, rank=3),
               dict(method="dare_linear", density=0.6, seed=3, rank=2)):
        ref, _ = blend(adapters, weights, **kw)
        cpu, _ = blend(adapters, weights, device="cpu", **kw)
        via, _ = blend(adapters, options=BlendOptions(weights=weights, device="cpu", **kw))
        for name, m in ref.modules.items():
            for other in (cpu, via):
                assert torch.equal(m.up, other.modules[name].up) and torch.equal(m.down, other.modules[name].down)
    a = adapters[0]
    ref, cpu = resize(a, rank=1), resize(a, options=ResizeOptions(rank=1, device="cpu"))
    for name, m in ref.adapter.modules.items():
        assert torch.equal(m.down, cpu.adapter.modules[name].down)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root, _ = tiny_project(tmp_path_factory, "opts")
    tuned = tiny_llama(seed=3)
    save_base(tuned, str(root / "tuned"))
    return root


def test_merge_device_cpu_equals_default(models, tmp_path):
    from _tiny import load_folder

    merge(models / "base", [models / "a"], tmp_path / "default", weights=[0.7])
    merge(models / "base", [models / "a"], tmp_path / "cpu", options=MergeOptions(weights=[0.7], device="cpu"))
    ref, cpu = load_folder(tmp_path / "default"), load_folder(tmp_path / "cpu")
    assert ref.keys() == cpu.keys() and all(torch.equal(ref[k], cpu[k]) for k in ref)


@no_gpu
@pytest.mark.parametrize("args", [
    ("merge", "{base}", "{a}", "-o", "{out}"),
    ("blend", "{a}", "{a}", "-o", "{out}"),
    ("resize", "{a}", "--rank", "2", "-o", "{out}"),
    ("extract", "{base}", "{tuned}", "--rank", "2", "-o", "{out}"),
    ("convert", "{a}", "--to", "kohya", "-o", "{out}.safetensors"),
])
def test_device_cuda_without_gpu_is_one_line_usage_error(models, tmp_path, capsys, args):
    paths = dict(base=models / "base", a=models / "a", tuned=models / "tuned", out=tmp_path / "out")
    code, out, err = run_cli(capsys, *[a.format(**paths) for a in args], "--device", "cuda")
    assert code == 2, err
    assert err.strip().count("\n") == 0 and "no CUDA device" in err and "--device cpu" in err
    assert os.listdir(tmp_path) == []


def test_device_is_in_every_operation_help(capsys):
    for cmd in ("merge", "blend", "resize", "extract", "convert"):
        code, out, _ = run_cli(capsys, cmd, "--help")
        assert code == 0 and "--device" in out and "cuda:N" in out


def test_weights_helper_is_shared():
    assert options_mod.weights_for(None, 2) == (1.0, 1.0)
    with pytest.raises(UsageError, match="2 weight"):
        options_mod.weights_for((1.0, 2.0), 3)


def test_extract_plan_and_run_share_one_options_check(models, tmp_path):
    """The dry-run plan takes the same ExtractOptions as the run; what needs a base model (GGUF) is
    refused by the Options of blend and extract alike, before anything is read or written."""
    for make in (lambda: ExtractOptions(to="gguf"), lambda: BlendOptions(to="gguf")):
        with pytest.raises(UsageError, match=r"convert --to gguf --base MODEL"):
            make()
    opts = ExtractOptions(rank=2, include=["q_proj"], dtype="fp16", device="cpu", component="text_encoder")
    plan = plan_extract(models / "base", models / "tuned", tmp_path / "x", options=opts)
    ref = plan_extract(models / "base", models / "tuned", tmp_path / "x", rank=2, include=["q_proj"], dtype="fp16",
                       component="text_encoder")
    assert plan.to_dict() == ref.to_dict() and plan.modules
    assert all(m.name.startswith("text_encoder.") and "q_proj" in m.name for m in plan.modules)
    with pytest.raises(UsageError, match="rank inside options= or as keywords"):
        plan_extract(models / "base", models / "tuned", options=opts, rank=3)
    result = extract(models / "base", models / "tuned", options=opts)
    assert sorted(m.name for m in result.modules) == sorted(m.name for m in plan.modules)
    assert os.listdir(tmp_path) == []
