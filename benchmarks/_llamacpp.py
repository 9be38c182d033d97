"""llama.cpp's own LoRA converter (convert_lora_to_gguf.py) as a baseline for bench_gguf.py.

The converter is not on PyPI on its own; it ships in llama.cpp and in the llama-cpp-python sdist.
Also: each GGUF adapter's effective update (alpha / rank * B @ A, as llama.cpp applies it) against
PEFT's own `get_delta_weight`, to show which file scales each module as PEFT does.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

HOW_TO_GET = ("llama.cpp's converter not given (--llama-cpp DIR): a llama.cpp checkout, or the sdist's copy:\n"
              "  pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && "
              "tar xzf llama_cpp_python-0.3.36.tar.gz\n"
              "  then --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp   (skipping its rows)")


def converter(folder: Optional[str]) -> Optional[str]:
    """The path of convert_lora_to_gguf.py in `folder`, or None (after saying how to get it)."""
    if folder is None:
        print(HOW_TO_GET)
        return None
    script = os.path.join(folder, "convert_lora_to_gguf.py")
    if not os.path.isfile(script) or not os.path.isdir(os.path.join(folder, "gguf-py")):
        sys.exit(f"error: {folder} has no convert_lora_to_gguf.py and gguf-py/: pass a llama.cpp checkout "
                 "or the vendor/llama.cpp folder of the llama-cpp-python sdist")
    return script


def run_process(cmd: List[str], cwd: Optional[str] = None) -> Tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one process, start-up and imports included."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    sec = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{out.decode(errors='replace')[-3000:]}")
    return sec, usage.ru_maxrss / 1024


def llamacpp_export_cmd(script: str, adapter: str, base: str, out: str) -> List[str]:
    # bf16: the benchmark adapter's own type, which loratools keeps ("auto" fails on LoRA tensors in 0.3.36's copy)
    return [sys.executable, script, adapter, "--base", base, "--outfile", out, "--outtype", "bf16"]


def ours_export_cmd(adapter: str, base: str, out: str) -> List[str]:
    return [sys.executable, "-m", "loratools", "convert", adapter, "--to", "gguf", "--base", base, "-o", out]


def peft_deltas(base: str, adapter: str) -> Dict[str, torch.Tensor]:
    """PEFT's own ΔW of every LoRA module (fp32), keyed by the HF module name."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    out = {}
    for name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            out[name] = mod.get_delta_weight("default").float()
    return out


def gguf_deltas(path: str) -> Dict[str, torch.Tensor]:
    """ΔW of every module of a GGUF adapter as llama.cpp applies it: alpha / rank * B @ A."""
    from loratools.gguf_io import metadata, open_reader, to_torch

    r = open_reader(path)
    alpha = float(metadata(r).get("adapter.lora.alpha", 0.0) or 0.0)
    t = {x.name: to_torch(x).float() for x in r.tensors}
    out = {}
    for name, a in t.items():
        if name.endswith(".lora_a"):
            b = t[name[: -len("a")] + "b"]
            out[name[: -len(".lora_a")]] = (alpha / a.shape[0] if alpha else 1.0) * (b @ a)
    return out


def scale_report(base: str, adapter: str, files: Dict[str, str]) -> None:
    """Per module kind and file: the ratio of the file's ΔW to PEFT's, and the relative error."""
    import json

    from loratools.archs.gguf_names import GgufArch, rope_rows

    arch = GgufArch.from_config(json.load(open(os.path.join(base, "config.json"))))
    ref = peft_deltas(base, adapter)
    print(f"{'ΔW vs PEFT get_delta_weight':30s} " + " ".join(f"{k:>26s}" for k in files))
    got = {label: gguf_deltas(path) for label, path in files.items()}
    kinds: Dict[str, Dict[str, List[Tuple[float, float]]]] = {}
    for hf, d in ref.items():
        g = arch.to_gguf(hf)
        heads = arch.heads_of(g)
        want = rope_rows(d, heads) if heads else d  # llama.cpp's q/k row order
        kind = g.split(".")[-2]
        for label, deltas in got.items():
            have = deltas[g]
            ratio = float((have * want).sum() / (want * want).sum())
            err = float((have - want).norm() / want.norm())
            kinds.setdefault(kind, {}).setdefault(label, []).append((ratio, err))
    for kind, by_file in kinds.items():
        cells = []
        for label in files:
            ratios, errs = zip(*by_file[label])
            cells.append(f"ratio {sum(ratios) / len(ratios):6.3f} err {max(errs):8.1e}")
        print(f"{kind:30s} " + " ".join(f"{c:>26s}" for c in cells))
