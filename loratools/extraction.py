"""Extract a LoRA from a fine-tuned model: factor W_tuned − W_base for every weight that changed.

Both checkpoints are streamed tensor by tensor (one base shard open, one pair of tensors in
memory). The difference is factored in fp32: a randomized SVD with power iterations for large
matrices, an exact SVD for small ones (and for sv_cumulative, which needs every σ). The result is
the best rank-k approximation of the difference (up to the randomized SVD's accuracy), written
as a PEFT adapter (alpha = rank, so the scale is 1) or any other format loratools writes.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from . import paths
from .patterns import UserPattern
from .adapter import LoraAdapter, LoraModule
from .archs import COMPONENTS
from .atomic import check_output
from .checkpoint import Checkpoint
from .dtypes import FLOATS, parse_dtype
from .errors import IncompatibleError, NonFiniteError, ShapeMismatchError, UsageError
from .formats import check_uniform_scale, check_writable_alone, output_is_folder, uniform, write_adapter
from .provenance import stamp
from .report import Report
from .linalg import OVERSAMPLE, exact_svd, randomized_svd, select_rank, split_factors, uses_exact_svd
from .ops import all_finite
from .options import build, resolve_device
from .resizing import ModuleResize, check_rank_options, summarize
from .safetensors_io import SafetensorsFile

SVD_METHODS = ("auto", "exact", "randomized")
# input and output embedding tables: large, rarely low-rank, skipped unless asked for
_EMBEDDING = re.compile(r"(^|\.)(lm_head|embed_out|wte|wpe|shared|[^.]*embed[^.]*)$")
_OUTPUT_EMBEDDING = re.compile(r"(^|\.)(lm_head|embed_out)$")


@dataclass(repr=False)
class ExtractResult(Report):
    adapter: LoraAdapter
    modules: List[ModuleResize]  # old_rank is the difference's full rank bound min(out, in)
    methods: Dict[str, str] = field(default_factory=dict)  # module -> "exact" | "randomized"
    skipped: Dict[str, List[str]] = field(default_factory=dict)  # reason -> tensor names
    output: Optional[str] = None

    @property
    def average_fro_retained(self) -> float:
        return sum(m.fro_retained for m in self.modules) / len(self.modules) if self.modules else 1.0

    def summary(self) -> dict:
        return {"format": self.adapter.format, "modules": len(self.modules), "rank": self.adapter.rank_range,
                "average_fro_retained": self.average_fro_retained, "output": self.output}

    def to_dict(self) -> dict:
        return dict(self.summary(), modules=[dict(m.as_dict(), svd=self.methods[m.name]) for m in self.modules],
                    skipped=self.skipped)

    def skip(self, reason: str, name: str) -> None:
        self.skipped.setdefault(reason, []).append(name)


@dataclass(frozen=True)
class ExtractOptions:
    """What `extract` does, checked once on creation (the CLI and the API build the same object).
    `dtype` becomes a torch dtype, `device` 'cpu' or 'cuda:N', include/exclude tuples of regexes."""

    rank: int = 16
    conv_rank: Optional[int] = None  # None: rank
    dynamic: Optional[str] = None
    param: Optional[float] = None
    min_diff: float = 0.0
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    embeddings: bool = False
    to: str = "peft"
    base_model_name: Optional[str] = None
    dtype: Union[str, torch.dtype] = "fp32"
    svd: str = "auto"
    power_iters: int = 4
    component: Optional[str] = None
    fan_in_fan_out: Optional[bool] = None  # None: from the base's config.json
    device: str = "auto"
    uniform_scale: bool = False  # one alpha for all modules (PEFT output)
    patterns: Tuple[List[UserPattern], List[UserPattern]] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.rank is None:
            raise UsageError("extract needs --rank (with --dynamic: the cap)")
        check_rank_options(self.rank, self.conv_rank, self.dynamic, self.param)
        if self.svd not in SVD_METHODS:
            raise UsageError(f"unknown --svd {self.svd!r}: use one of {', '.join(SVD_METHODS)}")
        check_writable_alone(self.to, "extract")
        if self.uniform_scale:
            check_uniform_scale(self.to)
        if self.min_diff < 0 or self.power_iters < 0:
            raise UsageError("--min-diff and --power-iters must not be negative")
        if self.component is not None and self.component not in COMPONENTS:
            raise UsageError(f"unknown component {self.component!r}: use one of {', '.join(COMPONENTS)}")
        set_ = object.__setattr__
        set_(self, "include", tuple(self.include or ()))
        set_(self, "exclude", tuple(self.exclude or ()))
        set_(self, "patterns", (compile_patterns(self.include, "--include"),
                                compile_patterns(self.exclude, "--exclude")))
        set_(self, "dtype", parse_dtype(self.dtype) or torch.float32)
        set_(self, "device", resolve_device(self.device))

    @property
    def prefix(self) -> str:
        return f"{self.component}." if self.component else ""

    def rank_for(self, conv: bool) -> int:
        return self.conv_rank if conv and self.conv_rank is not None else self.rank


def is_embedding(module: str) -> bool:
    return bool(_EMBEDDING.search(module))


def factor_difference(diff: torch.Tensor, cap: int, dynamic: Optional[str] = None, param: Optional[float] = None,
                      svd: str = "auto", power_iters: int = 4
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, str]:
    """(up, down, s, k, method): up @ down ≈ diff [rows, cols] at the chosen rank k ≤ cap, fp32.

    With the randomized SVD only the leading σ are known; `s` then ends with one extra value, the
    norm of the rest of the spectrum, so sv_fro and the retained norm still see ||diff||_F."""
    diff = diff.float()
    n = min(diff.shape)
    cap = min(cap, n)
    exact = uses_exact_svd(n, cap, dynamic, svd)
    if dynamic == "sv_cumulative" and not exact:
        raise UsageError("sv_cumulative needs every singular value: use --svd exact or auto")
    if exact:
        u, s, vh = exact_svd(diff)
    else:
        u, s, vh = randomized_svd(diff, cap, oversample=OVERSAMPLE, n_iter=power_iters)
        total = float(torch.linalg.vector_norm(diff.double()))
        rest = max(total ** 2 - float((s.double() ** 2).sum()), 0.0) ** 0.5
        s = torch.cat([s, s.new_tensor([rest])])
    # the rest's norm counts for sv_fro's total only (it is not one σ: sv_ratio must not see it)
    k = select_rank(s if exact or dynamic == "sv_fro" else s[:-1], rank=cap, rule=dynamic, param=param, max_rank=cap)
    up, down = split_factors(u, s, vh, k)
    return up, down, s, k, "exact" if exact else "randomized"


def _check_pair(base: Checkpoint, tuned: Checkpoint) -> None:
    missing = [n for n in base.infos if n not in tuned.infos]
    added = [n for n in tuned.infos if n not in base.infos]
    if missing or added:
        names = (missing or added)[:3]
        raise IncompatibleError(
            f"the checkpoints have different tensors ({len(missing)} only in base, {len(added)} only in tuned, "
            f"e.g. {', '.join(names)}): extract needs two checkpoints of the same architecture")
    for name, info in base.infos.items():
        if tuple(info.shape) != tuple(tuned.infos[name].shape):
            raise ShapeMismatchError(f"{name}: shape {tuple(info.shape)} in base but {tuple(tuned.infos[name].shape)} "
                                     "in tuned: extract needs two checkpoints of the same architecture")
        if (info.dtype in FLOATS) != (tuned.infos[name].dtype in FLOATS):  # a float minus an int means nothing
            raise IncompatibleError(f"{name}: dtype {info.dtype} in base but {tuned.infos[name].dtype} in tuned: "
                                    "extract needs two checkpoints of the same architecture")


def _model_config(folder: str) -> dict:
    try:
        with paths.open_input(os.path.join(folder, "config.json"), "r", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


# transformers models whose linear layers are Conv1D, which stores weights as [in, out]
_CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt"}


def default_base_name(base) -> str:
    """`base_model_name_or_path` for a base given as a path (absolute) or a Hub reference (as given)."""
    if isinstance(base, Checkpoint):
        return base.folder
    path = os.fspath(base)
    return os.path.abspath(path) if os.path.exists(path) else path


def _task_type(folder: str) -> Optional[str]:
    try:
        arch = (_model_config(folder).get("architectures") or [""])[0]
    except (AttributeError, TypeError, IndexError, KeyError):
        return None
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS")):
        if str(arch).endswith(suffix):
            return task
    return None


def open_pair(base, tuned) -> Tuple[Checkpoint, Checkpoint]:
    """Both checkpoints, indexed from their headers, checked to be of one architecture."""
    cb = base if isinstance(base, Checkpoint) else Checkpoint(base)
    ct = tuned if isinstance(tuned, Checkpoint) else Checkpoint(tuned)
    if cb.folder == ct.folder and cb.shards == ct.shards:
        raise UsageError("base and tuned are the same checkpoint")
    _check_pair(cb, ct)
    return cb, ct


def skip_reason(ckpt: Checkpoint, name: str, inc, exc, embeddings: bool) -> Optional[str]:
    """None if tensor `name` is a candidate for extraction, else why not (from its header alone)."""
    module = name[: -len(".weight")]
    if not name.endswith(".weight") or len(ckpt.shape(name)) not in (2, 4) or ckpt.dtype(name) not in FLOATS:
        return "not a 2-D or conv weight"
    if exc and any(p.search(module) for p in exc):
        return "excluded"
    if inc and not any(p.search(module) for p in inc):
        return "not included"
    if is_embedding(module) and not embeddings and not inc:
        return "embedding (use --embeddings)"
    return None


def module_kind(module: str, ndim: int) -> str:
    if ndim == 4:
        return "conv"
    return "embedding" if is_embedding(module) and not _OUTPUT_EMBEDDING.search(module) else "linear"


def compile_patterns(patterns, option: str) -> List[UserPattern]:
    return [UserPattern(p, option, UsageError) for p in patterns or ()]


@paths.guarded
def extract(base: Union[str, os.PathLike, Checkpoint], tuned: Union[str, os.PathLike, Checkpoint],
            output: Optional[Union[str, os.PathLike]] = None,
            rank: int = 16, conv_rank: Optional[int] = None, dynamic: Optional[str] = None,
            param: Optional[float] = None, min_diff: float = 0.0, include=None, exclude=None,
            embeddings: bool = False, to: str = "peft", base_model_name: Optional[str] = None,
            dtype: str = "fp32", svd: str = "auto", power_iters: int = 4, component: Optional[str] = None,
            overwrite: bool = False, progress: Optional[Callable[[str], None]] = None,
            fan_in_fan_out: Optional[bool] = None, device: str = "auto", uniform_scale: bool = False,
            options: Optional[ExtractOptions] = None) -> ExtractResult:
    """Factor `tuned − base` into a LoRA for every 2-D (and conv) weight whose largest absolute
    difference exceeds `min_diff`. `include` / `exclude`: regexes searched in the module name.
    Embeddings and lm_head only with `embeddings=True` (or when an `include` regex names them).
    `component` (unet, text_encoder …) prefixes the module names, as kohya and diffusers files need.
    `fan_in_fan_out`: the linear weights are stored [in, out] (GPT-2's Conv1D); None reads it from
    the base's config.json (model_type gpt2 / openai-gpt). `device`: where the SVDs run (auto, cpu,
    cuda, cuda:N). `uniform_scale`: one alpha for all modules (PEFT output). `options`: an
    ExtractOptions instead of the keyword options."""
    opts = build(ExtractOptions, options, rank=rank, conv_rank=conv_rank, dynamic=dynamic, param=param,
                 min_diff=min_diff, include=tuple(include or ()), exclude=tuple(exclude or ()), embeddings=embeddings,
                 to=to, base_model_name=base_model_name, dtype=dtype, svd=svd, power_iters=power_iters,
                 component=component, fan_in_fan_out=fan_in_fan_out, device=device, uniform_scale=uniform_scale)
    inc, exc = opts.patterns
    if output is not None:
        check_output(output, overwrite)
        output_is_folder(output, opts.to)  # refuse -o's kind before the work, not after it
    cb, ct = open_pair(base, tuned)
    config = {"task_type": _task_type(cb.folder)} if opts.to == "peft" else {}
    result = ExtractResult(LoraAdapter(format=opts.to, base_model=opts.base_model_name or default_base_name(base),
                                       config=config), [])
    fifo = opts.fan_in_fan_out
    if fifo is None:
        fifo = _model_config(cb.folder).get("model_type") in _CONV1D_MODEL_TYPES

    with ExitStack() as stack:
        tuned_files: Dict[str, SafetensorsFile] = {}

        def read_tuned(name: str) -> torch.Tensor:
            shard = ct.shard_of[name]
            if shard not in tuned_files:
                tuned_files[shard] = stack.enter_context(SafetensorsFile(os.path.join(ct.folder, shard)))
            return tuned_files[shard].read(name)

        for shard in cb.shards:
            with SafetensorsFile(os.path.join(cb.folder, shard)) as fb:
                for name in fb.keys():
                    why = skip_reason(cb, name, inc, exc, opts.embeddings)
                    if why in ("excluded", "not included"):
                        result.skip(why, name)
                    else:
                        _one(opts, bool(fifo), name, why, fb.read(name), read_tuned(name), result)
                    if progress:
                        progress(name)
    if not result.modules:
        raise UsageError(f"no weight differs by more than --min-diff {opts.min_diff} between the checkpoints: "
                         "nothing to extract")
    result.adapter.metadata = stamp(result.adapter.metadata, "extract",
                                    [default_base_name(base), default_base_name(tuned)], rank=opts.rank,
                                    conv_rank=opts.conv_rank, dynamic=opts.dynamic, param=opts.param, svd=opts.svd)
    result.adapter = uniform(result.adapter, opts.to, opts.uniform_scale)
    if output is not None:
        result.output = write_adapter(result.adapter, output, format=opts.to, overwrite=overwrite,
                                      metadata=result.adapter.metadata)
    return result


def _one(opts: ExtractOptions, fan_in_fan_out: bool, name: str, why: Optional[str], b: torch.Tensor,
         t: torch.Tensor, result: ExtractResult) -> None:
    """Factor one tensor pair into the result (or record why not); the SVD runs on opts.device."""
    if why is not None:  # still say when something we do not extract has changed
        if b.is_floating_point() and not torch.equal(b.to(t.dtype), t):
            result.skip(f"differs but {why}", name)
        return
    diff = t.to(opts.device).float() - b.to(opts.device).float()
    if not all_finite(diff):
        raise NonFiniteError(f"{name}: the difference contains NaN or Inf; nothing was written")
    max_diff = float(diff.abs().max()) if diff.numel() else 0.0
    if max_diff <= opts.min_diff:
        result.skip("unchanged" if max_diff == 0 else "below --min-diff", name)
        return
    module = name[: -len(".weight")]
    conv = diff.dim() == 4
    kind = module_kind(module, diff.dim())
    fifo = kind == "linear" and fan_in_fan_out
    # PEFT stores an embedding's LoRA transposed: ΔW.T = B @ A with A [r, num_embeddings];
    # a Conv1D weight is [in, out], so its update is (B @ A).T as well
    mat = diff.t() if kind == "embedding" or fifo else diff.reshape(diff.shape[0], -1)
    up, down, s, k, method = factor_difference(mat, opts.rank_for(conv), opts.dynamic, opts.param, opts.svd,
                                               opts.power_iters)
    if conv:
        up, down = up.reshape(up.shape[0], k, 1, 1), down.reshape((k,) + tuple(diff.shape[1:]))
    module = opts.prefix + module
    result.adapter.add(LoraModule(module, down.to("cpu", opts.dtype).contiguous(),
                                  up.to("cpu", opts.dtype).contiguous(),
                                  alpha=float(k),
                                  kind=kind, fan_in_fan_out=fifo))
    exact = method == "exact"
    fro, sm, ratio = summarize(s, k) if exact else summarize(s[:-1], k, float(torch.linalg.vector_norm(s.double())))
    result.modules.append(ModuleResize(module, kind, min(mat.shape), k, fro, sm, ratio,
                                       (s if exact else s[:-1]).tolist()))
    result.methods[module] = method
