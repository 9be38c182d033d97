"""The exact update of each LyCORIS algorithm, as LyCORIS' forward pass applies it (its
`get_diff_weight` applies the LoHa/LoKr scale twice; the forward pass, which ComfyUI follows, once).

W-independent updates (LoHa, LoKr, full/diff) are plain ΔW functions; the formats module factors
them into LoRA. Updates that depend on the base weight are a `Transform`: `apply(W, weight)`
returns the merged weight (fp32), with `--weight` acting as LyCORIS' multiplier does:
  full:  W + m·diff  (and bias + m·diff_b)
  IA³:   W · (1 + m·w) along the output rows (or input columns with `on_input`)
  OFT:   rescale · (blockdiag(m·R + (1−m)·I))ᵀ W,  R = (I+Q)(I−Q)⁻¹, Q = B − Bᵀ (norm-constrained)
  BOFT:  rescale · Π_i butterfly stage i of (m·R_i + (1−m)·I) applied to the rows of W
  GLoRA: W + m·γ·(W·A1·A2 + B1·B2),  γ = alpha / r
  DoRA:  (W + ΔW) · (m·(d/‖W + ΔW‖ − 1) + 1), the norm per output row or per input column
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

ALGO_NAMES = {"full": "full (diff)", "ia3": "(IA)³", "oft": "OFT", "boft": "BOFT", "glora": "GLoRA",
              "dora": "DoRA (input axis)"}


def tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS Tucker rebuild: t [r, r, kh, kw], wa [r, out], wb [r, in] -> [out, in, kh, kw]."""
    return torch.einsum("i j ..., i p, j r -> p r ...", t, wa, wb)


def loha_delta(p: Dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW = (alpha / r) · (w1a @ w1b) ⊙ (w2a @ w2b), r = w1b.shape[0] (Tucker: hada_t1/t2)."""
    f = {k: v.float() for k, v in p.items()}
    if "hada_t1" in f:
        m1 = tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
        m2 = tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
    else:
        m1, m2 = f["hada_w1_a"] @ f["hada_w1_b"], f["hada_w2_a"] @ f["hada_w2_b"]
    scale = f["alpha"].item() / p["hada_w1_b"].shape[0] if "alpha" in f else 1.0
    return m1 * m2 * scale


def lokr_delta(p: Dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW = (alpha / r) · kron(w1, w2), r the rank of a factored block (scale 1 if neither is)."""
    f = {k: v.float() for k, v in p.items()}
    dim = None
    if "lokr_w1" in f:
        w1 = f["lokr_w1"]
    else:
        dim, w1 = p["lokr_w1_b"].shape[0], f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    else:
        dim = p["lokr_w2_b"].shape[0]
        if "lokr_t2" in f:
            w2 = tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = f["alpha"].item() / dim if "alpha" in f and dim else 1.0
    # einsum results can be non-contiguous; kron needs no particular layout but reshape later does
    return torch.kron(w1.contiguous(), w2.contiguous()) * scale


def _sides(p: Dict[str, torch.Tensor], key: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(u, v) with u @ v = the block: its factors, or a full block beside an identity on its shorter side."""
    if key in p:
        w = p[key].float()
        return (w, torch.eye(w.shape[1])) if w.shape[1] <= w.shape[0] else (torch.eye(w.shape[0]), w)
    return p[key + "_a"].float(), p[key + "_b"].float()


def lowrank_factors(algo: str, p: Dict[str, torch.Tensor]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """An exact LoRA (up [out, R], down [R, in]) of a LoHa or LoKr ΔW (scale folded into up) without building ΔW:
    LoKr kron(U1 V1, U2 V2) = kron(U1, U2) @ kron(V1, V2); LoHa (A1 B1) ⊙ (A2 B2) = rows of A1 ⊗ A2 times
    columns of B1 ⊗ B2. None where that rank R is no smaller than ΔW (or for Tucker and conv blocks)."""
    if any(k in p for k in ("hada_t1", "lokr_t2")) or any(v.dim() > 2 for v in p.values()):
        return None
    if algo == "loha":
        a1, b1, a2, b2 = (p[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        if a1.shape[1] * a2.shape[1] >= min(a1.shape[0], b1.shape[1]):  # before building: R may dwarf ΔW
            return None
        a1, b1, a2, b2 = a1.float(), b1.float(), a2.float(), b2.float()
        up = (a1[:, :, None] * a2[:, None, :]).flatten(1)
        down = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)
        scale = p["alpha"].float().item() / b1.shape[0] if "alpha" in p else 1.0
    else:
        (u1, v1), (u2, v2) = _sides(p, "lokr_w1"), _sides(p, "lokr_w2")
        if u1.shape[1] * u2.shape[1] >= min(u1.shape[0] * u2.shape[0], v1.shape[1] * v2.shape[1]):
            return None
        up, down = torch.kron(u1, u2), torch.kron(v1, v2)
        dim = next((p[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in p), None)
        scale = p["alpha"].float().item() / dim if "alpha" in p and dim else 1.0
    if up.shape[1] >= min(up.shape[0], down.shape[1]):
        return None
    return up * scale, down


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ per block, Q = B − Bᵀ scaled to norm `constraint` when above it (all blocks)."""
    eye = torch.eye(blocks.shape[-1], dtype=torch.float32)
    q = blocks.float() - blocks.float().transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.vector_norm(q) + 1e-8
        if norm > constraint:
            q = q * constraint / norm
    return (eye + q) @ torch.linalg.inv(eye - q)


def _rotations(w: torch.Tensor, p: Dict[str, torch.Tensor], m: float) -> torch.Tensor:
    """OFT/BOFT's blocks at multiplier m: m·R + (1−m)·I, R the Cayley rotation (constraint alpha · rows)."""
    blocks = p["oft_blocks"]
    eye = torch.eye(blocks.shape[-1])
    return cayley(blocks, float(p["alpha"]) * w.shape[0] if "alpha" in p else 0.0) * m + (1 - m) * eye


def _oft(w: torch.Tensor, p: Dict[str, torch.Tensor], m: float) -> torch.Tensor:
    n, b, _ = p["oft_blocks"].shape
    r = _rotations(w, p, m)
    rest = w.shape[1:]
    out = torch.einsum("knm,kn...->km...", r, w.reshape(n, b, *rest)).reshape(w.shape)
    return out * p["rescale"].float() if "rescale" in p else out


def _boft(w: torch.Tensor, p: Dict[str, torch.Tensor], m: float) -> torch.Tensor:
    stages, _, b, _ = p["oft_blocks"].shape
    r = _rotations(w, p, m)
    x = w
    for i in range(stages):  # stage i mixes rows 2^i·b/2 apart (the butterfly permutation), then blocks
        k = 2 ** i * (b // 2)
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("bij,bj...->bi...", r[i], x)
        x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return x * p["rescale"].float() if "rescale" in p else x


def _ia3(w: torch.Tensor, p: Dict[str, torch.Tensor], m: float) -> torch.Tensor:
    s = p["weight"].float().reshape(-1) * m + 1
    on_input = bool(p["on_input"].item()) if "on_input" in p else False
    shape = [1] * w.dim()
    shape[1 if on_input else 0] = -1
    return w * s.reshape(shape)


def _glora(w: torch.Tensor, p: Dict[str, torch.Tensor], m: float) -> torch.Tensor:
    f = {k: v.float() for k, v in p.items()}
    r = f["a2.weight"].shape[0]
    alpha = float(f["alpha"]) if "alpha" in f and float(f["alpha"]) != 0 else r
    if "bm.weight" in f:
        b1, b2 = f["b1.weight"].flatten(1), f["b2.weight"].flatten(1)
        wb = torch.einsum("mn...,im,nj->ij...", f["bm.weight"], b1, b2)
    else:
        wb = (f["b1.weight"].flatten(1) @ f["b2.weight"].flatten(1)).reshape(w.shape)
    a1, a2 = f["a1.weight"].flatten(1), f["a2.weight"].flatten(1)
    wa = torch.einsum("oi...,ij,jk->ok...", w, a1, a2)
    return w + (wa + wb) * (alpha / r * m)


def _full(w: torch.Tensor, p: Dict[str, torch.Tensor], m: float) -> torch.Tensor:
    return w + p["diff"].float().reshape(w.shape) * m


def _dora(w: torch.Tensor, p: Dict[str, torch.Tensor], m: float) -> torch.Tensor:
    """p: the update `delta` (already scaled), `dora_scale`, and `on_output`."""
    v = w + p["delta"].float().reshape(w.shape)
    if p["on_output"]:
        norm = torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1).reshape(-1, *[1] * (v.dim() - 1))
    else:
        norm = torch.linalg.vector_norm(v.transpose(0, 1).reshape(v.shape[1], -1), dim=1)
        norm = norm.reshape(1, -1, *[1] * (v.dim() - 2))
    scale = p["dora_scale"].float().reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps)
    return v * (m * (scale - 1) + 1)


APPLY = {"full": _full, "ia3": _ia3, "oft": _oft, "boft": _boft, "glora": _glora, "dora": _dora}


@dataclass
class Transform:
    """A LyCORIS update that is no fixed low-rank ΔW: the merged weight is `apply(W, m)`.
    `bias` (full/diff only): the bias update, added as `bias + m·diff_b`."""

    algo: str
    params: Dict[str, object] = field(default_factory=dict)
    bias: Optional[torch.Tensor] = None

    @property
    def label(self) -> str:
        return ALGO_NAMES.get(self.algo, self.algo)

    def apply(self, w: torch.Tensor, m: float = 1.0) -> torch.Tensor:
        """The merged weight in fp32 for a base weight `w` and multiplier (merge weight) `m`."""
        return APPLY[self.algo](w.float(), self.params, float(m))

    def apply_bias(self, b: torch.Tensor, m: float = 1.0) -> torch.Tensor:
        return b.float() + self.bias.float() * float(m)

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        """ΔW = apply(W) − W in fp32 (for factoring into LoRA; needs the base weight)."""
        return self.apply(w) - w.float()


def weight_shape(algo: str, p: Dict[str, torch.Tensor]) -> Tuple[int, ...]:
    """The base weight shape as far as the tensors say it (-1 where they cannot, e.g. OFT's input side)."""
    if algo == "full":
        return tuple(p["diff"].shape)
    if algo == "glora":
        a1, b1, b2 = p["a1.weight"], p["b1.weight"], p["b2.weight"]
        k = tuple(p["bm.weight"].shape[2:]) if "bm.weight" in p else tuple(b2.shape[2:])
        return (int(b1.shape[0]), int(a1.shape[0])) + tuple(int(x) for x in k)
    if algo == "ia3":
        n = int(p["weight"].numel())
        on_input = bool(p["on_input"].item()) if "on_input" in p else False
        return (-1, n) if on_input else (n, -1)
    blocks = p["oft_blocks"]
    rows = blocks.shape[-3] * blocks.shape[-1]
    return (int(rows), -1)
