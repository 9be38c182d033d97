"""LyCORIS LoKr/LoHa on the text encoders of Flux.1 (CLIP-L + T5) and SD3/3.5 (CLIP-L, CLIP-G + T5) files, in kohya's
names (`lora_te1_` CLIP-L, `lora_te2_` CLIP-G, `lora_te3_` T5) and ComfyUI's dotted ones
(`text_encoders.clip_l.transformer.text_model…`), beside transformer modules in original or diffusers names. Oracle:
the `lycoris-lora` forward of each wrapped module of tiny CLIPTextModel / T5EncoderModel (gated, as T5 v1.1)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import T5Config, T5EncoderModel

from loratools import safetensors_io
from loratools.formats import detect, read_adapter, write_adapter
from loratools.inspection import inspect
from tests import _sd3
import test_lycoris_dit as T

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
# kohya prefix -> (ComfyUI prefix, component in a Flux file, in an SD3 file)
TE = {"lora_te1": ("text_encoders.clip_l.transformer.", "text_encoder", "text_encoder"),
      "lora_te2": ("text_encoders.clip_g.transformer.", None, "text_encoder_2"),
      "lora_te3": ("text_encoders.t5xxl.transformer.", "text_encoder_2", "text_encoder_3")}


def _encoders():
    comps = _sd3.components()
    torch.manual_seed(4)
    comps["text_encoder_3"] = T5EncoderModel(T5Config(d_model=12, d_ff=24, d_kv=6, num_heads=2, num_layers=1,
                                                      vocab_size=100, feed_forward_proj="gated-gelu")).eval()
    return {"lora_te1": comps["text_encoder"], "lora_te2": comps["text_encoder_2"], "lora_te3": comps["text_encoder_3"]}


def _te_file(family, algo, dotted):
    """{key: tensor} of LyCORIS on every linear of each text encoder's first layer, and {module: ΔW} it applies."""
    sd, want = {}, {}
    for i, (prefix, model) in enumerate(_encoders().items()):
        comp = TE[prefix][1 if family == "flux" else 2]
        if comp is None:
            continue
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and (".0." in n)]
        clean = {k: v.clone() for k, v in model.state_dict().items()}
        net = T._wrap(model, names, prefix, algo, seed=7 + i)
        eff = T._effective(model, names)
        keys = {k: v for k, v in net.state_dict().items()}
        flat = {f"{prefix}_" + n.replace(".", "_"): n for n in names}
        for key, v in keys.items():
            ln, _, part = key.partition(".")
            if ln not in flat:  # LyCORIS' state dict: its modules' own parameter names
                continue
            sd[(TE[prefix][0] + flat[ln] if dotted else ln) + "." + part] = v.detach().clone()
        net.restore()
        model.load_state_dict(clean)
        want.update({f"{comp}.{n}": eff[n] - clean[f"{n}.weight"] for n in names})
    return sd, want


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("algo", ["lokr", "loha"])
@pytest.mark.parametrize("te_names,transformer", [("kohya", "original"), ("dotted", "original"),
                                                  ("dotted", "lycoris_"), ("kohya", "lycoris_")])
def test_text_encoder_lycoris_reads_as_its_forward(tmp_path, family, algo, te_names, transformer):
    sd, want = _te_file(family, algo, te_names == "dotted")
    if transformer == "original":
        tpath, *_ = T._original_file(tmp_path, family, algo)
    else:
        tpath, *_ = T._diffusers_file(tmp_path, family, algo, dotted=False)
    tsd, _ = safetensors_io.load(tpath)
    path = tmp_path / "all.safetensors"
    safetensors_io.save(str(path), {**tsd, **sd}, {"ss_base_model_version": "flux1" if family == "flux" else "sd3"})
    assert detect(str(path)) == "lycoris"
    adapter = read_adapter(str(path))
    assert {n for n in adapter.modules if not n.startswith("transformer.")} == set(want)
    for n, d in want.items():
        torch.testing.assert_close(adapter.modules[n].dense_delta(), d, rtol=1e-5, atol=1e-6, msg=n)
    assert any(float(d.abs().max()) > 1e-3 for d in want.values())
    loads = inspect(str(path)).to_dict()["loads_in"]
    # ComfyUI maps both spellings of the text encoders (its own names, kohya's); Forge kohya's only (Flux)
    assert loads["ComfyUI"]["ok"], loads["ComfyUI"]
    assert loads["A1111/Forge"]["ok"] == (family == "flux" and te_names == "kohya"), loads["A1111/Forge"]
    if family == "flux" and te_names == "kohya" and transformer == "original" and algo == "lokr":
        for fmt in ("comfyui", "diffusers"):  # Forge's Flux map: no `text_encoders.…`, no diffusers T5 names
            out = write_adapter(adapter, str(tmp_path / f"o.{fmt}.safetensors"), format=fmt)
            why = inspect(out).to_dict()["loads_in"]["A1111/Forge"]
            assert not why["ok"] and "text-encoder module" in why["why"], why
