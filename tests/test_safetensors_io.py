"""The streaming safetensors reader/writer against the safetensors package (the oracle)."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools import safetensors_io as io


@pytest.fixture
def src(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(300, 70, generator=g).to(torch.bfloat16), "b": torch.arange(11),
               "h": torch.randn(5, generator=g).half(), "empty": torch.zeros(0, 3)}
    path = tmp_path / "src.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "k": "v"})
    return path, tensors


def test_read_matches_safetensors(src):
    path, tensors = src
    with io.SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt", "k": "v"}
        scratch = io.ScratchBuffer()
        for name in f.keys():
            assert torch.equal(f.read(name), tensors[name])
            assert torch.equal(f.read(name, scratch), tensors[name])


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "pread_fallback"])
def test_copy_from_is_byte_exact(src, tmp_path, monkeypatch, kernel_copy):
    path, tensors = src
    if not kernel_copy:
        def refuse(*args, **kwargs):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    with io.SafetensorsFile(path) as f:
        w = io.StreamingWriter(str(tmp_path / "dst.safetensors"),
                               [(n, f.tensors[n].dtype, f.tensors[n].shape) for n in f.keys()], f.metadata)
        for name in f.keys():
            w.copy_from(name, f)
        w.close()
    out = load_file(tmp_path / "dst.safetensors")
    assert out.keys() == tensors.keys() and all(torch.equal(out[k], tensors[k]) for k in tensors)


def test_writer_refuses_out_of_order_and_incomplete(tmp_path):
    w = io.StreamingWriter(str(tmp_path / "x.safetensors"), [("a", torch.float32, (2,)), ("b", torch.float32, (3,))])
    with pytest.raises(ValueError, match="expected a"):
        w.write("b", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="after 1 of 2"):
        w.close()


def test_save_is_readable_by_safetensors(tmp_path):
    t = {"z": torch.randn(4, 4).to(torch.bfloat16), "a": torch.ones(3, dtype=torch.int8)}
    io.save(str(tmp_path / "o.safetensors"), t, {"format": "pt"})
    out = load_file(tmp_path / "o.safetensors")
    assert all(torch.equal(out[k], t[k]) for k in t)


def test_load_handles_unaligned_offsets(tmp_path):
    """A header whose length is not a multiple of 8 leaves tensors unaligned; load must still work."""
    import json
    import struct

    a = torch.arange(6, dtype=torch.float32)
    b = torch.tensor([1, 2, 3], dtype=torch.int16)
    data = b.numpy().tobytes() + a.numpy().tobytes()  # the fp32 tensor starts at byte 6
    header = json.dumps({"b": {"dtype": "I16", "shape": [3], "data_offsets": [0, 6]},
                         "a": {"dtype": "F32", "shape": [6], "data_offsets": [6, 30]}}).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    tensors, _ = io.load(str(path))
    assert torch.equal(tensors["a"], a) and torch.equal(tensors["b"], b)
    assert torch.equal(load_file(path)["a"], a)  # the oracle reads the same file
