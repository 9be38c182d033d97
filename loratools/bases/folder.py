"""A Hugging Face model folder (`model.safetensors`, or shards + `model.safetensors.index.json`),
or one plain `.safetensors` file of such weights: parameter names are the file's own."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..adapter import LoraAdapter
from ..atomic import atomic_output
from ..checkpoint import Checkpoint, rewrite
from ..dtypes import output_dtype
from .core import MergePlan, Progress, merge_tensor, plan_merge, refuse_out_type


class ModelFolderBase:
    kind = "model folder"
    adapter_options: dict = {}

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.folder = ckpt.folder
        self.num_tensors = len(ckpt.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.ckpt

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.ckpt.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.ckpt.dtype(name)

    def read(self, name: str) -> torch.Tensor:
        return self.ckpt.read(name)

    def plan(self, adapters: Sequence[Tuple[LoraAdapter, float]], out_type: Optional[str] = None) -> MergePlan:
        refuse_out_type(self, out_type)
        return plan_merge(self.ckpt, adapters)

    def write(self, plan: MergePlan, output: str, out_dtype: Optional[torch.dtype], overwrite: bool,
              check_finite: bool, progress: Progress) -> None:
        ckpt = self.ckpt

        def dtype_of(name: str) -> torch.dtype:
            return output_dtype(ckpt.dtype(name), out_dtype)

        def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
            return merge_tensor(name, tensor, plan.terms.get(name), plan.replace.get(name), dtype_of(name),
                                check_finite, plan.device)

        with atomic_output(output, overwrite=overwrite, directory=True) as tmp:
            plan.not_copied = rewrite(ckpt, tmp, transform, dtype_of, on_tensor=progress,
                                      unchanged=lambda n: n not in plan.terms and n not in plan.replace)

    def describe(self) -> str:
        return f"{self.folder} ({self.kind}, {len(self.ckpt.shards)} shard(s), {self.num_tensors} tensors)"
