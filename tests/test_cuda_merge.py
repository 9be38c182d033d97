"""The streamed CUDA merge (loratools/cuda_pipeline.py on a real GPU) against the CPU merge, and its
device memory. Every test skips where torch sees no GPU; the ring's scheduling is tested on the CPU
in test_cuda_pipeline.py."""
from __future__ import annotations

import pytest
import torch

from _tiny import conv_model_and_adapter, load_folder, peft_adapter, save_base, tiny_llama, ulp
from loratools import cuda_pipeline
from loratools.merging import merge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")


class CountingBackend(cuda_pipeline.CudaBackend):
    """The real backend, counting the tensors it copies to the device."""

    made: list = []

    def __init__(self, device):
        super().__init__(device)
        self.h2d = 0
        CountingBackend.made.append(self)

    def enqueue(self, stream, fn, reads=(), writes=()):
        self.h2d += bool(reads) and not reads[0].is_cuda  # only the copy in reads host memory
        super().enqueue(stream, fn, reads, writes)


@pytest.fixture
def counting(monkeypatch):
    CountingBackend.made = []
    monkeypatch.setattr(cuda_pipeline, "backend_for", CountingBackend)
    return CountingBackend.made


def _within_one_step(gpu: dict, cpu: dict) -> None:
    """bf16/fp16: within one rounding step (fp32 sums in another order, rounded once); fp32: 1e-5."""
    assert gpu.keys() == cpu.keys()
    for k in cpu:
        assert gpu[k].dtype == cpu[k].dtype, k
        if cpu[k].dtype == torch.float32:
            torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-5, atol=1e-6, msg=k)
            continue
        diff = (gpu[k].float() - cpu[k].float()).abs()
        assert bool((diff <= ulp(cpu[k], cpu[k].dtype)).all()), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_streamed_cuda_merge_equals_cpu(tmp_path, counting, dtype):
    model = tiny_llama(dtype=dtype)
    save_base(model, str(tmp_path / "base"), shard="20KB")
    peft_adapter(model, str(tmp_path / "a"), target_modules=["q_proj", "v_proj", "down_proj"])
    peft_adapter(model, str(tmp_path / "dora"), seed=2, use_dora=True)
    adapters = [tmp_path / "a", tmp_path / "dora"]
    merge(tmp_path / "base", adapters, tmp_path / "cpu", weights=[0.7, 1.0], device="cpu")
    plan = merge(tmp_path / "base", adapters, tmp_path / "gpu", weights=[0.7, 1.0], device="cuda")
    cpu, gpu = load_folder(tmp_path / "cpu"), load_folder(tmp_path / "gpu")
    _within_one_step(gpu, cpu)
    assert sum(b.h2d for b in counting) == len(plan.terms)  # the changed tensors, and only those
    for k in cpu:
        if k not in plan.terms:
            assert torch.equal(gpu[k], cpu[k]), k  # untouched: copied file to file


def test_streamed_cuda_merge_conv(tmp_path, counting):
    conv_model_and_adapter(tmp_path)
    merge(tmp_path / "base", [tmp_path / "a"], tmp_path / "cpu", device="cpu")
    merge(tmp_path / "base", [tmp_path / "a"], tmp_path / "gpu", device="cuda")
    _within_one_step(load_folder(tmp_path / "gpu"), load_folder(tmp_path / "cpu"))
    assert sum(b.h2d for b in counting) == 3


def test_device_memory_stays_at_a_few_tensors(tmp_path):
    """A 40 MB bf16 model whose largest changed tensor is 1 MiB: the device holds the ring's slots, the
    factors and the kernel's fp32 panels, not the model."""
    model = tiny_llama(dtype=torch.bfloat16, hidden_size=512, intermediate_size=1024, num_hidden_layers=12,
                       num_attention_heads=8, num_key_value_heads=4, vocab_size=1024)
    save_base(model, str(tmp_path / "base"), shard="10MB")
    peft_adapter(model, str(tmp_path / "a"), target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                 r=16, lora_alpha=32)
    sd = load_folder(tmp_path / "base")
    model_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    largest = max(t.numel() * t.element_size() for k, t in sd.items() if "proj" in k)
    adapter_bytes = sum(t.numel() * 4 for t in load_folder(tmp_path / "a").values())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    merge(tmp_path / "base", [tmp_path / "a"], tmp_path / "gpu", device="cuda")
    peak = torch.cuda.max_memory_allocated() - before
    # slots x largest (inputs, merged in place) + factors + fp32 panels Bc/Ac of one tensor + flags
    bound = cuda_pipeline.SLOTS * largest + 2 * adapter_bytes + 2 * largest + (1 << 20)
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"
    assert peak < model_bytes / 4
    merge(tmp_path / "base", [tmp_path / "a"], tmp_path / "cpu", device="cpu")
    _within_one_step(load_folder(tmp_path / "gpu"), load_folder(tmp_path / "cpu"))
