"""LyCORIS convert at a small --rank: a dense ΔW gets the randomized top-k SVD (bounded time), the kept
energy is measured on what is written, and it matches the exact SVD's optimum (the dense SVD is the oracle)."""
import pytest
import safetensors.torch
import torch

from loratools.cli.main import main
from loratools.formats import lycoris
from loratools.lycoris_algos import loha_delta
from loratools.linalg import retained


def _loha(n, r, seed=0, decay=0.8):
    """A LoHa of rank r on n×n whose factors' columns fall off geometrically: a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    w = decay ** torch.arange(r, dtype=torch.float32)
    return {"hada_w1_a": torch.randn(n, r, generator=g) * w, "hada_w1_b": torch.randn(r, n, generator=g),
            "hada_w2_a": torch.randn(n, r, generator=g) * w, "hada_w2_b": torch.randn(r, n, generator=g),
            "alpha": torch.tensor(float(r))}


def _factor(delta, k):
    return lycoris.factor("m", delta, tuple(delta.shape), k, torch.float32, None)


def test_randomized_energy_is_the_dense_optimum_within_1e3(monkeypatch):
    delta = loha_delta(_loha(1024, 64)).reshape(1024, 1024).float()
    best = retained(torch.linalg.svdvals(delta.double()), 8)[0]
    monkeypatch.setattr(lycoris, "exact_svd", lambda m: pytest.fail("dense SVD at K=8 on 1024×1024"))
    module, kept = _factor(delta, 8)
    assert module.rank == 8
    written = (module.up.double() @ module.down.double())
    # the reported fraction is that of the written factors, measured, not the sketch's estimate
    assert kept == pytest.approx(float(written.norm() / delta.double().norm()), rel=1e-6)
    assert kept <= best * (1 + 1e-6) and kept == pytest.approx(best, rel=1e-3)
    err = float((delta.double() - written).norm() / delta.double().norm())
    assert err ** 2 == pytest.approx(1 - best ** 2, rel=1e-2)  # its error is the optimum's too


def test_randomized_is_exact_when_the_update_has_rank_at_most_k():
    delta = loha_delta(_loha(512, 2, seed=1)).reshape(512, 512).float()  # rank ≤ 2·2 = 4 < K
    module, kept = _factor(delta, 8)
    assert kept == pytest.approx(1.0, abs=1e-6)
    written = module.up.double() @ module.down.double()
    assert float((written - delta.double()).norm() / delta.double().norm()) < 1e-5


def test_large_update_at_small_rank_never_runs_the_dense_svd(monkeypatch, tmp_path):
    """Through convert: a LoHa too wide for its exact factors (40·40 ≥ 1280) on SD1's 1280×1280 to_q at --rank 4."""
    p = _loha(1280, 40, seed=2)
    path = tmp_path / "loha.safetensors"
    safetensors.torch.save_file({f"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.{k}": v for k, v in p.items()},
                                str(path))
    monkeypatch.setattr(lycoris, "exact_svd", lambda m: pytest.fail(f"dense SVD of {tuple(m.shape)}"))
    out = tmp_path / "o.safetensors"
    assert main(["convert", str(path), "--to", "kohya", "--rank", "4", "-o", str(out)]) == 0
    written = safetensors.torch.load_file(str(out))
    up = next(v for k, v in written.items() if k.endswith("lora_up.weight"))
    assert up.shape == (1280, 4)
