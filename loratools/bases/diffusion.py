"""What the diffusion bases share: adapter modules are named `<component>.<diffusers module>`
(`unet.…`, `text_encoder.…`). A diffusion base is a set of real tensors plus a `locate` that says
where each such (virtual) parameter lives: in a pipeline, `<component>/` + the same name; in a
single file, an LDM/SGM key, possibly a third of its rows (OpenCLIP's fused q/k/v) or transposed.
`plan_merge` checks the virtual names exactly as it checks an LLM folder; the writer then streams
the real tensors one at a time and applies the planned terms to the right rows.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..adapter import LoraAdapter
from ..archs.family import mismatch
from ..errors import IncompatibleError
from ..dtypes import MERGE_FLOATS, output_dtype
from .core import MergePlan, device_pipeline, merge_tensor, plan_merge, refuse_out_type, streamable

Real = Tuple[Optional[str], str]  # (pipeline component or None for a single file, tensor name)


@dataclasses.dataclass(frozen=True)
class Loc:
    real: Real
    part: Optional[int] = None  # third of the rows (fused q/k/v)
    transpose: bool = False


class DiffusionBase:
    """The `Base` protocol over virtual names; subclasses say where each lives and write the result."""

    kind = ""
    folder = ""
    components: Sequence[str] = ()
    family: Optional[str] = None  # SD 1.x, SDXL … (archs.family), when known
    noun = "checkpoint"  # how a family mismatch names this base: "SDXL LoRA, SD 1.x checkpoint"
    shards: List[str] = []
    infos: Dict[str, object] = {}
    adapter_options: Dict[str, object] = {}

    @property
    def num_tensors(self) -> int:
        return len(self.infos)

    def describe(self) -> str:
        return f"{self.folder} ({self.kind}, {len(self.shards)} shard(s), {self.num_tensors} tensors)"

    def locate(self, name: str) -> Optional[Loc]:
        raise NotImplementedError

    def real_shape(self, real: Real) -> Tuple[int, ...]:
        raise NotImplementedError

    def real_dtype(self, real: Real) -> torch.dtype:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return self.locate(name) is not None

    def shape(self, name: str) -> Tuple[int, ...]:
        loc = self.locate(name)
        s = tuple(self.real_shape(loc.real))
        if loc.part is not None:
            s = (s[0] // 3,) + s[1:]
        return s[::-1] if loc.transpose else s

    def dtype(self, name: str) -> torch.dtype:
        return self.real_dtype(self.locate(name).real)

    def read(self, name: str) -> torch.Tensor:
        """The base weight a virtual name stands for (a view of one real tensor)."""
        loc = self.locate(name)
        t = self.read_real(loc.real)
        if loc.part is not None:
            t = t.narrow(0, loc.part * (t.shape[0] // 3), t.shape[0] // 3)
        return t.t() if loc.transpose else t

    def read_real(self, real: Real) -> torch.Tensor:
        raise NotImplementedError

    def plan(self, adapters: Sequence[Tuple[LoraAdapter, float]], out_type: Optional[str] = None) -> MergePlan:
        """Check every module names a component, fit 1×1 conv/linear layouts, then plan_merge."""
        refuse_out_type(self, out_type)
        unknown = [m.name for a, _ in adapters for m in a if m.name.partition(".")[0] not in self.components]
        unknown += [n for a, _ in adapters for n in a.extra if n.partition(".")[0] not in self.components]
        if unknown:
            for a, _ in adapters:
                named = mismatch(a, self.family, self.noun)
                if named:
                    raise IncompatibleError(named)
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise IncompatibleError(
                f"{len(unknown)} adapter module(s) name no component of this {self.kind} "
                f"(it has {', '.join(self.components)}; names must start with one, e.g. {self.components[0]}.…; "
                f"an adapter for another model?): {shown}")
        return plan_merge(self, [(self.fit(a), w) for a, w in adapters])

    def fit(self, adapter: LoraAdapter) -> LoraAdapter:
        """The adapter in this base's module names (a layout's own hook); plan_merge then fits each
        module's factors to the weight's shape (`adapter.fit_adapter`)."""
        return adapter

    def _writer_args(self, plan: MergePlan, out_dtype: Optional[torch.dtype], check_finite: bool):
        """Per component (None for a single file): the writer's transform, dtype_of and unchanged."""
        groups: Dict[Real, List[Tuple[str, Loc]]] = {}
        for name in list(plan.terms) + [n for n in plan.replace if n not in plan.terms]:
            loc = self.locate(name)
            groups.setdefault(loc.real, []).append((name, loc))
        # on a GPU: stream the tensors that only LoRA terms change (a replacement stays on the host)
        stream = device_pipeline(plan, check_finite,
                                 lambda real: real in groups and all(streamable(plan, n) for n, _ in groups[real]))
        device = stream.device if stream else plan.device

        def dtype_for(comp):
            def dtype_of(key: str) -> torch.dtype:
                return output_dtype(self.real_dtype((comp, key)), out_dtype)
            return dtype_of

        def transform_for(comp):
            dtype_of = dtype_for(comp)

            def transform(key: str, tensor: torch.Tensor) -> torch.Tensor:
                target = dtype_of(key)
                parts = groups.get((comp, key))
                if not parts:  # converted (and checked for overflow) like the LLM path does
                    return merge_tensor(key, tensor, None, None, target, check_finite)
                same = target == tensor.dtype and tensor.dtype in MERGE_FLOATS  # fp8: work in fp32
                work_dtype = tensor.dtype if same else torch.float32
                work = tensor.to(work_dtype)
                for name, loc in parts:
                    view = work
                    if loc.part is not None:
                        rows = work.shape[0] // 3
                        view = work.narrow(0, loc.part * rows, rows)
                    if loc.transpose:
                        view = view.t()
                    merged = merge_tensor(name, view.contiguous(), plan.terms.get(name), plan.replace.get(name),
                                          work_dtype, check_finite, device)
                    view.copy_(merged)
                return merge_tensor(key, work, None, None, target, check_finite)
            return transform

        def writer_args(comp):
            return dict(transform=transform_for(comp), out_dtype=dtype_for(comp),
                        unchanged=lambda key: (comp, key) not in groups,
                        stream=stream.routed(lambda key: stream.wanted((comp, key))) if stream else None)
        return writer_args

