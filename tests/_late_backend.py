"""A stand-in for CUDA that runs queued work as late as a GPU may and checks every buffer access.

`LateBackend` queues work per stream and runs it only when the host waits for an event that covers
it, and it checks every buffer access with vector clocks: a queued copy or kernel that touches a
buffer another queued operation writes (or the host touching a buffer a queued operation uses) must
be ordered after it by stream order, event waits or a host synchronize, or it raises HazardError.
"""
from __future__ import annotations

import collections
import threading
import time
import weakref

import torch

from loratools import cuda_pipeline, merging


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


def use_late_backend(monkeypatch) -> list:
    """merge(device="cuda") runs the pipeline on a LateBackend; returns the list of backends it makes."""
    made = []

    def backend_for(device):
        made.append(LateBackend())
        return made[-1]

    monkeypatch.setattr(merging, "resolve_device", lambda spec: "cpu" if spec == "cpu" else "cuda:0")
    monkeypatch.setattr(cuda_pipeline, "backend_for", backend_for)
    return made
