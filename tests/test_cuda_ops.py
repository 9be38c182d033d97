"""`device="cuda"` gives the CPU results within the documented tolerance (fp32 linear algebra in
another order: relative 1e-4 on ΔW; a merged weight within one rounding step of its dtype).
Every test here skips where torch sees no GPU; the CPU plumbing is tested in test_options.py."""
from __future__ import annotations

import pytest
import torch

from _tiny import assert_close_rel, load_folder, peft_adapter, save_base, tiny_llama, ulp
from test_blend import make_three
from loratools.blending import blend
from loratools.extraction import extract
from loratools.merging import merge
from loratools.resizing import resize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")
REL = 1e-4


def _same_deltas(a, b, rel=REL):
    assert a.modules.keys() == b.modules.keys()
    for name, m in a.modules.items():
        assert m.down.device.type == "cpu" and b.modules[name].down.device.type == "cpu"
        assert_close_rel(b.modules[name].dense_delta(), m.dense_delta(), rel, name)


@pytest.mark.parametrize("kw", [dict(method="svd", rank=3), dict(method="cat"),
                                dict(method="ties", density=0.5, rank=3),
                                dict(method="dare_ties", density=0.7, seed=5, rank=3, svd="exact")])
def test_blend_on_cuda_equals_cpu(kw):
    adapters, weights = make_three()
    cpu, rep_cpu = blend(adapters, weights, device="cpu", **kw)
    gpu, rep_gpu = blend(adapters, weights, device="cuda", **kw)
    _same_deltas(cpu, gpu)
    assert rep_gpu.totals()["retained"] == pytest.approx(rep_cpu.totals()["retained"], rel=REL)


def test_resize_on_cuda_equals_cpu():
    adapters, _ = make_three()
    cpu = resize(adapters[2], rank=2, device="cpu")
    gpu = resize(adapters[2], rank=2, device="cuda")
    _same_deltas(cpu.adapter, gpu.adapter)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    model = tiny_llama(dtype=torch.bfloat16)
    save_base(model, str(root / "base"))
    peft_adapter(model, str(root / "a"))
    save_base(tiny_llama(seed=3, dtype=torch.bfloat16), str(root / "tuned"))
    return root


def test_extract_on_cuda_equals_cpu(models):
    cpu = extract(models / "base", models / "tuned", rank=4, device="cpu")
    gpu = extract(models / "base", models / "tuned", rank=4, device="cuda")
    _same_deltas(cpu.adapter, gpu.adapter, rel=1e-3)  # randomized SVD: the same test matrix, fp32 order differs


def test_merge_on_cuda_equals_cpu(models, tmp_path):
    merge(models / "base", [models / "a"], tmp_path / "cpu", weights=[0.8], device="cpu")
    plan = merge(models / "base", [models / "a"], tmp_path / "gpu", weights=[0.8], device="cuda")
    assert plan.device.startswith("cuda")
    cpu, gpu = load_folder(tmp_path / "cpu"), load_folder(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    for k in cpu:
        assert gpu[k].dtype == cpu[k].dtype
        diff = (gpu[k].float() - cpu[k].float()).abs()
        assert bool((diff <= ulp(cpu[k], cpu[k].dtype)).all()), k
