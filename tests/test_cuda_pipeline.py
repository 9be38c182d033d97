"""The streaming GPU merge's scheduling (loratools/cuda_pipeline.py), on the CPU.

`LateBackend` (tests/_late_backend.py) stands in for CUDA: it runs queued work as late as a real
GPU may and fails with a HazardError on any buffer access that events do not order. Merges through
it must give the CPU merge's files byte for byte (the CPU merge is itself tested against PEFT).
"""
from __future__ import annotations

import errno
import os
import pathlib

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from _late_backend import HazardError, LateBackend, use_late_backend
from test_merge_diffusion import Case, build_single_file
from _tiny import conv_model_and_adapter, load_folder, peft_adapter, run_cli, save_base, tiny_llama
from loratools import cuda_pipeline, merging, safetensors_io
from loratools.bases import folder as folder_base
from loratools.errors import LoraToolsError, NonFiniteError
from loratools.merging import merge

pytestmark = pytest.mark.filterwarnings("ignore:loratools._C is not built:RuntimeWarning")


@pytest.fixture
def late(monkeypatch):
    return use_late_backend(monkeypatch)


def _files(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        with open(os.path.join(folder, f), "rb") as fh:
            out[f] = fh.read()
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dt).split(".")[1]
        model = tiny_llama(dtype=dt)
        save_base(model, str(root / name), shard="20KB" if dt == torch.bfloat16 else None)
        peft_adapter(model, str(root / f"a_{name}"), target_modules=["q_proj", "v_proj", "down_proj"])
        peft_adapter(model, str(root / f"dora_{name}"), seed=2, use_dora=True)
    return root


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_streamed_merge_equals_cpu_merge(llama, late, tmp_path, dtype):
    adapters = [llama / f"a_{dtype}", llama / f"dora_{dtype}"]
    merge(llama / dtype, adapters, tmp_path / "cpu", weights=[0.7, 1.0], device="cpu")
    plan = merge(llama / dtype, adapters, tmp_path / "gpu", weights=[0.7, 1.0], device="cuda")
    assert late and plan.device == "cuda:0"
    assert _files(tmp_path / "gpu") == _files(tmp_path / "cpu")  # every shard, the index, the config
    backend = late[-1]
    # only the changed tensors crossed to the "device"; the others were copied file to file
    assert backend.h2d == len(plan.terms) == sum(1 for k in load_folder(tmp_path / "cpu")
                                                 if any(p in k for p in ("q_proj", "v_proj", "down_proj")))


def test_streamed_merge_with_dtype_change_and_sharded_output(llama, late, tmp_path):
    """--dtype fp16 on a bf16 base: changed tensors convert on the device, the others on the host."""
    merge(llama / "bfloat16", [llama / "a_bfloat16"], tmp_path / "cpu", dtype="fp16", device="cpu")
    merge(llama / "bfloat16", [llama / "a_bfloat16"], tmp_path / "gpu", dtype="fp16", device="cuda")
    assert _files(tmp_path / "gpu") == _files(tmp_path / "cpu")
    assert len([f for f in os.listdir(tmp_path / "gpu") if f.endswith(".safetensors")]) > 1


def test_conv_modules_stream(late, tmp_path):
    conv_model_and_adapter(tmp_path)
    merge(tmp_path / "base", [tmp_path / "a"], tmp_path / "cpu", device="cpu")
    merge(tmp_path / "base", [tmp_path / "a"], tmp_path / "gpu", device="cuda")
    assert _files(tmp_path / "gpu") == _files(tmp_path / "cpu")


def _tree(folder):
    return {os.path.relpath(os.path.join(r, f), folder): pathlib.Path(r, f).read_bytes()
            for r, _, fs in os.walk(folder) for f in fs}


def test_transposed_and_embedding_modules_stream(late, tmp_path):
    """GPT-2: fan_in_fan_out Conv1D weights (stored [in, out]) and a LoRA on the token embedding."""
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=80, n_positions=32)).eval()
    save_base(gpt2, str(tmp_path / "base"))
    peft_adapter(gpt2, str(tmp_path / "a"), target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True)
    merge(tmp_path / "base", [tmp_path / "a"], tmp_path / "cpu", device="cpu")
    plan = merge(tmp_path / "base", [tmp_path / "a"], tmp_path / "gpu", device="cuda")
    assert _files(tmp_path / "gpu") == _files(tmp_path / "cpu")
    assert "transformer.wte.weight" in plan.terms and late[-1].h2d == len(plan.terms)


def test_diffusion_bases_stream(late, tmp_path):
    """A pipeline folder (UNet convs, two components) and a single file with OpenCLIP's fused q/k/v
    (a third of a tensor's rows per module) stream to the same bytes as the CPU merge."""
    case = Case("sd2", str(tmp_path))
    folder, single = str(tmp_path / "pipe"), str(tmp_path / "model.safetensors")
    case.pipeline().save_pretrained(folder)
    build_single_file(case, single)
    for base, name in ((folder, "pipe"), (single, "single.safetensors")):
        merge(base, [case.adapter()], tmp_path / f"cpu-{name}", weights=[0.6], device="cpu")
        merge(base, [case.adapter()], tmp_path / f"gpu-{name}", weights=[0.6], device="cuda")
    assert _tree(tmp_path / "gpu-pipe") == _tree(tmp_path / "cpu-pipe")
    assert (tmp_path / "gpu-single.safetensors").read_bytes() == (tmp_path / "cpu-single.safetensors").read_bytes()
    assert sum(b.h2d for b in late) > 0


def test_ring_bounds_memory_and_tensors_in_flight(llama, monkeypatch, tmp_path):
    """A slow 'GPU': the reader runs ahead until every slot is taken, never further; buffers are
    the ring's slots times the largest changed tensor, allocated once for all shards."""
    backend = LateBackend(delay=0.01)
    monkeypatch.setattr(merging, "resolve_device", lambda spec: "cuda:0")
    monkeypatch.setattr(cuda_pipeline, "backend_for", lambda device: backend)
    merge(llama / "bfloat16", [llama / "a_bfloat16"], tmp_path / "gpu", device="cuda")
    largest = max(v.numel() * v.element_size() for k, v in load_folder(tmp_path / "gpu").items()
                  if any(p in k for p in ("q_proj", "v_proj", "down_proj")))
    assert backend.max_in_flight == cuda_pipeline.SLOTS
    assert backend.peak["device"] <= cuda_pipeline.SLOTS * largest
    assert backend.peak["host"] <= cuda_pipeline.SLOTS * (2 * largest + 1)


class _NoWait(LateBackend):
    def wait(self, stream, event):  # the kernel no longer waits for its input's copy
        pass


class _NoSync(LateBackend):
    def synchronize(self, event):  # the writer no longer waits for the copy back
        pass


def test_the_checks_catch_broken_ordering(llama, monkeypatch, tmp_path):
    """Drop one wait and the same merge fails: these tests can see a wrong order."""
    monkeypatch.setattr(merging, "resolve_device", lambda spec: "cuda:0")
    for broken in (_NoWait, _NoSync):
        monkeypatch.setattr(cuda_pipeline, "backend_for", lambda device, cls=broken: cls())
        with pytest.raises(HazardError):
            merge(llama / "float32", [llama / "a_float32"], tmp_path / broken.__name__, device="cuda")
        assert not os.path.exists(tmp_path / broken.__name__)


def test_slot_reuse_before_the_copy_back_is_caught(llama, monkeypatch, tmp_path):
    """Hand a slot back before its tensor is written (a ring that does not wait) and it fails."""
    monkeypatch.setattr(merging, "resolve_device", lambda spec: "cuda:0")
    monkeypatch.setattr(cuda_pipeline, "backend_for", lambda device: LateBackend())
    real = cuda_pipeline._Writer.submit

    def submit_and_free(self, job):
        real(self, job)
        if job.slot is not None:
            self.free.put(job.slot)

    monkeypatch.setattr(cuda_pipeline._Writer, "submit", submit_and_free)
    with pytest.raises(HazardError):
        merge(llama / "float32", [llama / "a_float32"], tmp_path / "out", device="cuda")
    assert not os.path.exists(tmp_path / "out")


def _left(tmp_path):
    return sorted(e for e in os.listdir(tmp_path) if e.startswith("."))


def test_a_failing_kernel_leaves_no_output(llama, late, monkeypatch, tmp_path):
    real = folder_base.merge_tensor

    def failing(name, tensor, *args):
        if name.endswith("layers.1.self_attn.v_proj.weight"):
            raise LoraToolsError(f"kernel failed on {name}")
        return real(name, tensor, *args)

    monkeypatch.setattr(folder_base, "merge_tensor", failing)
    with pytest.raises(LoraToolsError, match="kernel failed"):
        merge(llama / "bfloat16", [llama / "a_bfloat16"], tmp_path / "out", device="cuda")
    assert not os.path.exists(tmp_path / "out") and not _left(tmp_path)


def test_a_failing_read_or_write_leaves_no_output(llama, late, monkeypatch, tmp_path):
    real_read = safetensors_io.SafetensorsFile.read

    def bad_read(self, name, scratch=None):
        if name.endswith("layers.1.mlp.down_proj.weight"):
            raise OSError(errno.EIO, "Input/output error")
        return real_read(self, name, scratch)

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", bad_read)
    with pytest.raises(OSError):
        merge(llama / "float32", [llama / "a_float32"], tmp_path / "out", device="cuda")
    assert not os.path.exists(tmp_path / "out") and not _left(tmp_path)
    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", real_read)

    real_write = safetensors_io.StreamingWriter.write

    def full_disk(self, name, tensor):
        if "v_proj" in name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, tensor)

    monkeypatch.setattr(safetensors_io.StreamingWriter, "write", full_disk)
    with pytest.raises(LoraToolsError, match="No space left"):
        merge(llama / "float32", [llama / "a_float32"], tmp_path / "out", device="cuda")
    assert not os.path.exists(tmp_path / "out") and not _left(tmp_path)


def test_non_finite_result_is_found_after_the_copy_back(llama, late, tmp_path):
    """fp16 overflow: the flag travels back with the tensor; same message as the CPU merge."""
    with pytest.raises(NonFiniteError) as cpu:
        merge(llama / "float16", [llama / "a_float16"], tmp_path / "cpu", weights=[1e7], device="cpu")
    with pytest.raises(NonFiniteError) as gpu:
        merge(llama / "float16", [llama / "a_float16"], tmp_path / "gpu", weights=[1e7], device="cuda")
    assert str(gpu.value) == str(cpu.value)
    assert not os.path.exists(tmp_path / "gpu") and not _left(tmp_path)
    # without the check the same merge is written, Inf and all, as on the CPU
    merge(llama / "float16", [llama / "a_float16"], tmp_path / "cpu", weights=[1e7], device="cpu", check_finite=False)
    merge(llama / "float16", [llama / "a_float16"], tmp_path / "gpu", weights=[1e7], device="cuda", check_finite=False)
    assert _files(tmp_path / "gpu") == _files(tmp_path / "cpu")


def test_cli_error_on_the_gpu_path_is_one_line(llama, late, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "merge", llama / "float16", f"{llama / 'a_float16'}:1e7", "-o", out,
                           "--device", "cuda", "-q")
    assert code == 1 and late
    assert err.count("\n") == 1 and "NaN or Inf" in err and "Traceback" not in err, err
    assert not os.path.exists(out) and not _left(tmp_path)


def test_cpu_merge_reports_the_earliest_overflow_whatever_thread_finds_it(llama, tmp_path):
    """Every adapted fp16 weight overflows at weight 1e7; the CPU merge's worker threads may meet them in any
    order, yet the error always names the first one in the file, as the GPU path does."""
    with pytest.raises(NonFiniteError) as gpu_like:
        merge(llama / "float16", [llama / "a_float16"], tmp_path / "o", weights=[1e7], device="cpu")
    assert "model.layers.0.mlp.down_proj.weight" in str(gpu_like.value)  # the first adapted weight in the file
    for i in range(6):
        with pytest.raises(NonFiniteError) as again:
            merge(llama / "float16", [llama / "a_float16"], tmp_path / f"o{i}", weights=[1e7], device="cpu")
        assert str(again.value) == str(gpu_like.value)
