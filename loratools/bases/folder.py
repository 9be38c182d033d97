"""A Hugging Face model folder (`model.safetensors`, or shards + `model.safetensors.index.json`),
or one plain `.safetensors` file of such weights: parameter names are the file's own."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..adapter import LoraAdapter
from ..archs import is_llm_base
from ..atomic import atomic_output
from ..checkpoint import Checkpoint, rewrite
from ..dtypes import output_dtype
from ..formats.peft_experts import transposed_for
from .experts import unfuse
from .core import (MergePlan, Progress, device_pipeline, merge_tensor, plan_merge, refuse_out_type, row_merge,
                   streamable)
from .quantized import read_config


class ModelFolderBase:
    kind = "model folder"
    adapter_options: dict = {}

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.folder = ckpt.folder
        self.num_tensors = len(ckpt.infos)
        # PEFT target_parameters adapters learn the layout of the model's expert stacks
        self.adapter_options = {"transposed_experts": transposed_for(None if ckpt.single_file
                                                                     else read_config(ckpt.folder))}
        if not ckpt.single_file and is_llm_base(ckpt.folder):  # kohya-named LLM LoRAs: this model's names
            self.adapter_options["base"] = ckpt.folder

    def __contains__(self, name: str) -> bool:
        return name in self.ckpt

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.ckpt.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.ckpt.dtype(name)

    def read(self, name: str) -> torch.Tensor:
        return self.ckpt.read(name)

    def read_many(self, names):
        return self.ckpt.read_many(names)

    def plan(self, adapters: Sequence[Tuple[LoraAdapter, float]], out_type: Optional[str] = None) -> MergePlan:
        refuse_out_type(self, out_type)
        return plan_merge(self.ckpt, [(self.fit(a), w) for a, w in adapters])

    def fit(self, adapter: LoraAdapter) -> LoraAdapter:
        """Expert-stack modules onto per-expert linears where the checkpoint stores them so."""
        return unfuse(adapter, self.ckpt)

    def write(self, plan: MergePlan, output: str, out_dtype: Optional[torch.dtype], overwrite: bool,
              check_finite: bool, progress: Progress) -> None:
        ckpt = self.ckpt

        def dtype_of(name: str) -> torch.dtype:
            return output_dtype(ckpt.dtype(name), out_dtype)

        stream = device_pipeline(plan, check_finite, lambda n: streamable(plan, n))
        device = stream.device if stream else plan.device

        def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
            return merge_tensor(name, tensor, plan.terms.get(name), plan.replace.get(name), dtype_of(name),
                                check_finite, device)

        def rows_of(name: str):
            return row_merge(name, ckpt.dtype(name), plan.terms.get(name), plan.replace.get(name), dtype_of(name),
                             check_finite, plan.device)

        with atomic_output(output, overwrite=overwrite, directory=True) as tmp:
            plan.not_copied = rewrite(ckpt, tmp, transform, dtype_of, on_tensor=progress, stream=stream,
                                      unchanged=lambda n: n not in plan.terms and n not in plan.replace,
                                      row_merge=rows_of)

    def describe(self) -> str:
        return f"{self.folder} ({self.kind}, {len(self.ckpt.shards)} shard(s), {self.num_tensors} tensors)"
