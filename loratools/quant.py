"""Quantized weights in Hugging Face checkpoints: which tensors form one quantized weight, its
exact dequantization (the values the quantizer's own dequantization gives, in fp32) and its
requantization into the same layout.

Schemes, as transformers saves them:
- bitsandbytes 4-bit (`bnb-nf4`, `bnb-fp4`): `W` packed two codes per byte (`[numel/2, 1]`), blocks of
  `blocksize` values over the *flattened* weight, one `W.absmax` per block, the code table in
  `W.quant_map`, the rest in the JSON bytes of `W.quant_state.bitsandbytes__nf4|fp4`. Double
  quantization stores absmax as 8-bit codes (`W.nested_absmax`, `W.nested_quant_map`, 256-blocks)
  plus an offset that lives only in that JSON.
- bitsandbytes 8-bit (`bnb-int8`, LLM.int8): int8 `W [out, in]`, row scales at module level
  (`<module>.SCB`), `<module>.weight_format`; W = q · SCB / 127.
- FP8 (`fp8`): float8 `W` with `W_scale_inv` (transformers' fine-grained FP8, DeepSeek-V3 style) or
  `W_scale` (compressed-tensors, fbgemm): one scale per tensor, per row, or per block of the last
  two dimensions; W = q · scale. Without a scale (ComfyUI-style fp8 casts) W = q.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from .dtypes import FP8, fp8_limit
from .errors import FormatError, IncompatibleError, NonFiniteError

QS_PREFIX = ".quant_state.bitsandbytes__"
BNB4_PARTS = {"absmax": ".absmax", "quant_map": ".quant_map", "nested_absmax": ".nested_absmax",
              "nested_quant_map": ".nested_quant_map"}
INT8_SCALE = 7.874015718698502e-3  # bitsandbytes multiplies by this float instead of dividing by 127
# quantization_config.quant_method values with no dequantization here: say so instead of misreading them
UNSUPPORTED = {"gptq": "GPTQ", "awq": "AWQ", "aqlm": "AQLM", "hqq": "HQQ", "eetq": "EETQ", "quanto": "Quanto",
               "torchao": "torchao", "mxfp4": "MXFP4", "bitnet": "BitNet", "vptq": "VPTQ", "higgs": "HIGGS",
               "spqr": "SpQR", "gguf": "GGUF"}
SUPPORTED = {"bitsandbytes", "fp8", "fbgemm_fp8", "compressed-tensors"}


@dataclass
class QuantWeight:
    """One quantized weight: its logical name, shape and dtype, and the checkpoint tensors (parts)
    it is stored in."""

    name: str
    scheme: str  # bnb-nf4, bnb-fp4, bnb-int8, fp8
    parts: Dict[str, str]  # role (data, absmax, quant_map, scale, …) -> checkpoint tensor name
    shape: Tuple[int, ...]
    dtype: torch.dtype  # what it was quantized from (bnb) or what it is served in (fp8: bf16)
    state: dict = field(default_factory=dict)  # bnb quant_state JSON; fp8 block size

    @property
    def label(self) -> str:
        if self.scheme.startswith("bnb-") and self.scheme != "bnb-int8":
            nested = "+double-quant" if "nested_absmax" in self.parts else ""
            return f"{self.scheme}{nested} (block {self.state['blocksize']})"
        if self.scheme == "fp8":
            block = self.state.get("block")
            return f"fp8 {str(self.state['qdtype']).replace('torch.', '')} " + (
                f"block {block[0]}x{block[1]}" if block else "per-tensor")
        return self.scheme


def quant_method(config: Optional[dict]) -> Optional[str]:
    """The config's quant_method (None without one); unsupported methods raise."""
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method in UNSUPPORTED:
        raise IncompatibleError(f"{UNSUPPORTED[method]} checkpoints cannot be dequantized by loratools; merge into "
                                "the original full-precision base model instead")
    if method not in SUPPORTED:
        raise IncompatibleError(f"quantization method {method or '(none given)'!r} is not supported (loratools "
                                "reads bitsandbytes 4-bit/8-bit and FP8 checkpoints)")
    return method


def find_weights(infos: Dict[str, object], config: Optional[dict],
                 read: Callable[[str], torch.Tensor]) -> Dict[str, QuantWeight]:
    """Every quantized weight among the checkpoint's tensors (`infos`: name -> TensorInfo), by the
    tensors that accompany it; `read` fetches the small quant_state tensors."""
    qc = (config or {}).get("quantization_config") or {}
    out: Dict[str, QuantWeight] = {}
    for name, info in infos.items():
        qs = [n for n in (name + QS_PREFIX + "nf4", name + QS_PREFIX + "fp4") if n in infos]
        module = name.rsplit(".", 1)[0]
        if qs:
            out[name] = _bnb4(name, qs[0], infos, read)
        elif info.dtype == torch.int8 and name.endswith(".weight") and module + ".SCB" in infos:
            parts = {"data": name, "scb": module + ".SCB"}
            if module + ".weight_format" in infos:
                parts["format"] = module + ".weight_format"
            out[name] = QuantWeight(name, "bnb-int8", parts, tuple(info.shape), torch.float16)
        elif info.dtype in FP8:
            scale = next((name + s for s in ("_scale_inv", "_scale") if name + s in infos), None)
            parts = {"data": name, "scale": scale} if scale else {"data": name}  # no scale: a plain cast
            sshape = tuple(infos[scale].shape) if scale else ()
            block = _fp8_block(name, tuple(info.shape), sshape, qc.get("weight_block_size"))
            out[name] = QuantWeight(name, "fp8", parts, tuple(info.shape), torch.bfloat16,
                                    {"block": block, "qdtype": info.dtype})
    return out


def _bnb4(name: str, qs_name: str, infos, read) -> QuantWeight:
    try:
        state = read_state(read(qs_name))
        shape = tuple(int(x) for x in state["shape"])
        dtype = getattr(torch, state.get("dtype", "float32"))
        kind, blocksize = state["quant_type"], int(state["blocksize"])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise FormatError(f"{qs_name}: not a valid bitsandbytes quant_state") from None
    if kind not in ("nf4", "fp4") or blocksize <= 0 or not isinstance(dtype, torch.dtype):
        raise FormatError(f"{qs_name}: unknown quant_type {kind!r} or blocksize {blocksize}")
    parts = {"data": name, "quant_state": qs_name}
    for role, suffix in BNB4_PARTS.items():
        if name + suffix in infos:
            parts[role] = name + suffix
    need = ("absmax", "quant_map") + (("nested_absmax", "nested_quant_map") if "nested_offset" in state else ())
    missing = [name + BNB4_PARTS[r] for r in need if r not in parts]
    if missing:
        raise FormatError(f"{name}: bitsandbytes 4-bit weight without {', '.join(missing)}")
    return QuantWeight(name, "bnb-" + kind, parts, shape, dtype, state)


def _fp8_block(name, shape, sshape, config_block) -> Optional[Tuple[int, int]]:
    """The block (rows, cols) one scale covers, None for one scale per tensor."""
    if math.prod(sshape) == 1:
        return None
    if len(shape) < 2 or len(sshape) != len(shape) or sshape[:-2] != shape[:-2]:
        raise FormatError(f"{name}: scale shape {sshape} does not fit weight shape {shape}")
    rows, cols = shape[-2:]
    cands = [tuple(int(b) for b in config_block)] if config_block else []
    cands.append((-(-rows // sshape[-2]), -(-cols // sshape[-1])))
    for b in cands:
        if (-(-rows // b[0]), -(-cols // b[1])) == tuple(sshape[-2:]):
            return b
    raise FormatError(f"{name}: scale shape {sshape} does not fit weight shape {shape}")


# ---- dequantization ---------------------------------------------------------------------------


def _blockwise(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (flat fp32) times the absmax of their block of `blocksize` consecutive values."""
    n = values.numel()
    return values * absmax.float().repeat_interleave(blocksize)[:n]


def bnb4_absmax(state: dict, t: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-block absmax; double quantization: 8-bit codes times their 256-block absmax, plus the offset."""
    if "nested_absmax" not in t:
        return t["absmax"].float()
    codes = t["nested_quant_map"].float()[t["absmax"].reshape(-1).long()]
    nested = _blockwise(codes, t["nested_absmax"], int(state.get("nested_blocksize", 256)))
    return nested + torch.tensor(float(state["nested_offset"]), dtype=torch.float32)


def read_state(t: torch.Tensor) -> dict:
    """The quant_state JSON bytes (transformers' packed form) as a dict."""
    return json.loads(bytes(t.reshape(-1).tolist()).decode("utf-8"))


def dequantize(qw: QuantWeight, t: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight in fp32 from its parts (`t`: role -> tensor), in its logical shape."""
    if qw.scheme == "bnb-int8":
        return t["data"].float() * t["scb"].float().view(-1, 1) * INT8_SCALE
    if qw.scheme == "fp8":
        return t["data"].float() * _expand(t["scale"].float(), qw) if "scale" in t else t["data"].float()
    n = math.prod(qw.shape)
    packed = t["data"].contiguous().view(torch.uint8).reshape(-1)
    if packed.numel() * 2 < n:
        raise FormatError(f"{qw.name}: {packed.numel()} packed bytes for {n} values")
    codes = torch.empty(packed.numel() * 2, dtype=torch.long)
    codes[0::2], codes[1::2] = packed >> 4, packed & 0xF
    values = t["quant_map"].float()[codes[:n]]
    state = read_state(t["quant_state"])  # the offset of double quantization lives only here
    return _blockwise(values, bnb4_absmax(state, t), int(qw.state["blocksize"])).reshape(qw.shape)


def _expand(scale: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    block = qw.state["block"]
    if block is None:
        return scale.reshape(())
    rows, cols = qw.shape[-2:]
    return scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]


# ---- requantization -----------------------------------------------------------------------------


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (bitsandbytes' rule: midpoints of the sorted table)."""
    order = torch.argsort(code)
    ordered = code[order]
    return order[torch.bucketize(x, (ordered[:-1] + ordered[1:]) / 2)]


def _quantize_blocks(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of a flat fp32 tensor, as bitsandbytes' torch backend does it."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return _nearest(scaled, code.float()), absmax


def state_length(qw: QuantWeight, stored: int) -> int:
    """Bytes of the rewritten quant_state JSON: known before the data (the offset's digits vary),
    so it is padded with spaces (valid JSON) to this length."""
    if "nested_offset" not in qw.state:
        return stored
    widest = dict(qw.state, nested_offset=-1.2345678901234567e-100)
    return max(stored, len(json.dumps(widest).encode()))


def quantize(qw: QuantWeight, w: torch.Tensor, like: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`w` (fp32, logical shape) quantized into parts shaped and typed as `like` (the originals)."""
    if qw.scheme == "bnb-int8":
        scb = w.abs().amax(dim=1)
        q = torch.round(w * (127.0 / scb.clamp(min=1e-38)).unsqueeze(1)).to(torch.int8)
        out = {"data": q, "scb": scb.to(like["scb"].dtype)}
    elif qw.scheme == "fp8":
        out = _quantize_fp8(qw, w, like)
    else:
        out = _quantize_bnb4(qw, w, like)
    for role, t in like.items():
        out.setdefault(role, t.clone())
    return out


def _quantize_fp8(qw: QuantWeight, w: torch.Tensor, like: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    qdtype = qw.state["qdtype"]
    qmax = torch.finfo(qdtype).max
    if "scale" not in like:  # clipping would change the merged weight without a word
        if bool((w.abs() >= fp8_limit(qdtype)).any()):
            raise NonFiniteError.merged(qw.name, qdtype)
        return {"data": w.to(qdtype)}
    sdtype = like["scale"].dtype
    if not sdtype.is_floating_point or sdtype in FP8:
        raise IncompatibleError(f"{qw.name}: requantizing with {sdtype} scales is not supported; write bf16 instead")
    block = qw.state["block"]
    if block is None:
        amax = w.abs().amax()
    else:
        rows, cols = qw.shape[-2:]
        pr, pc = -rows % block[0], -cols % block[1]
        padded = torch.nn.functional.pad(w.abs(), (0, pc, 0, pr))
        lead = padded.shape[:-2]
        amax = padded.reshape(*lead, (rows + pr) // block[0], block[0], (cols + pc) // block[1], block[1])
        amax = amax.amax(dim=(-3, -1))
    scale = (amax / qmax).clamp(min=torch.finfo(torch.float32).tiny).to(sdtype)
    full = _expand(scale.float(), qw)
    q = torch.clamp(w / full, -qmax, qmax).to(qdtype)
    return {"data": q, "scale": scale.reshape(like["scale"].shape)}


def _quantize_bnb4(qw: QuantWeight, w: torch.Tensor, like: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    blocksize = int(qw.state["blocksize"])
    idx, absmax = _quantize_blocks(w.reshape(-1).float(), like["quant_map"], blocksize)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    packed = ((idx[0::2] << 4) | idx[1::2]).to(torch.uint8)
    data = like["data"]
    out = {"data": packed.view(data.dtype).reshape(data.shape)}
    state = dict(qw.state)
    if "nested_absmax" in qw.parts:
        offset = absmax.mean()
        nb = int(state.get("nested_blocksize", 256))
        codes, nested = _quantize_blocks(absmax - offset, like["nested_quant_map"], nb)
        out["absmax"] = codes.to(like["absmax"].dtype)
        out["nested_absmax"] = nested.to(like["nested_absmax"].dtype)
        state["nested_offset"] = float(offset)
    else:
        out["absmax"] = absmax.to(like["absmax"].dtype)
    text = json.dumps(state).encode()
    length = state_length(qw, like["quant_state"].numel())
    out["quant_state"] = torch.tensor(list(text.ljust(length, b" ")), dtype=torch.uint8)
    return out


def describe(weights: Iterable[QuantWeight]) -> str:
    """`bnb-nf4+double-quant (block 64) x 7` style summary of the schemes in a checkpoint."""
    counts: Dict[str, int] = {}
    for qw in weights:
        counts[qw.label] = counts.get(qw.label, 0) + 1
    return ", ".join(f"{label} x {n}" for label, n in counts.items()) or "no quantized weights"
