"""inspect, blend and resize on FLUX.2 adapters (kohya and ai-toolkit names): the family with its evidence and where
each file loads, blends and resizes checked against the dense ΔW and read back by `Flux2Pipeline.lora_state_dict`;
a Flux.1 LoRA refused by a FLUX.2 pipeline."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import Flux2Pipeline, FluxTransformer2DModel
from safetensors.torch import save_file

from loratools.archs import flux2
from loratools.archs.family import FLUX2
from loratools.formats import read_adapter, write_adapter
from tests._dit import delta, lora_files
from tests._flux2 import KOHYA_MAPPED, file_layout, folded, original_lora, tiny
from tests._tiny import run_cli as run

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")


def _files(tmp_path, kinds=("kohya", "aitoolkit")):
    model = tiny()
    return lora_files(tmp_path, kinds,
                      lambda seed, kind: file_layout(original_lora(model, seed=seed, only=KOHYA_MAPPED), kind))


def _reads_back(path, n):
    """What diffusers' FLUX.2 loader reads from our kohya file is our module, alpha folded."""
    adapter, want = read_adapter(path), Flux2Pipeline.lora_state_dict(path)
    assert len(adapter) == n == len(want) // 2
    for m in adapter:
        down, up = folded(m)
        assert torch.equal(down, want[f"{m.name}.lora_A.weight"]) and torch.equal(up, want[f"{m.name}.lora_B.weight"])
    return adapter


def test_inspect_shows_flux2_its_evidence_and_where_it_loads(tmp_path, capsys):
    kohya, aitoolkit = _files(tmp_path)
    for path, fmt in ((kohya, "kohya"), (aitoolkit, "comfyui")):
        code, out, err = run(capsys, "inspect", path, "--format", "json")
        rep = json.loads(out)
        assert code == 0 and err == "" and rep["unresolved"] == [] and rep["format"] == fmt
        assert rep["family"]["name"] == FLUX2 and "ff.linear_" in rep["family"]["evidence"], rep["family"]
        assert rep["loads_in"]["diffusers"]["ok"] and rep["loads_in"]["ComfyUI"]["ok"], rep["loads_in"]
        code, text, _ = run(capsys, "inspect", path)
        assert code == 0 and f"family      {FLUX2} (from module transformer." in text
    # ComfyUI's own form (lora_down + .alpha) is one diffusers' FLUX.2 loader drops: inspect says so
    out = write_adapter(read_adapter(kohya), tmp_path / "c.safetensors", format="comfyui")
    rep = json.loads(run(capsys, "inspect", out, "--format", "json")[1])["loads_in"]
    assert not rep["diffusers"]["ok"] and "lora_A/lora_B" in rep["diffusers"]["why"] and rep["ComfyUI"]["ok"]
    out = write_adapter(read_adapter(kohya), tmp_path / "d.safetensors", format="diffusers")
    rep = json.loads(run(capsys, "inspect", out, "--format", "json")[1])["loads_in"]
    assert rep["diffusers"]["ok"] and not rep["ComfyUI"]["ok"] and "FLUX.2" in rep["ComfyUI"]["why"]


def test_blend_cat_is_the_exact_weighted_sum(tmp_path, capsys):
    kohya, aitoolkit = _files(tmp_path)
    out = tmp_path / "blend.safetensors"
    code, _, err = run(capsys, "blend", f"{kohya}:0.7", f"{aitoolkit}:-0.4", "-m", "cat", "-o", out, "-q",
                       "--to", "kohya")
    assert code == 0, err
    a, b = read_adapter(kohya), read_adapter(aitoolkit)
    got = _reads_back(str(out), len(a))
    for m in got:
        want = 0.7 * delta(a.modules[m.name]) - 0.4 * delta(b.modules[m.name])
        torch.testing.assert_close(delta(m), want, rtol=1e-6, atol=1e-6, msg=m.name)  # fp32 factors


def test_resize_is_the_best_lower_rank(tmp_path, capsys):
    (kohya,) = _files(tmp_path, ("kohya",))
    out = tmp_path / "r2.safetensors"
    code, _, err = run(capsys, "resize", kohya, "--rank", "2", "-o", out, "-q")
    assert code == 0, err
    src = read_adapter(kohya)
    _reads_back(str(out), len(src))
    # kohya's modules are the fused ones (q, k, v together): each is the best rank-2 LoRA of its fused ΔW
    want, _ = flux2.LAYOUT.to_original(list(src))
    got, _ = flux2.LAYOUT.to_original(list(read_adapter(str(out))))
    assert set(got) == set(want) and any(n.endswith(".qkv") for n in got)
    for name, m in got.items():
        u, s, vh = torch.linalg.svd(delta(want[name]), full_matrices=False)
        assert m.rank == 2 and s[2] > 0.1  # what rank 2 leaves out is far above the fp32 tolerance
        torch.testing.assert_close(delta(m), (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-5, atol=1e-5, msg=name)


def test_flux1_lora_refused_by_a_flux2_pipeline(tmp_path, capsys):
    root = tmp_path / "pipe"
    tiny().save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline"}))
    torch.manual_seed(0)
    flux1 = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    w = flux1.single_transformer_blocks[0].proj_mlp.weight
    path = tmp_path / "flux1.safetensors"
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.ones(2, w.shape[1]),
               "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.ones(w.shape[1] * 3 + w.shape[0], 2)},
              str(path))
    code, _, err = run(capsys, "merge", root, path, "-o", tmp_path / "never")
    assert code == 1 and err.startswith("loratools: error: Flux LoRA, FLUX.2 pipeline"), err
    assert not (tmp_path / "never").exists()


def test_blend_keeps_the_family_its_inputs_agree_on(tmp_path, capsys):
    """qkv alone does not tell FLUX.2 from Flux.1; the inputs' metadata does, and a blend keeps it (it is
    written with FLUX.2's sd-scripts module), while inputs that disagree leave the family to the shapes."""
    model = tiny()
    paths = []
    for seed, version in enumerate(("flux2", "flux2", "flux1"), start=1):
        path = tmp_path / f"{seed}.safetensors"
        save_file(file_layout(original_lora(model, seed=seed, only=("qkv",)), "kohya"), str(path),
                  metadata={"ss_base_model_version": version})
        paths.append(str(path))
    out = tmp_path / "agree.safetensors"
    assert run(capsys, "blend", paths[0], paths[1], "-m", "cat", "-o", out, "-q")[0] == 0
    meta = read_adapter(str(out)).metadata
    assert meta["ss_base_model_version"] == "flux2" and meta["ss_network_module"] == "networks.lora_flux_2"
    out = tmp_path / "disagree.safetensors"
    assert run(capsys, "blend", paths[0], paths[2], "-m", "cat", "-o", out, "-q")[0] == 0
    assert "ss_base_model_version" not in read_adapter(str(out)).metadata
