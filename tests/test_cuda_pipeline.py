"""The streaming GPU merge's scheduling (loratools/cuda_pipeline.py), on the CPU.

`LateBackend` stands in for CUDA: it queues work per stream and runs it only when the host waits
for an event that covers it (as late as a real GPU may), and it checks every buffer access with
vector clocks: a queued copy or kernel that touches a buffer another queued operation writes (or
the host touching a buffer a queued operation uses) must be ordered after it by stream order,
event waits or a host synchronize, or the test fails with a HazardError. Merges through it must
give the CPU merge's files byte for byte (the CPU merge is itself tested against PEFT).
"""
from __future__ import annotations

import collections
import errno
import os
import pathlib
import threading
import time
import weakref

import pytest
import torch

from test_merge_diffusion import Case, build_single_file
from _tiny import conv_model_and_adapter, load_folder, peft_adapter, save_base, tiny_llama
from loratools import cuda_pipeline, merging, safetensors_io
from loratools.bases import folder as folder_base
from loratools.errors import LoraToolsError, NonFiniteError
from loratools.merging import merge

pytestmark = pytest.mark.filterwarnings("ignore:loratools._C is not built:RuntimeWarning")


class HazardError(AssertionError):
    pass


class _Stream:
    def __init__(self, idx: int):
        self.idx, self.seq, self.clock, self.ops = idx, 0, {}, collections.deque()


class _Event:
    clock = None  # never recorded: waiting on it is a no-op, as in CUDA


class _Op:
    def __init__(self, stream, clock, fn, what):
        self.stream, self.seq, self.clock, self.fn, self.what = stream, clock[stream.idx], clock, fn, what


def _before(op: _Op, clock: dict) -> bool:
    return clock.get(op.stream.idx, 0) >= op.seq


class LateBackend:
    device = "cpu"

    def __init__(self, delay: float = 0.0):
        self.lock = threading.RLock()
        self.streams, self.host_clock, self.uses = [], {}, {}
        self.delay = delay  # seconds each host synchronize takes (a slow GPU): the reader runs ahead
        self.live, self.peak = collections.Counter(), collections.Counter()  # bytes of host / device buffers
        self.h2d = 0  # tensors copied to the device
        self.failed = None
        self.reads = self.writes = self.max_in_flight = 0

    def _key(self, buf):
        return buf.untyped_storage().data_ptr()

    def stream(self):
        self.streams.append(_Stream(len(self.streams)))
        return self.streams[-1]

    def event(self):
        return _Event()

    def host_buffer(self, nbytes):
        return self._track(nbytes, "host")

    def device_buffer(self, nbytes):
        return self._track(nbytes, "device")

    def _track(self, nbytes, kind):
        buf = torch.full((nbytes,), 0xFF, dtype=torch.uint8)  # 0xFF is NaN in every float type: stale data shows
        self.live[kind] += nbytes
        self.peak[kind] = max(self.peak[kind], self.live[kind])
        weakref.finalize(buf, self._free, kind, nbytes)
        return buf

    def _free(self, kind, nbytes):
        self.live[kind] -= nbytes

    def enqueue(self, stream, fn, reads=(), writes=()):
        with self.lock:
            stream.seq += 1
            stream.clock[stream.idx] = stream.seq
            op = _Op(stream, dict(stream.clock), fn, getattr(fn, "__name__", "op"))
            for buf, write in [(b, False) for b in reads] + [(b, True) for b in writes]:
                for prev, prev_write in self.uses.get(self._key(buf), []):
                    if (write or prev_write) and not (_before(prev, op.clock) or _before(prev, self.host_clock)):
                        raise HazardError(f"{op.what} on stream {stream.idx} races {prev.what} on stream "
                                          f"{prev.stream.idx}")
                self.uses.setdefault(self._key(buf), []).append((op, write))
            if stream.idx == 0:
                self.h2d += 1
            stream.ops.append(op)

    def record(self, event, stream):
        with self.lock:
            event.clock = dict(stream.clock)

    def wait(self, stream, event):
        with self.lock:
            for k, v in (event.clock or {}).items():
                stream.clock[k] = max(stream.clock.get(k, 0), v)

    def _run_until(self, clock):
        for s in self.streams:
            while s.ops and s.ops[0].seq <= clock.get(s.idx, 0):
                op = s.ops.popleft()
                self._run_until(op.clock)
                fn, op.fn = op.fn, None  # done: let go of the buffers it held
                if self.failed is not None:  # like a CUDA error, a failure sticks
                    raise RuntimeError(f"an earlier operation failed: {self.failed}")
                try:
                    fn()
                except BaseException as e:
                    self.failed = e
                    raise

    def synchronize(self, event):
        time.sleep(self.delay)
        with self.lock:
            if event.clock is None:
                return
            self._run_until(event.clock)
            for k, v in event.clock.items():
                self.host_clock[k] = max(self.host_clock.get(k, 0), v)

    def host_access(self, buf, write):
        with self.lock:
            for prev, prev_write in self.uses.get(self._key(buf), []):
                if (write or prev_write) and not _before(prev, self.host_clock):
                    raise HazardError(f"the host {'writes' if write else 'reads'} a buffer that {prev.what} "
                                      f"on stream {prev.stream.idx} may still use")
            self.reads += write  # the reader fills an input buffer; the writer reads an output buffer
            self.writes += not write and buf.numel() > 1
            self.max_in_flight = max(self.max_in_flight, self.reads - self.writes)

    def drain(self):
        with self.lock:
            for s in self.streams:
                self.host_clock[s.idx] = s.seq
            self._run_until(self.host_clock)


@pytest.fixture
def late(monkeypatch):
    """merge(device="cuda") runs the pipeline on a LateBackend; yields the backends it made."""
    made = []

    def backend_for(device):
        made.append(LateBackend())
        return made[-1]

    monkeypatch.setattr(merging, "resolve_device", lambda spec: "cpu" if spec == "cpu" else "cuda:0")
    monkeypatch.setattr(cuda_pipeline, "backend_for", backend_for)
    return made


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
