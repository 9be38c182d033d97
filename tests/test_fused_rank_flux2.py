"""`convert --fused-rank K` and fuse-first resize on FLUX.2 kohya files: the double blocks fuse q, k, v (and the
text stream's) into `img_attn.qkv` / `txt_attn.qkv`; a single block's `linear1` is one diffusers module
(`to_qkv_mlp_proj`), a plain rename, so it keeps its rank. Oracle: the dense ΔW of each written module and its
dense SVD (torch.linalg.svd: the Eckart–Young error of the best rank-K approximation)."""
from __future__ import annotations


import pytest
import torch

from _tiny import run_cli as run
from loratools import LoraAdapter, LoraModule, safetensors_io
from loratools.archs import flux2
from loratools.conversion import convert
from loratools.errors import UsageError
from tests import _flux2
from test_fused_rank import UNET, _blend_svd, _convert_fused, _dense, _eckart_young, _modules, _rel

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")


def _file(tmp_path, rank=4, seed=1):
    """A kohya FLUX.2 file whose qkv LoRAs are split_qkv's (B block-diagonal over q, k, v: rank 3·rank)."""
    sd = _flux2.file_layout(_flux2.original_lora(_flux2.tiny(), seed=seed, rank=rank, split_qkv=True), "kohya")
    path = tmp_path / f"flux2_{seed}.safetensors"
    safetensors_io.save(str(path), sd, {"ss_base_model_version": "flux2"})
    return str(path), sd


def _fused(ln) -> bool:
    return len(flux2.LAYOUT.lookup(flux2.LAYOUT.unflatten(ln[len(UNET):])).parts) > 1


def test_flux2_fused_rank_is_the_best_rank_k(tmp_path, capsys):
    path, sd = _file(tmp_path)
    fused, got = _convert_fused(capsys, path, sd, 5, tmp_path / "k5.safetensors")
    refactored = []
    for ln in _modules(sd):
        if not _fused(ln):  # linear1 (to_qkv_mlp_proj), proj, mlp …: renames, written as they were
            assert all(float((got[ln + s] - sd[ln + s]).abs().max()) == 0 for s in (".lora_down.weight",
                                                                                      ".lora_up.weight")), ln
            continue
        refactored.append("transformer." + flux2.LAYOUT.unflatten(ln[len(UNET):]))
        assert sd[ln + ".lora_down.weight"].shape[0] == 12 and got[ln + ".lora_down.weight"].shape[0] == 5, ln
        want, have = _dense(sd, ln), _dense(got, ln)
        assert abs(_rel(have, want) - _eckart_young(want, 5)) < 1e-5, ln
        assert fused["per_module"][refactored[-1]] == pytest.approx(_rel(have, want), rel=1e-5), ln
    assert len(refactored) == 2 * 2 and sorted(fused["per_module"]) == sorted(refactored)  # img + txt qkv, 2 blocks
    assert any(ln.endswith("linear1") for ln in _modules(sd))


def test_resize_of_a_kohya_flux2_lora_gives_the_rank_on_fused_modules(tmp_path, capsys):
    path, sd = _file(tmp_path)
    out = tmp_path / "r3.safetensors"
    code, _, err = run(capsys, "resize", path, "--rank", 3, "-o", out, "-q")
    assert code == 0, err
    got, _ = safetensors_io.load(str(out))
    assert set(got) == set(sd)
    for ln in _modules(sd):
        want, have = _dense(sd, ln), _dense(got, ln)
        assert got[ln + ".lora_down.weight"].shape[0] == 3, ln  # the parts resized one by one fuse at rank 9
        assert abs(_rel(have, want) - _eckart_young(want, 3)) < 1e-5, ln


def test_fused_rank_on_renames_only_and_the_error_naming_the_families(tmp_path, capsys):
    sd = _flux2.file_layout(_flux2.original_lora(_flux2.tiny(), only=("linear1",)), "kohya")  # renames only
    path = tmp_path / "l1.safetensors"
    safetensors_io.save(str(path), sd, {"ss_base_model_version": "flux2"})
    out = tmp_path / "o.safetensors"
    code, _, err = run(capsys, "convert", path, "--to", "kohya", "--fused-rank", 2, "-o", out)
    assert code == 0 and "0 module(s)" in err, err  # linear1 is one diffusers module: it keeps its rank 4
    got, _ = safetensors_io.load(str(out))
    assert set(got) == set(sd) and all(float((got[k] - sd[k]).abs().max()) == 0 for k in sd)
    name = "unet.down_blocks.0.attentions.0.proj_in"
    adapter = LoraAdapter(modules={name: LoraModule(name=name, down=torch.ones(2, 4), up=torch.ones(4, 2))},
                          format="kohya")
    with pytest.raises(UsageError, match=r"fused projections \(Flux, SD3, FLUX.2\)"):
        convert(adapter, None, to="kohya", fused_rank=1)


def test_blend_svd_of_flux2_kohya_files_honours_the_rank_on_fused_modules(tmp_path, capsys):
    (a, sa), (b, sb) = _file(tmp_path, rank=2, seed=1), _file(tmp_path, rank=3, seed=2)
    got = _blend_svd(capsys, a, b, tmp_path / "blend.safetensors")
    for ln in _modules(sa):
        want = 0.7 * _dense(sa, ln) - 0.4 * _dense(sb, ln)
        assert got[ln + ".lora_down.weight"].shape[0] == 3, ln
        assert abs(_rel(_dense(got, ln), want) - _eckart_young(want, 3)) < 1e-5, ln
