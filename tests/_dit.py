"""What the DiT (Flux, FLUX.2, SD3, Qwen-Image) tests share: random kohya LoRA factors, the bit-exact round trip
through a format, the fp8 single-file merge and a saved pipeline folder."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from loratools import safetensors_io
from loratools.formats import read_adapter, write_adapter
from tests._tiny import run_cli


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


def merge_into_single(capsys, weights: dict, prefix: str, single, lora, out) -> dict:
    """`weights` saved under `prefix` as the single file `single`, `merge single lora -o out` run: it succeeds;
    returns the merged state dict."""
    save_file({prefix + k: v.contiguous() for k, v in weights.items()}, str(single))
    code, _, err = run_cli(capsys, "merge", single, lora, "-o", out, "-q")
    assert code == 0, err
    return load_file(str(out))


def assert_fp8_merge(capsys, single, lora, out, weights: dict, want: dict, prefix: str) -> dict:
    """`weights` (under `prefix`) saved to the single file `single` with its matrices as fp8 e4m3: merging `lora`
    into it gives each fp8 weight plus its fp32 update (`want` - `weights`), rounded once. Returns that fp8 dict."""
    fp8 = {prefix + k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in weights.items()}
    save_file(fp8, str(single))
    code, _, err = run_cli(capsys, "merge", single, lora, "-o", out, "-q", "--overwrite")
    assert code == 0, err
    got = load_file(str(out))
    for k, v in want.items():
        if v.dim() == 2:  # the fp8 weight plus the fp32 update, rounded once
            ref = (fp8[prefix + k].float() + (v - weights[k])).to(torch.float8_e4m3fn)
            assert got[prefix + k].dtype == torch.float8_e4m3fn
            assert torch.equal(got[prefix + k].float(), ref.float()), k
    return fp8


def save_pipeline_folder(root, class_name: str, comps: dict) -> None:
    """A diffusers pipeline folder in `root`: each of `comps` saved in its subfolder, and a model_index.json naming
    `class_name` and those components."""
    for c, model in comps.items():
        model.save_pretrained(root / c)
    with open(root / "model_index.json", "w") as f:
        json.dump({"_class_name": class_name, **{c: ["x", "y"] for c in comps}}, f)


def lora_files(tmp_path, kinds, state_dict_of) -> list[str]:
    """One LoRA file per kind in `kinds` (seeds 1, 2, …) holding `state_dict_of(seed, kind)`; their paths."""
    out = []
    for seed, kind in enumerate(kinds, start=1):
        path = tmp_path / f"{kind}{seed}.safetensors"
        save_file(state_dict_of(seed, kind), str(path))
        out.append(str(path))
    return out


def delta(m):
    """A LoRA module's ΔW in float64, its scale applied."""
    return m.scale * m.up.double() @ m.down.double()
