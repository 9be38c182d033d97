"""Merge on a GPU as a stream: disk -> pinned host -> device -> kernel -> pinned host -> disk.

A bounded ring of slots carries the tensors that a merge changes. Each slot owns a pinned input
buffer, a device buffer, a pinned output buffer and three events. For tensor k in slot s:

  reader (caller's thread)  wait until s is free; read k from disk into s.host_in
  copy stream               H2D s.host_in -> s.dev;                      record s.copied
  compute stream            wait s.copied; out = transform(k, s.dev);    record s.merged
  back stream               wait s.merged; D2H out -> s.host_out;        record s.back
  writer thread             synchronize s.back; check the finite flag; write s.host_out; free s

A slot is handed back only after its `back` event completed, which in stream order implies its
copy and merge completed too, so the next tensor read into it never overwrites a buffer that is
still in flight. With a few slots the disk read of one tensor, the PCIe copies and the kernel of
others and the write of an earlier one all overlap: the merge runs at the speed of the disk or
PCIe, and device memory stays at a few of the largest changed tensors.

Tensors the merge does not change are copied file to file and never touch the GPU; changed ones
it should not stream (`wanted` false: e.g. replaced by an adapter tensor) are transformed on the
host. Everything the GPU does goes through a `Backend` (streams, events, buffers, copies), so
the scheduling is tested on the CPU with a backend that runs queued work late and checks every
buffer access against the events (tests/test_cuda_pipeline.py).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import queue
import threading
from typing import Callable, Optional, Protocol

import torch

from . import ops, safetensors_io
from .errors import LoraToolsError, NonFiniteError
from .safetensors_io import SafetensorsFile

SLOTS = 3  # tensors in flight: one being read, one on the GPU, one being written


class Backend(Protocol):
    """What the pipeline asks of a GPU. `enqueue` runs `fn` in `stream`'s order (the CUDA backend
    calls it at once with the stream current, so what it launches is queued there); `reads` and
    `writes` name the buffers it touches (a checking backend verifies the ordering)."""

    device: str  # where the merge's factors and work tensors live

    def stream(self): ...

    def event(self): ...

    def host_buffer(self, nbytes: int) -> torch.Tensor: ...  # pinned uint8

    def device_buffer(self, nbytes: int) -> torch.Tensor: ...  # uint8 on the device

    def enqueue(self, stream, fn: Callable[[], None], reads=(), writes=()) -> None: ...

    def record(self, event, stream) -> None: ...

    def wait(self, stream, event) -> None: ...  # later work on `stream` waits for `event`

    def synchronize(self, event) -> None: ...  # the host waits for `event`

    def host_access(self, buf: torch.Tensor, write: bool) -> None: ...  # the host touches `buf` now

    def drain(self) -> None: ...  # the host waits for everything queued


class CudaBackend:
    """The real one: torch CUDA streams and events, pinned host memory, non-blocking copies."""

    def __init__(self, device: str):
        self.device = device
        self._dev = torch.device(device)

    def stream(self):
        return torch.cuda.Stream(device=self._dev)

    def event(self):
        return torch.cuda.Event()

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as e:
            raise LoraToolsError(f"cannot pin {nbytes / 2**20:.0f} MiB of host memory for the GPU merge "
                                 f"({str(e).splitlines()[0]}); use --device cpu") from None

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self._dev)

    def enqueue(self, stream, fn, reads=(), writes=()) -> None:
        with torch.cuda.device(self._dev), torch.cuda.stream(stream):
            fn()

    def record(self, event, stream) -> None:
        event.record(stream)

    def wait(self, stream, event) -> None:
        stream.wait_event(event)

    def synchronize(self, event) -> None:
        event.synchronize()

    def host_access(self, buf, write) -> None:
        pass

    def drain(self) -> None:
        torch.cuda.synchronize(self._dev)


def backend_for(device: str) -> Backend:
    """The backend for a resolved device ('cuda:N'); the one place tests swap in another."""
    return CudaBackend(device)


class _Slot:
    def __init__(self, backend: Backend):
        self.copied, self.merged, self.back = backend.event(), backend.event(), backend.event()
        self.host_in = self.dev = self.host_out = None  # grown to the largest tensor routed here
        self.scratch = safetensors_io.ScratchBuffer()  # reads of tensors transformed on the host
        self.out: Optional[torch.Tensor] = None  # the transform's result, alive until copied back
        self.flag: Optional[torch.Tensor] = None
        self.flag_host: Optional[torch.Tensor] = None


@dataclasses.dataclass
class _Job:
    kind: str  # "copy" (file to file), "host" (tensor ready), "device" (wait for the slot)
    name: str
    payload: object = None  # the source file or the tensor
    slot: Optional[_Slot] = None
    dtype: Optional[torch.dtype] = None
    shape: tuple = ()


class DevicePipeline:
    """Streams safetensors files through a merge on one device; one per merge (its buffers serve
    every shard). `wanted(name)`: tensors to merge on the device; `check_finite`: the merged
    results are checked for NaN/Inf (flags read back with them, so nothing waits for the GPU)."""

    def __init__(self, backend: Backend, wanted: Callable[[str], bool], check_finite: bool = True,
                 slots: int = SLOTS):
        self.backend, self.wanted, self.check_finite = backend, wanted, check_finite
        self.device = backend.device
        self.copy_stream, self.compute_stream, self.back_stream = (backend.stream() for _ in range(3))
        self.slots = [_Slot(backend) for _ in range(max(1, slots))]

    def routed(self, wanted: Callable[[str], bool]) -> "DevicePipeline":
        """The same ring with another `wanted` (one per component of a pipeline folder)."""
        other = copy.copy(self)
        other.wanted = wanted
        return other

    def _grow(self, in_bytes: int, out_bytes: int) -> None:
        """Buffers big enough for this file's largest device tensors (all slots are idle here)."""
        for s in self.slots:
            if s.host_in is None or s.host_in.numel() < in_bytes:
                s.host_in, s.dev = None, None  # free before allocating the larger ones
                s.host_in, s.dev = self.backend.host_buffer(in_bytes), self.backend.device_buffer(in_bytes)
            if s.host_out is None or s.host_out.numel() < out_bytes:
                s.host_out = None
                s.host_out = self.backend.host_buffer(out_bytes)
            if s.flag_host is None:
                s.flag_host = self.backend.host_buffer(1)

    def rewrite_file(self, src: str, dst: str, transform: Callable[[str, torch.Tensor], torch.Tensor],
                     out_dtype: Callable[[str], torch.dtype], on_tensor: Optional[Callable[[str], None]] = None,
                     unchanged: Optional[Callable[[str], bool]] = None) -> int:
        """`checkpoint.rewrite_file` with the changed tensors merged on the device (same contract)."""
        with SafetensorsFile(src) as f:
            names = f.keys()
            info = f.tensors
            entries = [(n, out_dtype(n), info[n].shape) for n in names]
            same = {n for n, dt, _ in entries if unchanged is not None and unchanged(n) and dt == info[n].dtype}
            on_device = {n for n in names if n not in same and self.wanted(n)}
            self._grow(max((info[n].end - info[n].begin for n in on_device), default=0),
                       max((safetensors_io.nbytes(out_dtype(n), info[n].shape) for n in on_device), default=0))
            writer = safetensors_io.StreamingWriter(dst, entries, f.metadata or None)
            with writer, _Writer(writer, self) as sink:
                for name, dtype, shape in entries:
                    if name in same:
                        sink.submit(_Job("copy", name, f))
                    elif name in on_device:
                        slot = sink.acquire()
                        self._issue(slot, f, name, transform)
                        sink.submit(_Job("device", name, slot=slot, dtype=dtype, shape=shape))
                    else:
                        slot = sink.acquire()
                        sink.submit(_Job("host", name, transform(name, f.read(name, slot.scratch)), slot))
                    if on_tensor:
                        on_tensor(name)
        return writer.data_size

    def _issue(self, s: _Slot, f: SafetensorsFile, name: str, transform) -> None:
        """Read `name` into the slot and queue its copy in, merge and copy back."""
        b, info = self.backend, f.tensors[name]
        size = info.end - info.begin
        b.host_access(s.host_in, write=True)
        f.read(name, _Fixed(s.host_in))
        dev = s.dev[:size]
        b.enqueue(self.copy_stream, lambda: dev.copy_(s.host_in[:size], non_blocking=True),
                  reads=(s.host_in,), writes=(s.dev,))
        b.record(s.copied, self.copy_stream)
        b.wait(self.compute_stream, s.copied)

        def merge() -> None:
            with ops.deferred_checks() as flags:
                out = transform(name, dev.view(info.dtype).reshape(info.shape))
            if self.check_finite:
                flags.append(ops.finite_flag(out))
            s.out = out
            s.flag = torch.stack(flags).all() if flags and self.check_finite else None

        b.enqueue(self.compute_stream, merge, reads=(s.dev,), writes=(s.dev,))
        b.record(s.merged, self.compute_stream)
        b.wait(self.back_stream, s.merged)

        def back() -> None:
            out = s.out.detach().contiguous().reshape(-1).view(torch.uint8)
            s.host_out[:out.numel()].copy_(out, non_blocking=True)
            if s.flag is not None:
                s.flag_host[:1].copy_(s.flag.reshape(1).view(torch.uint8), non_blocking=True)

        b.enqueue(self.back_stream, back, reads=(s.dev,), writes=(s.host_out, s.flag_host))
        b.record(s.back, self.back_stream)


class _Fixed:
    """A pinned buffer lent to `SafetensorsFile.read` (its `scratch` protocol)."""

    def __init__(self, buf: torch.Tensor):
        self.buf = buf

    def get(self, size: int) -> torch.Tensor:
        return self.buf[:size]


class _Writer:
    """Writes jobs in order on a thread of its own; a device job's slot is freed once written."""

    def __init__(self, writer: safetensors_io.StreamingWriter, pipe: DevicePipeline):
        self.writer, self.pipe = writer, pipe
        self.free: "queue.Queue[_Slot]" = queue.Queue()
        for s in pipe.slots:
            self.free.put(s)
        self.jobs: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="loratools-gpu-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                if self.error is None:
                    self._write(job)
            except BaseException as e:  # reported to the reader at its next step
                self.error = e
            finally:
                if job.slot is not None:
                    job.slot.out = job.slot.flag = None
                    self.free.put(job.slot)

    def _write(self, job: _Job) -> None:
        if job.kind == "copy":
            self.writer.copy_from(job.name, job.payload)
            return
        if job.kind == "host":
            self.writer.write(job.name, job.payload)
            return
        s, b = job.slot, self.pipe.backend
        b.synchronize(s.back)
        if s.flag is not None:
            b.host_access(s.flag_host, write=False)
            if not bool(s.flag_host[0]):
                raise NonFiniteError.merged(job.name, job.dtype)
        b.host_access(s.host_out, write=False)
        size = safetensors_io.nbytes(job.dtype, job.shape)
        self.writer.write(job.name, s.host_out[:size].view(job.dtype).reshape(job.shape))

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def acquire(self) -> _Slot:
        while True:
            self._check()
            try:
                slot = self.free.get(timeout=0.05)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the GPU merge's writer thread stopped") from None
                continue
            self._check()
            return slot

    def submit(self, job: _Job) -> None:
        self._check()
        self.jobs.put(job)

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """All written (the writer's error raised) when the block ends; stopped when it raises."""
        if exc_type is not None:
            self.stop()
            return
        try:
            self.finish()
        except BaseException:
            self.stop()  # a failed write: the device buffers are released as on any error
            raise

    def finish(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self._check()

    def stop(self) -> None:
        self.error = self.error or RuntimeError("stopped")
        self.jobs.put(None)
        self.thread.join()
        with contextlib.suppress(Exception):  # a failed GPU fails again here: report the first error
            self.pipe.backend.drain()  # no copy may still target buffers that are about to go
        for s in self.pipe.slots:
            s.out = s.flag = None

