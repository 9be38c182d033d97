"""What the Flux and SD3 tests share: random kohya LoRA factors and the bit-exact round trip through a format."""
from __future__ import annotations

import torch

from loratools import safetensors_io
from loratools.formats import read_adapter, write_adapter


def lora_factors(g, rows, cols, rank, sizes=None):
    """(down, up) of a random LoRA on a [rows, cols] weight; `sizes`: B block-diagonal over those row parts, as
    sd-scripts' split_qkv trains a fused q/k/v."""
    if not sizes:
        return torch.randn(rank, cols, generator=g) * 0.3, torch.randn(rows, rank, generator=g) * 0.3
    n = len(sizes)
    down = torch.randn(rank * n, cols, generator=g) * 0.3
    up = torch.zeros(rows, rank * n)
    row = 0
    for j, size in enumerate(sizes):
        up[row:row + size, j * rank:(j + 1) * rank] = torch.randn(size, rank, generator=g) * 0.3
        row += size
    return down, up


def assert_round_trip(adapter, sd: dict, fmt: str, tmp_path):
    """`adapter` (read from the kohya state dict `sd`) written as `fmt`, read again and written as kohya gives
    `sd` back bit for bit (diffusers keeps alphas in its fp32 metadata: equal values). Returns the `fmt` file."""
    out = write_adapter(adapter, tmp_path / f"a.{fmt}.safetensors", format=fmt)
    again = read_adapter(out)
    back, _ = safetensors_io.load(write_adapter(again, tmp_path / f"b.{fmt}.safetensors", format="kohya"))
    assert set(back) == set(sd)
    for k, v in sd.items():
        if fmt == "diffusers" and k.endswith(".alpha"):
            assert float(back[k]) == float(v)
        else:
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), (fmt, k)
    return out
