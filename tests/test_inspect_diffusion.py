"""inspect / validate / resize on diffusion adapters whose names loratools cannot resolve (a kohya file
with Flux-style names of no Flux module, an SD 1.5 file with one unknown module), kohya training metadata, model family, LyCORIS rank/alpha.

Oracles: the dense SVD (resize keeps the best rank-k ΔW), and the LoHa definition (rank = dim, scale = alpha/dim).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from _tiny import run_cli as run, save_state_dict_folder

TAGS = {"10_mychar": {"1girl": 40, "solo": 35, "smile": 12}, "5_style": {"1girl": 10, "outdoors": 7}}
FLUX_META = {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux", "ss_network_dim": "4",
             "ss_network_alpha": "2.0", "ss_resolution": "(512, 512)", "ss_epoch": "3", "ss_num_epochs": "10",
             "ss_steps": "1200", "ss_num_train_images": "75", "ss_tag_frequency": json.dumps(TAGS)}
FLUX_NAMES = {"lora_unet_double_blocks_0_img_attn_gate": (96, 32), "lora_unet_single_blocks_0_linear3": (32, 80)}
SD1_TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # real SD 1.5 names and shapes
SD1_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def kohya_tensors(names, rank=4, alpha=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, inp) in names.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion_inspect")
    save_file(kohya_tensors(FLUX_NAMES), root / "flux.safetensors", FLUX_META)
    save_file(kohya_tensors(FLUX_NAMES), root / "flux_bare.safetensors")
    sd1 = kohya_tensors({SD1_TO_K: (320, 768), SD1_Q: (768, 768), "lora_unet_mystery_block": (8, 8)}, rank=2)
    save_file(sd1, root / "sd1_unknown.safetensors")
    g = torch.Generator().manual_seed(3)
    loha = {f"{SD1_Q}.{part}": torch.randn(*shape, generator=g) for part, shape in
            (("hada_w1_a", (768, 4)), ("hada_w1_b", (4, 768)), ("hada_w2_a", (768, 4)), ("hada_w2_b", (4, 768)))}
    loha[f"{SD1_Q}.alpha"] = torch.tensor(2.0)
    save_file(loha, root / "loha.safetensors")
    save_state_dict_folder(torch.nn.Linear(4, 4), str(root / "base"))
    return root


def test_inspect_flux_kohya_without_name_list(files, capsys):
    code, out, err = run(capsys, "inspect", files / "flux.safetensors")
    assert code == 0
    assert err.count("\n") == 1 and err.startswith("warning: 2 module name(s) match no module of the sd1 manifest")
    assert "lora_unet_double_blocks_0_img_attn_gate" in out and "lora_unet_single_blocks_0_linear3" in out
    lines = {line[:12].strip(): line[12:] for line in out.splitlines() if line[:1].isalpha()}
    assert lines["family"] == "Flux (from metadata ss_base_model_version=flux1)"
    assert lines["training"] == ("networks.lora_flux dim 4 alpha 2.0, base flux1, resolution (512, 512), "
                                 "epoch 3/10, steps 1200, 75 images")
    assert lines["tags"] == "1girl 50, solo 35, smile 12, outdoors 7 (4 distinct tag(s) in 2 dataset folder(s))"
    code, out, _ = run(capsys, "inspect", files / "flux.safetensors", "--format", "json", "--summary")
    rep = json.loads(out)
    assert rep["training"]["tags"]["top"][0] == ["1girl", 50] and rep["training"]["steps"] == "1200"
    assert rep["unresolved"] == sorted(FLUX_NAMES) and rep["rank"]["common"] == 4 and rep["alpha"]["common"] == 2
    # no metadata: the family still shows in the names
    code, out, _ = run(capsys, "inspect", files / "flux_bare.safetensors", "--summary")
    assert code == 0 and "family      Flux (from module lora_unet_double_blocks_0_img_attn_gate)" in out
    assert "training" not in out


def test_validate_warns_and_strict_fails(files, capsys):
    code, out, err = run(capsys, "validate", files / "flux.safetensors")
    assert code == 0 and out.startswith("warning: 2 module name(s)") and out.count("\n") == 1
    assert "error" not in out + err and err.strip().endswith("ok (2 module(s) checked, 1 warning(s))")
    code, out, err = run(capsys, "validate", files / "flux.safetensors", "--strict")
    assert code == 1 and err.startswith("loratools: error: ") and "--strict fails on warnings" in err


def test_resize_keeps_unresolved_names_and_gives_the_best_rank_k(files, tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    code, _, err = run(capsys, "resize", files / "flux.safetensors", "-o", out, "--rank", 2, "-q")
    assert code == 0 and err.startswith("warning: 2 module name(s)")
    src, got = load_file(files / "flux.safetensors"), load_file(out)
    assert {k.split(".")[0] for k in got} == set(FLUX_NAMES)
    for name in FLUX_NAMES:
        delta = 0.5 * src[f"{name}.lora_up.weight"].double() @ src[f"{name}.lora_down.weight"].double()
        u, s, vh = torch.linalg.svd(delta)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        scale = float(got[f"{name}.alpha"]) / 2
        ours = scale * got[f"{name}.lora_up.weight"].double() @ got[f"{name}.lora_down.weight"].double()
        assert (ours - best).norm() / best.norm() < 1e-5


def test_sd1_file_with_an_unknown_module(files, capsys):
    code, out, err = run(capsys, "inspect", files / "sd1_unknown.safetensors")
    assert code == 0 and err.count("\n") == 1 and "lora_unet_mystery_block" in err
    assert "family      SD 1.x (from cross-attention width 768" in out
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in out  # the others resolve
    code, out, _ = run(capsys, "validate", files / "sd1_unknown.safetensors")
    assert code == 0 and out.count("warning: ") == 1
    # a command that needs real names still refuses, without naming options it does not have
    code, _, err = run(capsys, "merge", files / "base", files / "sd1_unknown.safetensors", "-o", files / "never")
    assert code == 1 and "lora_unet_mystery_block" in err and "--allow-unmatched" not in err
    assert "pass --base" not in err and err.count("\n") == 1


def test_loha_shows_its_own_rank_and_alpha(files, capsys):
    code, out, err = run(capsys, "inspect", files / "loha.safetensors", "--format", "json")
    assert code == 0 and err == ""
    rep = json.loads(out)
    row = rep["module_list"][0]
    assert (row["rank"], row["alpha"], row["scale"], row["algorithm"]) == (4, 2, 0.5, "loha")
    assert row["factored_rank"] == 16  # (w1a w1b) ⊙ (w2a w2b) has rank ≤ 4·4: the exact LoRA it became
    assert rep["rank"]["common"] == 4 and rep["alpha"]["common"] == 2 and rep["algorithms"] == {"loha": 1}
    code, out, _ = run(capsys, "inspect", files / "loha.safetensors", "--summary")
    assert "format      lycoris  (loha 1)" in out and "rank        4" in out and "alpha       2" in out
