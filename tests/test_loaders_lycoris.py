"""inspect's "loads in" line for LyCORIS files of the DiT families, judged by the names the file uses. diffusers'
✓ and ✗ are checked by loading the file into its family's tiny pipeline (0.42: LoKr for FLUX.2 only); ComfyUI's
and A1111/Forge's follow their key maps as loaders_dit restates them (ComfyUI comfy/lora.py + comfy/utils.py
flux_to_diffusers, Forge backend/patcher/lora.py, A1111 Lora networks.py): none of them is installed here."""
from __future__ import annotations

import copy
import inspect as signature

import diffusers
import pytest
import torch

from loratools import safetensors_io
from loratools.archs import flux2
from loratools.formats import read_adapter, write_adapter
from loratools.inspection import inspect
from tests import _flux2
import test_lycoris_dit as T

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
TOOLS = ("diffusers", "ComfyUI", "A1111/Forge")


def _loads(path):
    rep = inspect(str(path)).to_dict()["loads_in"]
    return tuple(rep[t]["ok"] for t in TOOLS), {t: rep[t]["why"] for t in TOOLS}


def _dotted(tmp_path, path, want, prefix, name="dotted"):
    """The file's `lycoris_` module names as dotted paths under `prefix` (ai-toolkit, SimpleTuner exports …)."""
    flat = {"lycoris_" + n.replace(".", "_"): n for n in want}
    return T._renamed(path, tmp_path / f"{name}.safetensors", lambda ln: prefix + flat[ln])


# family, naming -> (diffusers, ComfyUI, A1111/Forge)
DIFFUSERS_NAMED = {
    ("flux", "lycoris_"): (False, True, True), ("flux", "transformer."): (False, True, True),
    ("flux", ""): (False, True, False), ("flux", "diffusion_model."): (False, False, False),
    ("sd3", "lycoris_"): (False, True, False), ("sd3", "transformer."): (False, True, False),
    ("sd3", ""): (False, False, False),
    ("qwen", "lycoris_"): (False, True, False), ("qwen", "diffusion_model."): (False, True, False),
    ("qwen", "model.diffusion_model."): (False, False, False),
    ("wan", "lycoris_"): (False, False, False), ("wan", "transformer."): (False, False, False),
}


@pytest.mark.parametrize("family,naming", sorted(DIFFUSERS_NAMED))
def test_diffusers_named_files_by_each_tools_key_map(tmp_path, family, naming):
    path, _, _, _, want = T._diffusers_file(tmp_path, family, "lokr", dotted=False)
    if naming != "lycoris_":
        path = _dotted(tmp_path, path, want, naming)
    ok, why = _loads(path)
    assert ok == DIFFUSERS_NAMED[family, naming], why
    if not ok[1]:  # ComfyUI skips them with "lora key not loaded"; its original names are what it maps everywhere
        assert "ComfyUI skips: convert --to comfyui" in why["ComfyUI"]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_original_names_load_in_comfyui_and_in_forge_or_a1111(tmp_path, family):
    path, _, _, original, _ = T._original_file(tmp_path, family, "loha")
    ok, why = _loads(path)
    assert ok == (False, True, True), why
    assert ("Forge" if family == "flux" else "A1111 1.10") in why["A1111/Forge"]
    # the same modules as `diffusion_model.double_blocks.0.img_attn.qkv`
    names = {"lora_unet_" + n.replace(".", "_"): n for n in T._Original(original).names}
    dotted = T._renamed(path, tmp_path / "d.safetensors", lambda ln: "diffusion_model." + names[ln])
    ok, why = _loads(dotted)
    assert ok == (False, True, family == "flux"), why  # A1111 looks kohya names up; Forge also dotted ones


def _flux2_file(tmp_path, algo="lokr", blocks_only=True):
    model = _flux2.tiny()
    clean = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n in T._linears(model, blocks_only=False) if "blocks" in n or not blocks_only]
    net = T._wrap(model, names, "lycoris", algo, seed=3)
    want = T._effective(model, names)
    path = tmp_path / f"flux2_{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_base_model_version": "flux2"})
    net.restore()
    model.load_state_dict(clean)
    return str(path), model, clean, want


@pytest.mark.parametrize("case", ["lycoris_", "bare", "transformer.", "diffusion_model.", "globals", "loha"])
def test_flux2_lycoris_verdicts_are_what_diffusers_and_comfyui_do(tmp_path, case):
    path, model, clean, want = _flux2_file(tmp_path, "loha" if case == "loha" else "lokr", case != "globals")
    if case in ("bare", "transformer.", "diffusion_model."):
        path = _dotted(tmp_path, path, want, "" if case == "bare" else case)
    ok, why = _loads(path)
    assert ok[0] == _pipeline_applies("Flux2Pipeline", model, path, want), why
    assert ok[0] == (case in ("lycoris_", "bare")), why
    # ComfyUI's Flux map (FLUX.2 is a Flux there) lists FLUX.2's block names, not its shared modulations
    assert ok[1:] == (case not in ("globals", "diffusion_model."), False), why
    if case == "globals":
        assert "modulation" in why["ComfyUI"] or "time_guidance" in why["ComfyUI"], why
    assert any(not torch.equal(w, clean[f"{n}.weight"]) for n, w in want.items())


@pytest.mark.parametrize("blocks_only", [True, False])
def test_flux2_diffusers_file_in_comfyui_follows_its_flux_map(tmp_path, blocks_only):
    """ComfyUI's flux_to_diffusers lists FLUX.2's block names (`ff.linear_in`, `to_qkv_mlp_proj`) under
    `transformer.`, not its shared modulations or time/guidance embedder."""
    path, *_ = _flux2_file(tmp_path, blocks_only=blocks_only)
    out = write_adapter(read_adapter(path), str(tmp_path / "d.safetensors"), format="diffusers")
    ok, why = _loads(out)
    assert ok[:2] == (True, blocks_only), why
    assert blocks_only or "modulation" in why["ComfyUI"] or "time_guidance" in why["ComfyUI"], why


def _pipeline_applies(cls_name, model, path, want) -> bool:
    """diffusers' answer for any pipeline class: load_lora_weights + fuse_lora give the LyCORIS forward, or not."""
    cls = getattr(diffusers, cls_name)
    others = [p for p in signature.signature(cls.__init__).parameters if p not in ("self", "transformer")]
    pipe = cls(**{**dict.fromkeys(others), "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(),
                  "transformer": copy.deepcopy(model)})
    try:
        pipe.load_lora_weights(path)
        pipe.fuse_lora(components=["transformer"])
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError):
        return False
    mods = dict(pipe.transformer.named_modules())
    return all(torch.allclose(mods[n].weight, w, rtol=1e-5, atol=1e-5) for n, w in want.items())


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen", "wan"])
@pytest.mark.parametrize("naming", ["lycoris_", ""])
def test_other_families_lokr_does_not_load_in_diffusers(tmp_path, family, naming):
    path, model, cls, _, want = T._diffusers_file(tmp_path, family, "lokr", dotted=False)
    if naming != "lycoris_":
        path = _dotted(tmp_path, path, want, naming)
    ok, why = _loads(path)
    assert not ok[0] and "LoKr: FLUX.2 and Z-Image only" in why["diffusers"], why
    assert not _pipeline_applies(cls, model, path, want)


@pytest.mark.parametrize("naming", ["diffusion_model.", "lora_unet_"])
def test_flux2_lokr_on_bfl_modules_in_diffusers(tmp_path, naming):
    """ai-toolkit's `diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1` (a Kronecker ΔW on the fused qkv): diffusers
    fuses the model's q, k, v projections and loads it there; kohya's `lora_unet_` spelling it does not convert."""
    model = _flux2.tiny()
    original = _flux2.original_state_dict(model)
    tree = T._Original(original)
    names = [n for n in tree.names if "blocks" in n]
    net = T._wrap(tree, names, "lora_unet", "lokr", seed=5)
    eff = T._effective(tree, names)
    path = tmp_path / "kohya.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_base_model_version": "flux2"})
    net.restore()
    path = str(path)
    if naming == "diffusion_model.":
        flat = {"lora_unet_" + n.replace(".", "_"): n for n in names}
        path = T._renamed(path, tmp_path / "dotted.safetensors", lambda ln: naming + flat[ln])
    ok, why = _loads(path)
    assert ok == (naming == "diffusion_model.", True, False), why

    def diffusers_name(o):  # after its fusion: the fused projections' names
        for orig, fused in (("img_attn.qkv", "attn.to_qkv"), ("txt_attn.qkv", "attn.to_added_qkv")):
            if o.endswith(orig):
                return o.replace("double_blocks", "transformer_blocks").replace(orig, fused)
        return flux2.LAYOUT.lookup(o).parts[0]
    want = {diffusers_name(o): w for o, w in eff.items()}
    assert _pipeline_applies("Flux2Pipeline", model, path, want) == ok[0]
    assert any(not torch.equal(w, original[f"{o}.weight"]) for o, w in eff.items() if o.endswith("qkv"))


def test_webuis_have_no_flux2_or_qwen_image_whatever_the_format(tmp_path):
    """A1111 and Forge run SD 1.x/2.x/XL, SD3 (A1111 1.10) and Flux.1 (Forge): a kohya FLUX.2 or Qwen-Image LoRA
    has kohya names but no model to go into there."""
    sd = _flux2.file_layout(_flux2.original_lora(_flux2.tiny()), "kohya")
    path = tmp_path / "flux2_kohya.safetensors"
    safetensors_io.save(str(path), sd, {"ss_base_model_version": "flux2"})
    ok, why = _loads(path)
    assert not ok[2] and why["A1111/Forge"] == "A1111/Forge have no FLUX.2 models", why
    path, *_ = T._diffusers_file(tmp_path, "qwen", "lokr", dotted=False)
    out = write_adapter(read_adapter(path), str(tmp_path / "qwen_kohya.safetensors"), format="kohya")
    ok, why = _loads(out)
    assert not ok[2] and "Qwen-Image" in why["A1111/Forge"], why
