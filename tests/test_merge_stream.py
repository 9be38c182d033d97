"""How a model folder is merged: weights with plain LoRA terms stream through worker threads in
pieces of rows (read, merge in place, write at a fixed place of the output), everything else is
merged whole. The oracle for the pieces is the whole-tensor merge (`merge_tensor`), which must give
the same bits; the dense reference checks both."""
from __future__ import annotations

import ctypes
import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from _tiny import load_folder, peft_adapter, save_base, tiny_llama
from loratools import checkpoint, merge, safetensors_io
from loratools.bases import core
from loratools.errors import LoraToolsError, NonFiniteError

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    out = {}
    for dtype in DTYPES:
        name = str(dtype).split(".")[-1]
        # odd sizes: pieces end mid-weight, rows are not a multiple of the kernel's tiles
        model = tiny_llama(dtype=dtype, hidden_size=40, intermediate_size=52, vocab_size=101)
        save_base(model, str(root / f"base-{name}"), shard="20KB")
        peft_adapter(model.float(), str(root / f"a-{name}"), target_modules=["q_proj", "down_proj", "up_proj"], r=5)
        peft_adapter(model.float(), str(root / f"b-{name}"), seed=3, target_modules=["down_proj"], r=3)
        out[dtype] = (root / f"base-{name}", root / f"a-{name}", root / f"b-{name}")
    return out


def merged(base, adapters, out, monkeypatch, piece_rows=None, workers=None, whole=False, pieces=None):
    if pieces is not None:  # count the pieces streamed
        run_piece = checkpoint._merge_piece
        monkeypatch.setattr(checkpoint, "_merge_piece", lambda *a: (pieces.append(a[2:4]), run_piece(*a)))
    if piece_rows is not None:  # bytes of `piece_rows` rows of the widest weight (52 columns, <= 4 bytes)
        monkeypatch.setattr(checkpoint, "PIECE_BYTES", piece_rows * 52 * 4)
    if workers is not None:
        monkeypatch.setattr(checkpoint, "MAX_WORKERS", workers)
    if whole:  # every weight through merge_tensor: the oracle
        monkeypatch.setattr("loratools.bases.folder.row_merge", lambda *a, **k: None)
    merge(str(base), [str(a) for a in adapters], str(out), weights=[0.7, -1.3][: len(adapters)])
    monkeypatch.undo()
    return load_folder(out)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("piece_rows,workers", [(3, 2), (1, 3), (1000, 1)])
def test_pieces_match_whole_merge_bit_for_bit(models, tmp_path, monkeypatch, dtype, piece_rows, workers):
    base, a, b = models[dtype]
    ranges = []
    pieces = merged(base, [a, b], tmp_path / "pieces", monkeypatch, piece_rows, workers, pieces=ranges)
    # 2 layers x (q, up, down): down_proj has 40 rows, the others 40 and 52
    assert len(ranges) == sum(-(-rows // min(rows, piece_rows * 52 * 4 // (cols * dtype.itemsize)))
                              for rows, cols in ((40, 40), (52, 40), (40, 52)) for _ in range(2))
    whole = merged(base, [a, b], tmp_path / "whole", monkeypatch, whole=True)
    assert pieces.keys() == whole.keys()
    for name in whole:
        assert pieces[name].dtype == whole[name].dtype and torch.equal(pieces[name].view(torch.uint8),
                                                                       whole[name].view(torch.uint8)), name
    # and both are the merge: W + 0.7 s_a B_a A_a - 1.3 s_b B_b A_b (dense, in fp64)
    w = load_folder(base)["model.layers.1.mlp.down_proj.weight"].double()
    delta = torch.zeros_like(w)
    for folder, c in ((a, 0.7), (b, -1.3)):
        sd = load_file(folder / "adapter_model.safetensors")
        cfg = json.loads((folder / "adapter_config.json").read_text())
        key = "base_model.model.model.layers.1.mlp.down_proj.lora_"
        delta += c * cfg["lora_alpha"] / cfg["r"] * (sd[key + "B.weight"].double() @ sd[key + "A.weight"].double())
    got = pieces["model.layers.1.mlp.down_proj.weight"].double()
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert torch.allclose(got, w + delta, atol=tol, rtol=tol)


def test_row_merge_only_for_plain_terms_on_the_cpu(models):
    base, a, _ = models[torch.float32]
    from loratools.bases import open_base
    from loratools.formats import read_adapter

    model = open_base(str(base))
    plan = model.plan([(read_adapter(str(a)), 1.0)])
    name = next(iter(plan.terms))
    terms = plan.terms[name]
    assert core.row_merge(name, torch.float32, terms, None, torch.float32) is not None
    assert core.row_merge(name, torch.float32, terms, None, torch.bfloat16) is None  # dtype changes
    assert core.row_merge(name, torch.float32, terms, torch.zeros(1), torch.float32) is None  # replaced
    assert core.row_merge(name, torch.float32, terms, None, torch.float32, device="cuda:0") is None
    assert core.row_merge(name, torch.float64, terms, None, torch.float64) is None  # fp64: torch, whole


def test_overflow_in_a_piece_writes_nothing(tmp_path, monkeypatch):
    model = tiny_llama(dtype=torch.float16)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[40, 7] = 65000.0
    save_base(model, str(tmp_path / "base"))
    peft_adapter(model.float(), str(tmp_path / "a"), target_modules=["up_proj"])
    sd = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for k in sd:  # ΔW[40, 7] = 8/4 * 100 * 100 = 20000: 65000 + 20000 overflows fp16
        sd[k].zero_()
        if "layers.1.mlp.up_proj.lora_B" in k:
            sd[k][40, 0] = 100.0
        if "layers.1.mlp.up_proj.lora_A" in k:
            sd[k][0, 7] = 100.0
    save_file(sd, tmp_path / "a" / "adapter_model.safetensors")
    monkeypatch.setattr(checkpoint, "PIECE_BYTES", 8 * 32 * 2)  # the bad row is in a later piece
    with pytest.raises(NonFiniteError, match="up_proj.*NaN or Inf"):
        merge(str(tmp_path / "base"), [str(tmp_path / "a")], str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["a", "base"]  # no output, no temporary left


def test_full_disk_fails_before_writing(models, tmp_path, monkeypatch):
    base, a, _ = models[torch.bfloat16]

    def no_space(fd, mode, offset, length):
        ctypes.set_errno(errno.ENOSPC)
        return -1
    monkeypatch.setattr(safetensors_io, "_FALLOCATE", no_space)
    with pytest.raises(LoraToolsError, match="No space left on device; nothing was written"):
        merge(str(base), [str(a)], str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_file_system_without_fallocate_still_writes(models, tmp_path, monkeypatch):
    base, a, _ = models[torch.bfloat16]
    want = merged(base, [a], tmp_path / "want", monkeypatch)

    def unsupported(fd, mode, offset, length):
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1
    monkeypatch.setattr(safetensors_io, "_FALLOCATE", unsupported)
    got = merged(base, [a], tmp_path / "got", monkeypatch)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_writer_takes_pieces_in_any_order_from_any_thread(tmp_path):
    import threading

    t = torch.arange(60, dtype=torch.float32).reshape(12, 5)
    w = safetensors_io.StreamingWriter(str(tmp_path / "x.safetensors"),
                                       [("a", torch.int8, (3,)), ("t", torch.float32, (12, 5))])
    w.write("a", torch.tensor([1, 2, 3], dtype=torch.int8))
    pos = w.claim("t", torch.float32, (12, 5))
    rows = [threading.Thread(target=w.pwrite, args=(pos + r * 20, t[r:r + 4])) for r in (8, 0, 4)]
    for th in rows:
        th.start()
    for th in rows:
        th.join()
    w.close()
    out = load_file(tmp_path / "x.safetensors")
    assert torch.equal(out["t"], t) and out["a"].tolist() == [1, 2, 3]


def test_writer_refuses_a_missing_piece(tmp_path):
    w = safetensors_io.StreamingWriter(str(tmp_path / "x.safetensors"), [("t", torch.float32, (4, 2))])
    pos = w.claim("t", torch.float32, (4, 2))
    w.pwrite(pos, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="after 16 of 32 bytes"):
        w.close()


def test_read_rows_matches_safetensors(models):
    base = models[torch.float16][0]
    shard = sorted(p for p in os.listdir(base) if p.endswith(".safetensors"))[0]
    want = load_file(base / shard)
    with safetensors_io.SafetensorsFile(str(base / shard)) as f:
        scratch = safetensors_io.ScratchBuffer()
        for name in f.keys():
            n = f.tensors[name].shape[0]
            for start, stop in ((0, n), (n // 3, n), (0, 0)):
                assert torch.equal(f.read_rows(name, start, stop, scratch), want[name][start:stop])
