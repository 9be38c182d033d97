"""A quantized Hugging Face model folder (bitsandbytes 4-bit/8-bit, FP8): adapters see each
quantized weight under its own name, in its logical shape, dequantized exactly (`quant`).

`write` merges in fp32 and writes a plain checkpoint (default bf16) without the quantization
tensors and without `quantization_config` in config.json, so plain `from_pretrained` loads it and
GGUF converters read it; or, with `requantize`, the merged weights quantized again into the same
layout (unmerged weights are copied byte for byte), with the error of each requantized weight in
the plan's `quant_error` (as for GGUF). One shard open and one dequantized weight in memory at a time.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import quant
from ..adapter import LoraAdapter
from ..atomic import atomic_output
from ..checkpoint import Checkpoint, copy_other_files
from ..dtypes import FP8, dtype_name, output_dtype
from ..errors import FormatError, UsageError
from ..safetensors_io import SafetensorsFile, StreamingWriter
from ..formats.peft_experts import transposed_for
from .experts import unfuse
from .core import MergePlan, Progress, merge_tensor, plan_merge

CONFIG = "config.json"
DEFAULT_DTYPE = torch.bfloat16


def read_config(folder: str) -> Optional[dict]:
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: unreadable ({e.__class__.__name__})") from None
    return config if isinstance(config, dict) else None


def is_quantized(ckpt: Checkpoint, config: Optional[dict]) -> bool:
    """config.json names a quantization, or the tensors carry quantization parts."""
    if quant.quant_method(config) is not None:
        return True
    return any(n.endswith(".SCB") or quant.QS_PREFIX in n or i.dtype in FP8
               for n, i in ckpt.infos.items())


class QuantizedBase:
    adapter_options: dict = {}

    def __init__(self, ckpt: Checkpoint, config: Optional[dict] = None, requantize: bool = False):
        self.ckpt, self.folder = ckpt, ckpt.folder
        self.config = config if config is not None else read_config(ckpt.folder)
        self.method = quant.quant_method(self.config)
        self.weights = quant.find_weights(ckpt.infos, self.config, ckpt.read)
        self.part_of = {p: qw for qw in self.weights.values() for p in qw.parts.values()}
        self.num_tensors = len(ckpt.infos)
        self.requantize = requantize
        self.adapter_options = {"transposed_experts": transposed_for(self.config)}
        self.kind = f"quantized model folder ({quant.describe(self.weights.values())})"

    def __contains__(self, name: str) -> bool:
        return name in self.weights or (name in self.ckpt and name not in self.part_of)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.weights[name].shape if name in self.weights else self.ckpt.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.weights[name].dtype if name in self.weights else self.ckpt.dtype(name)

    def parts(self, qw: quant.QuantWeight, f: Optional[SafetensorsFile] = None) -> Dict[str, torch.Tensor]:
        """The stored parts of `qw`; those in the open shard `f` read from it (no header parse per part)."""
        return {role: f.read(p) if f is not None and p in f.tensors else self.ckpt.read(p)
                for role, p in qw.parts.items()}

    def read(self, name: str) -> torch.Tensor:
        """The weight as the model computes with it (quantized weights dequantized, fp32)."""
        qw = self.weights.get(name)
        return quant.dequantize(qw, self.parts(qw)) if qw is not None else self.ckpt.read(name)

    def plan(self, adapters: Sequence[Tuple[LoraAdapter, float]], out_type: Optional[str] = None) -> MergePlan:
        if out_type is not None:
            raise UsageError(f"--out-type {out_type} is for GGUF bases: a {self.kind} is written plain "
                             "(--dtype) or in its own format (--requantize)")
        return plan_merge(self, [(self.fit(a), w) for a, w in adapters])

    def fit(self, adapter: LoraAdapter) -> LoraAdapter:
        return unfuse(adapter, self)

    def describe(self) -> str:
        return (f"{self.folder} ({self.kind}, {len(self.ckpt.shards)} shard(s), {len(self.weights)} quantized "
                f"weight(s); merged output is " + ("requantized" if self.requantize else "dequantized") + ")")

    # ---- writing -----------------------------------------------------------------------------

    def write(self, plan: MergePlan, output: str, out_dtype: Optional[torch.dtype], overwrite: bool,
              check_finite: bool, progress: Progress) -> None:
        if out_dtype is None and not self.requantize:
            out_dtype = DEFAULT_DTYPE
        pending: Dict[str, torch.Tensor] = {}  # requantized parts not yet written
        weight_map: Dict[str, str] = {}
        total = 0
        with atomic_output(output, overwrite=overwrite, directory=True) as tmp:
            for shard in self.ckpt.shards:
                with SafetensorsFile(os.path.join(self.folder, shard)) as f:
                    entries = self._entries(f, plan, out_dtype)
                    with StreamingWriter(os.path.join(tmp, shard), entries, f.metadata or None) as writer:
                        for name, dtype, _ in entries:
                            self._write_one(writer, f, name, dtype, plan, check_finite, pending)
                            weight_map[name] = shard
                    total += writer.data_size
                for name in f.keys():
                    if progress:
                        progress(name)
            skip = list(self.ckpt.weight_files) + [CONFIG]
            plan.not_copied = copy_other_files(self.folder, tmp, skip)
            if self.ckpt.index is not None:
                index = dict(self.ckpt.index, weight_map=weight_map)
                index["metadata"] = dict(index.get("metadata") or {}, total_size=total)
                _dump(os.path.join(tmp, os.path.basename(self.ckpt.index_file)), index)
            if self.config is not None:
                _dump(os.path.join(tmp, CONFIG), self._out_config(out_dtype))

    def _entries(self, f: SafetensorsFile, plan: MergePlan, out_dtype) -> List[Tuple[str, torch.dtype, tuple]]:
        touched = set(plan.terms) | set(plan.replace)
        entries = []
        for name in f.keys():
            info = f.tensors[name]
            qw = self.part_of.get(name)
            if qw is None:
                entries.append((name, output_dtype(info.dtype, out_dtype), tuple(info.shape)))
            elif not self.requantize:
                if name == qw.parts["data"]:  # the weight takes the data's place; its other parts go
                    entries.append((name, out_dtype, qw.shape))
            elif name == qw.parts.get("quant_state") and qw.name in touched:
                entries.append((name, info.dtype, (quant.state_length(qw, info.shape[0]),)))
            else:
                entries.append((name, info.dtype, tuple(info.shape)))
        return entries

    def _write_one(self, writer: StreamingWriter, f: SafetensorsFile, name: str, dtype: torch.dtype,
                   plan: MergePlan, check_finite: bool, pending: Dict[str, torch.Tensor]) -> None:
        qw = self.part_of.get(name)
        terms, repl = plan.terms.get(qw.name if qw else name), plan.replace.get(qw.name if qw else name)
        if qw is None or (self.requantize and not (terms or repl is not None)):
            if not terms and repl is None and dtype == f.tensors[name].dtype:
                writer.copy_from(name, f)  # untouched: bytes as they are
            else:
                writer.write(name, merge_tensor(name, f.read(name), terms, repl, dtype, check_finite))
            return
        if not self.requantize:
            weight = quant.dequantize(qw, self.parts(qw, f))
            writer.write(name, merge_tensor(name, weight, terms, repl, dtype, check_finite))
            return
        if name not in pending:  # first part of this weight met: requantize it, keep its parts
            like = self.parts(qw, f)
            merged = merge_tensor(qw.name, quant.dequantize(qw, like), terms, repl, torch.float32, check_finite)
            new = quant.quantize(qw, merged, like)
            back = quant.dequantize(qw, new)
            # ‖deq(q(W')) − W'‖ / ‖W'‖, reported like GGUF's requantization
            plan.quant_error[qw.name] = float((back - merged).norm() / merged.norm().clamp(min=1e-30))
            plan.types[qw.name] = (qw.scheme, qw.scheme)
            pending.update({qw.parts[role]: t for role, t in new.items()})
        writer.write(name, pending.pop(name))

    def _out_config(self, out_dtype: Optional[torch.dtype]) -> dict:
        config = dict(self.config)
        if not self.requantize:
            config.pop("quantization_config", None)
            key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
            config[key] = dtype_name(out_dtype)
        elif out_dtype is not None:
            config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype_name(out_dtype)
        return config


def _dump(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
