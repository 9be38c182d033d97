"""Qwen-Image: the transformer manifest against diffusers' own model, family detection, every common LoRA layout
read as `QwenImagePipeline.lora_state_dict` reads it (diffusers/PEFT, ComfyUI/DiffSynth `diffusion_model.`,
Lightning's unprefixed `lora_A` + alpha, DiffSynth's `lora_A.default`, kohya/musubi `lora_unet_`), what we write
read back by it unchanged, and a merge into a tiny Qwen-Image pipeline folder against `load_lora_weights` +
`fuse_lora`."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from loratools import merge
from loratools.adapter import LoraAdapter, LoraModule
from loratools.archs import load_manifest
from loratools.archs.family import FLUX, QWEN, adapter_family, pipeline_family
from loratools.checkpoint import Checkpoint
from loratools.errors import IncompatibleError
from loratools.formats import detect, read_adapter, write_adapter
from tests._dit import assert_fp8_merge, merge_into_single
from tests._tiny import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, axes_dims_rope=(2, 2, 4))
TARGETS = ["to_q", "to_k", "add_v_proj", "to_out.0", "to_add_out", "img_mod.1", "img_mlp.net.0.proj", "txt_mlp.net.2",
           "img_in", "proj_out"]


def tiny(seed=0):
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**TINY).eval()


def lora_sd(model, seed=1, r=4):
    """diffusers-named factors of a random PEFT LoRA on `model` (`transformer_blocks.0.attn.to_q.lora_A.weight` …)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    model.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights=False))
    return get_peft_model_state_dict(model)


def modules(sd):
    return sorted(k[: -len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight"))


def alphas(sd):
    """A different alpha per module (kohya-style files keep one each)."""
    return {m: float(2 + 3 * (i % 3)) for i, m in enumerate(modules(sd))}


def layout(sd, kind):
    """The same LoRA in one of the layouts Qwen-Image LoRAs are shared in."""
    out, al = {}, alphas(sd)
    for m in modules(sd):
        a, b, alpha = sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"], torch.tensor(al[m])
        key, down, up = {"comfy": (f"diffusion_model.{m}", ".lora_down.weight", ".lora_up.weight"),
                         "comfy_ab": (f"diffusion_model.{m}", ".lora_A.weight", ".lora_B.weight"),
                         "aitoolkit": (f"diffusion_model.{m}", ".lora_A.weight", ".lora_B.weight"),
                         "lightning": (m, ".lora_down.weight", ".lora_up.weight"),
                         "bare_ab": (m, ".lora_A.weight", ".lora_B.weight"),
                         "diffsynth": (m, ".lora_A.default.weight", ".lora_B.default.weight"),
                         "musubi": ("lora_unet_" + m.replace(".", "_"), ".lora_down.weight", ".lora_up.weight")}[kind]
        out.update({key + down: a, key + up: b})
        if kind not in ("diffsynth", "aitoolkit"):  # these save PEFT's factors only (alpha = rank)
            out[key + ".alpha"] = alpha
    return out


def folded(m: LoraModule):
    """Our module's factors with its scale folded into them as diffusers' Qwen converter folds alpha / rank
    (powers of two moved from the down to the up factor until down's share is at least half of up's)."""
    down_s, up_s = m.scale, 1.0
    while down_s * 2 < up_s:
        down_s, up_s = down_s * 2, up_s / 2
    return m.down * down_s, m.up * up_s


def assert_reads_as_diffusers(path, n):
    """Our factors are the ones `lora_state_dict` returns: folded as it folds the file's alphas (a diffusers-layout
    file keeps them in its `lora_adapter_metadata`, which `load_lora_weights` turns into PEFT's scaling)."""
    adapter = read_adapter(path)
    want = QwenImagePipeline.lora_state_dict(path)
    assert len(adapter) == n == len(want) // 2 and adapter_family(adapter)[0] == QWEN
    for m in adapter:
        down, up = (m.down, m.up) if adapter.format == "diffusers" else folded(m)
        assert torch.equal(down, want[f"{m.name}.lora_A.weight"]), m.name
        assert torch.equal(up, want[f"{m.name}.lora_B.weight"]), m.name
    return adapter


def assert_loads_as_ours(path, adapter, model):
    """`load_lora_weights` puts every module's update (PEFT's scaling · B @ A) where we read it."""
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                             tokenizer=None, transformer=copy.deepcopy(model))
    pipe.load_lora_weights(path, adapter_name="x")
    for m in adapter:
        layer = pipe.transformer.get_submodule(m.name[len("transformer."):])
        got = layer.scaling["x"] * layer.lora_B["x"].weight @ layer.lora_A["x"].weight
        torch.testing.assert_close(got, m.scale * m.up @ m.down, rtol=1e-6, atol=1e-7, msg=m.name)


def test_manifest_names_are_diffusers_qwen_names():
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**TINY)
    names = {n[: -len(".weight")] for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() >= 2}
    shipped = load_manifest("qwen-image")["components"]["transformer"]
    assert names <= set(shipped) and "transformer_blocks.60.attn.to_q" not in shipped
    assert shipped["transformer_blocks.59.attn.to_q"] == [3072, 3072]
    assert shipped["transformer_blocks.59.img_mlp.net.0.proj"] == [12288, 3072]
    assert shipped["transformer_blocks.0.img_mod.1"] == [18432, 3072]
    assert shipped["txt_in"] == [3072, 3584] and shipped["img_in"] == [3072, 64] and shipped["proj_out"] == [64, 3072]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["comfy", "comfy_ab", "aitoolkit", "lightning", "bare_ab", "diffsynth", "musubi"])
def test_every_layout_reads_as_diffusers_converts_it(tmp_path, kind, dtype):
    sd = {k: v.to(dtype) for k, v in lora_sd(tiny()).items()}
    path = str(tmp_path / f"{kind}.safetensors")
    save_file(layout(sd, kind), path)
    assert detect(path) == ("kohya" if kind == "musubi" else "comfyui")
    adapter = assert_reads_as_diffusers(path, len(modules(sd)))
    al = alphas(sd)
    for m in adapter:  # the factors are the file's, the alpha kept beside them
        local = m.name[len("transformer."):]
        assert torch.equal(m.down, sd[f"{local}.lora_A.weight"]) and torch.equal(m.up, sd[f"{local}.lora_B.weight"])
        assert m.alpha_value == (4 if kind in ("diffsynth", "aitoolkit") else al[local])


def test_diffusers_layout_and_what_we_write_reads_back_unchanged(tmp_path):
    model = tiny()
    sd = lora_sd(model)
    src = tmp_path / "diffusers"
    QwenImagePipeline.save_lora_weights(str(src), transformer_lora_layers=sd)
    assert_reads_as_diffusers(str(src / "pytorch_lora_weights.safetensors"), len(modules(sd)))
    musubi = tmp_path / "musubi.safetensors"
    save_file(layout(sd, "musubi"), str(musubi))
    adapter = read_adapter(str(musubi))
    for fmt, name in (("diffusers", "out_diffusers"), ("comfyui", "out_comfy.safetensors"),
                      ("kohya", "out_kohya.safetensors")):
        out = write_adapter(adapter, tmp_path / name, format=fmt)
        out = out if out.endswith(".safetensors") else os.path.join(out, "pytorch_lora_weights.safetensors")
        assert detect(out) == fmt
        back = assert_reads_as_diffusers(out, len(adapter))
        assert_loads_as_ours(out, adapter, model)
        for m in adapter:  # round trip bit-exact, alphas kept
            got = back.modules[m.name]
            assert torch.equal(got.down, m.down) and torch.equal(got.up, m.up) and got.scale == m.scale, (fmt, m.name)
    keys = set(read_adapter(str(tmp_path / "out_kohya.safetensors")).config["original_keys"])
    assert keys == {k[: -len(".lora_down.weight")] for k in layout(sd, "musubi") if k.endswith(".lora_down.weight")}


def test_family_from_names_shapes_metadata_and_pipeline(tmp_path):
    def adapter(shapes, metadata=None):
        out = LoraAdapter(format="diffusers", metadata=metadata or {})
        for name, (o, i) in shapes.items():
            out.add(LoraModule(name, torch.zeros(1, i), torch.zeros(o, 1), None, "linear"))
        return out

    assert adapter_family(adapter({"transformer.transformer_blocks.0.img_mlp.net.0.proj": (32, 8)}))[0] == QWEN
    # width 3072 is Flux's too: Qwen-Image's 60 blocks (Flux has 19 of that name) tell them apart
    attn = {f"transformer.transformer_blocks.{i}.attn.to_q": (3072, 3072) for i in (0, 40)}
    fam = adapter_family(adapter(attn))
    assert fam == (QWEN, "transformer shapes of qwen-image (transformer.transformer_blocks.0.attn.to_q [3072, 3072])")
    assert adapter_family(adapter({"transformer.transformer_blocks.0.attn.to_q": (3072, 3072)}))[0] == FLUX
    for key, value in (("ss_architecture", "qwen_image"), ("modelspec.architecture", "qwen-image/lora"),
                       ("ss_base_model_version", "qwen_image_edit")):
        assert adapter_family(adapter({"transformer.x": (8, 8)}, {key: value}))[0] == QWEN
    for cls in ("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "model_index.json").write_text(json.dumps({"_class_name": cls}))
        assert pipeline_family(str(tmp_path / cls), ["transformer"]) == QWEN


def test_text_encoder_modules_are_refused_in_transformer_only_layouts(tmp_path):
    sd = lora_sd(tiny())
    path = tmp_path / "a.safetensors"
    save_file(layout(sd, "comfy"), str(path))
    adapter = read_adapter(str(path))
    adapter.add(LoraModule("text_encoder.model.layers.0.self_attn.q_proj", torch.ones(2, 8), torch.ones(8, 2),
                           None, "linear"))
    for fmt in ("kohya", "comfyui"):
        out = tmp_path / f"x.{fmt}.safetensors"
        with pytest.raises(IncompatibleError, match="Qwen-Image (transformer|LoRA holds the transformer) only"):
            write_adapter(adapter, out, format=fmt)
        assert not out.exists()


def _pipeline_folder(root, transformer):
    transformer.save_pretrained(root / "transformer")
    with open(root / "model_index.json", "w") as f:
        json.dump({"_class_name": "QwenImagePipeline", "transformer": ["diffusers", "QwenImageTransformer2DModel"]}, f)
    return root


@pytest.mark.parametrize("kind", ["diffusers", "musubi", "comfy"])
def test_merge_qwen_pipeline_matches_fuse_lora(tmp_path, kind):
    base = tiny(2)
    root = _pipeline_folder(tmp_path / "qwenpipe", base)
    assert pipeline_family(str(root), ["transformer"]) == QWEN
    sd = lora_sd(base, seed=3)
    if kind == "diffusers":
        QwenImagePipeline.save_lora_weights(str(tmp_path / "lora"), transformer_lora_layers=sd)
        lora = str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    else:
        lora = str(tmp_path / f"{kind}.safetensors")
        save_file(layout(sd, kind), lora)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                             tokenizer=None, transformer=copy.deepcopy(base))
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    out = tmp_path / "merged"
    merge(str(root), [lora], str(out))
    got, want = Checkpoint(str(out / "transformer")), pipe.transformer.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got.read(k), v, rtol=1e-5, atol=1e-5, msg=k)
    changed = [k for k, v in base.state_dict().items() if not torch.equal(want[k], v)]
    assert len(changed) == len(modules(sd))


def _fused(base, lora):
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                             tokenizer=None, transformer=copy.deepcopy(base))
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    return pipe.transformer.state_dict()


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_merge_single_file_matches_fuse_lora(tmp_path, capsys, prefix):
    """Comfy-Org's bare files and ComfyUI-saved ones; fp8 rounded once from the fp32 sum."""
    base = tiny(4)
    sd = lora_sd(base, seed=5)
    lora = str(tmp_path / "musubi.safetensors")
    save_file(layout(sd, "musubi"), lora)
    want = _fused(base, lora)
    weights = base.state_dict()
    single, out = tmp_path / "qwen.safetensors", tmp_path / "merged.safetensors"
    got = merge_into_single(capsys, weights, prefix, single, lora, out)
    assert set(got) == {prefix + k for k in want}
    for k, v in want.items():
        torch.testing.assert_close(got[prefix + k], v, rtol=1e-5, atol=1e-5, msg=k)
    fp8 = assert_fp8_merge(capsys, single, lora, out, weights, want, prefix)
    fp8[prefix + "transformer_blocks.0.attn.to_q.scale_weight"] = torch.ones(1)  # ComfyUI's scaled fp8
    save_file(fp8, str(single))
    code, _, err = run_cli(capsys, "merge", single, lora, "-o", tmp_path / "never.safetensors")
    assert code == 1 and "scaled-fp8 checkpoint" in err and err.count("\n") == 1
    assert not (tmp_path / "never.safetensors").exists()


def test_attention_only_kohya_names_need_the_metadata(tmp_path):
    """Older ai-toolkit flattens Flux's diffusers names as musubi-tuner flattens Qwen-Image's: attention on the
    first blocks alone is Flux's unless the metadata says Qwen-Image."""
    sd = {k: v for k, v in lora_sd(tiny()).items() if ".attn.to_" in k}
    path = tmp_path / "attn.safetensors"
    for metadata, original in ((None, "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"),
                               ({"ss_architecture": "qwen_image"},
                                "diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight")):
        save_file(layout(sd, "musubi"), str(path), metadata=metadata)
        adapter = read_adapter(str(path))
        assert (adapter_family(adapter) or (None,))[0] == (QWEN if metadata else None)
        out = write_adapter(adapter, tmp_path / "c.safetensors", format="comfyui", overwrite=True)
        assert original in load_file(out)
