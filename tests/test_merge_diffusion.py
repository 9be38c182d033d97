"""`loratools merge` into diffusers pipeline folders and single-file SD 1.x / 2.x / SDXL checkpoints.

Oracles: diffusers' own `load_lora_weights` + `fuse_lora` (merged weights), and diffusers'
`single_file_utils` converters (our LDM/SGM name map, and reading merged single files back).
Models are tiny, with the real block structure, random weights and fixed seeds; nothing is downloaded.
"""
from __future__ import annotations

import copy
import hashlib
import os
import shutil

import pytest
import torch
from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from diffusers.loaders import single_file_utils as sfu
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from loratools import LoraAdapter, LoraModule, merge, safetensors_io, write_adapter
from loratools.archs.ldm import LdmLayout
from loratools.checkpoint import Checkpoint
from loratools.cli.main import main
from loratools.merging import describe
from loratools.errors import IncompatibleError, NonFiniteError, OutputExistsError, ShapeMismatchError

pytestmark = pytest.mark.filterwarnings("ignore:loratools._C is not built:RuntimeWarning")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2",
                "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RANK, ALPHA = 4, 6.0  # alpha != rank: the scale must come through


def _clip(cls=CLIPTextModel, seed=1, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
               max_position_embeddings=16, projection_dim=8, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return cls(CLIPTextConfig(**dict(cfg, **kw))).eval()


def _unet(arch, seed=0):
    torch.manual_seed(seed)
    if arch == "sdxl":  # SDXL's layout: no attention in the first block, text_time embedding
        return UNet2DConditionModel(
            sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 16), norm_num_groups=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=2, cross_attention_dim=32,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=8 + 6 * 4).eval()
    return UNet2DConditionModel(  # SD 1.x / 2.x layout (2.x: linear proj_in/out)
        sample_size=8, layers_per_block=1, block_out_channels=(8, 8, 16, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=2, cross_attention_dim=16, use_linear_projection=arch == "sd2").eval()


def _vae():
    torch.manual_seed(5)
    return AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, layers_per_block=1).eval()


class Case:
    """Base components of one architecture, a PEFT LoRA on them, and diffusers' fused result."""

    def __init__(self, arch, tmp):
        self.arch = arch
        self.components = {"unet": _unet(arch), "text_encoder": _clip()}
        if arch == "sdxl":
            self.components["text_encoder_2"] = _clip(CLIPTextModelWithProjection, seed=2)
        self.pipe_cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
        self.base_sd = {c: _cpu_sd(m) for c, m in self.components.items()}
        self.lora = {}  # component -> PEFT LoRA state dict (module names as the model has them)
        self.configs = {}
        for i, (comp, model) in enumerate(self.components.items()):
            targets = UNET_TARGETS if comp == "unet" else TE_TARGETS + (["text_projection"] if comp == "text_encoder_2" else [])
            cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
            torch.manual_seed(10 + i)
            m = copy.deepcopy(model)
            m.add_adapter(cfg)
            self.lora[comp] = {k: v.detach().clone() * 0.3 for k, v in get_peft_model_state_dict(m).items()}
            self.configs[comp] = cfg
        self.lora_dir = os.path.join(tmp, f"{arch}-diffusers-lora")
        kw = {f"{c}_lora_layers": sd for c, sd in self.lora.items()}
        kw.update({f"{c}_lora_adapter_metadata": self.configs[c].to_dict() for c in self.lora})
        self.pipe_cls.save_lora_weights(self.lora_dir, **kw)
        self.lora_file = os.path.join(self.lora_dir, "pytorch_lora_weights.safetensors")
        self.fused = self._fuse()

    def pipeline(self, components=None):
        comps = components or {c: copy.deepcopy(m) for c, m in self.components.items()}
        kw = dict(vae=_vae(), scheduler=PNDMScheduler(steps_offset=1, skip_prk_steps=True), tokenizer=None, **comps)
        if self.arch == "sdxl":
            kw["tokenizer_2"] = None
        else:
            kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        return self.pipe_cls(**kw)

    def _fuse(self):
        pipe = self.pipeline()
        pipe.load_lora_weights(self.lora_dir)
        pipe.fuse_lora(components=list(self.components))
        pipe.unload_lora_weights()
        return {c: _cpu_sd(getattr(pipe, c)) for c in self.components}

    def adapter(self) -> LoraAdapter:
        """The LoRA as a LoraAdapter with the agreed names (`unet.…`, `text_encoder.text_model.…`)."""
        a = LoraAdapter(format="diffusers")
        for comp, sd in self.lora.items():
            for key, down in sd.items():
                if not key.endswith(".lora_A.weight"):
                    continue
                mod = key[: -len(".lora_A.weight")]
                name = mod
                if comp != "unet" and not mod.startswith(("text_model.", "text_projection")):
                    name = "text_model." + mod
                a.add(LoraModule(f"{comp}.{name}", down, sd[mod + ".lora_B.weight"], alpha=ALPHA,
                                 kind="conv" if down.dim() == 4 else "linear"))
        return a

    def layout(self) -> LdmLayout:
        unet = self.components["unet"]
        tes = {"sd1": {"text_encoder": ("hf", "cond_stage_model.transformer.")},
               "sd2": {"text_encoder": ("openclip", "cond_stage_model.model.")},
               "sdxl": {"text_encoder": ("hf", "conditioner.embedders.0.transformer."),
                        "text_encoder_2": ("openclip", "conditioner.embedders.1.model.")}}[self.arch]
        return LdmLayout(self.arch, unet.config, tes)


def _cpu_sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _text_model(sd):
    """transformers 5 saves CLIPTextModel without `text_model.`; diffusers' converters add it."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}


def build_single_file(case: Case, path: str) -> None:
    """Write the base components under their LDM/SGM names by inverting our map (q/k/v fused)."""
    layout, out, fused = case.layout(), {}, {}
    for comp, sd in case.base_sd.items():
        for name, t in sd.items():
            slot = layout.slot(f"{comp}.{name}")
            if slot is None and name.endswith("position_ids"):
                continue
            assert slot is not None, f"{comp}.{name} has no LDM key"
            if slot.part is not None:
                fused.setdefault(slot.key, {})[slot.part] = t
            else:
                out[slot.key] = t.t().contiguous() if slot.transpose else t
    for key, parts in fused.items():
        out[key] = torch.cat([parts[0], parts[1], parts[2]])
    out["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)  # carried through untouched
    safetensors_io.save(path, out, {"format": "pt"})


def from_single_file(case: Case, sd) -> dict:
    """diffusers' own converters: single-file state dict -> per-component diffusers state dicts."""
    res = {"unet": sfu.convert_ldm_unet_checkpoint(sd, case.components["unet"].config)}
    if case.arch == "sd1":
        res["text_encoder"] = sfu.convert_ldm_clip_checkpoint(sd)
    elif case.arch == "sd2":
        res["text_encoder"] = sfu.convert_open_clip_checkpoint(case.components["text_encoder"], sd)
    else:
        res["text_encoder"] = sfu.convert_ldm_clip_checkpoint(sd)
        res["text_encoder_2"] = sfu.convert_open_clip_checkpoint(case.components["text_encoder_2"], sd,
                                                                 prefix="conditioner.embedders.1.model.")
    return res


def assert_same(got: dict, want: dict, atol=0.0, what=""):
    got = _text_model(got) if what.startswith("text") else got
    want = _text_model(want) if what.startswith("text") else want
    want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
    got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:10])
    for k in want:
        assert got[k].shape == want[k].shape, (what, k)
        torch.testing.assert_close(got[k].float(), want[k].float(), atol=atol, rtol=0, msg=f"{what} {k}")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("cases"))
    return {arch: Case(arch, tmp) for arch in ("sd1", "sd2", "sdxl")}


def _digest(path):
    h = hashlib.sha256()
    for root, _dirs, files in sorted(os.walk(path)):
        for f in sorted(files):
            with open(os.path.join(root, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_pipeline_folder_matches_diffusers_fuse_lora(cases, tmp_path, arch):
    case = cases[arch]
    folder = str(tmp_path / "pipe")
    case.pipeline().save_pretrained(folder)
    if arch == "sdxl":  # a sharded UNet (diffusion_pytorch_model.safetensors.index.json) keeps its shards
        shutil.rmtree(os.path.join(folder, "unet"))
        case.components["unet"].save_pretrained(os.path.join(folder, "unet"), max_shard_size="60KB")
    os.makedirs(os.path.join(folder, "tokenizer"))
    with open(os.path.join(folder, "tokenizer", "vocab.json"), "w") as f:
        f.write("{}")
    before = _digest(folder)
    # in memory with the agreed names, and diffusers' own file (save_lora_weights) through our reader
    for i, adapter in enumerate([case.adapter(), case.lora_file]):
        out = str(tmp_path / f"merged{i}")
        plan = merge(folder, [adapter], out)
        assert plan.num_modules == len(case.adapter())
        assert _digest(folder) == before  # the base is never changed
        for comp in case.components:
            ckpt = Checkpoint(os.path.join(out, comp))
            assert ckpt.shards == Checkpoint(os.path.join(folder, comp)).shards
            assert (len(ckpt.shards) > 1) == (arch == "sdxl" and comp == "unet")
            assert_same({n: ckpt.read(n) for n in ckpt.infos}, case.fused[comp], atol=1e-5, what=comp)
    # untouched components and the other files come through byte for byte
    for rel in ("model_index.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                "tokenizer/vocab.json", "unet/config.json"):
        with open(os.path.join(folder, rel), "rb") as a, open(os.path.join(out, rel), "rb") as b:
            assert a.read() == b.read(), rel
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_single_file_matches_diffusers_fuse_lora(cases, tmp_path, arch):
    case = cases[arch]
    base = str(tmp_path / "model.safetensors")
    build_single_file(case, base)
    base_sd, meta = safetensors_io.load(base)
    # our name map agrees with diffusers' converters: converting our file back gives every tensor
    for comp, sd in from_single_file(case, base_sd).items():
        assert_same(sd, case.base_sd[comp], what=comp)
    assert describe(base, [case.adapter()])[0].kind == f"single-file {arch} checkpoint"  # detected from the header
    out = str(tmp_path / "merged.safetensors")
    # diffusers' own LoRA file for SD 1.x (names without `text_model.`, as transformers 5 has them)
    plan = merge(base, [case.lora_file if arch == "sd1" else case.adapter()], out)
    assert plan.num_modules == len(case.adapter())
    merged, merged_meta = safetensors_io.load(out)
    assert merged_meta == meta and list(merged) == list(base_sd)
    assert torch.equal(merged["first_stage_model.decoder.conv_in.weight"], base_sd["first_stage_model.decoder.conv_in.weight"])
    for comp, sd in from_single_file(case, merged).items():
        assert_same(sd, case.fused[comp], atol=1e-5, what=comp)


def test_single_file_bf16_and_linear_adapter_on_conv_proj(cases, tmp_path):
    """A linear proj_in LoRA (SD 2.x diffusers layout) onto SD 1.x's 1×1 conv proj_in; bf16 base rounds once."""
    case = cases["sd1"]
    base = str(tmp_path / "model.safetensors")
    build_single_file(case, base)
    sd, _ = safetensors_io.load(base)
    safetensors_io.save(base, {k: v.to(torch.bfloat16) for k, v in sd.items()})
    name = "unet.down_blocks.0.attentions.0.proj_in"
    conv = case.adapter().modules[name]
    linear = LoraModule(name, conv.down.flatten(1), conv.up.flatten(1), alpha=ALPHA)
    out = str(tmp_path / "out.safetensors")
    merge(base, [LoraAdapter(modules={name: linear})], out)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    got = safetensors_io.load(out)[0][key]
    want = (sd[key].to(torch.bfloat16).float() + conv.dense_delta()).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_sd2_qkv_rows_of_fused_in_proj(cases, tmp_path):
    """Only the v rows of OpenCLIP's in_proj change when only v_proj has a LoRA."""
    case = cases["sd2"]
    base = str(tmp_path / "model.safetensors")
    build_single_file(case, base)
    name = "text_encoder.text_model.encoder.layers.1.self_attn.v_proj"
    m = case.adapter().modules[name]
    out = str(tmp_path / "out.safetensors")
    merge(base, [LoraAdapter(modules={name: m})], out, weights=[-0.5])
    key = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"
    a, b = safetensors_io.load(base)[0][key], safetensors_io.load(out)[0][key]
    assert torch.equal(a[:32], b[:32])
    torch.testing.assert_close(b[32:], a[32:] - 0.5 * m.dense_delta(), atol=1e-6, rtol=0)


def _errors(base, adapter, out):
    existed = os.path.exists(out)
    with pytest.raises(Exception) as e:
        merge(base, [adapter], out)
    assert os.path.exists(out) == existed and (not existed or not os.listdir(out))
    return e


@pytest.mark.parametrize("kind", ["pipeline", "single"])
def test_bad_adapters_fail_before_writing(cases, tmp_path, kind):
    case = cases["sd1"]
    if kind == "pipeline":
        base = str(tmp_path / "pipe")
        case.pipeline().save_pretrained(base)
    else:
        base = str(tmp_path / "model.safetensors")
        build_single_file(case, base)
    before = _digest(str(tmp_path))
    good = case.adapter().modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    out = str(tmp_path / "out")
    ghost = LoraModule("unet.down_blocks.0.attentions.7.proj_in", good.down, good.up)
    e = _errors(base, LoraAdapter(modules={ghost.name: ghost}), out)
    assert e.type is IncompatibleError and ghost.name in str(e.value)
    bare = LoraModule("down_blocks.0.attentions.0.proj_in", good.down, good.up)
    e = _errors(base, LoraAdapter(modules={bare.name: bare}), out)
    assert e.type is IncompatibleError and "component" in str(e.value) and bare.name in str(e.value)
    wrong = LoraModule(good.name, torch.randn(RANK, 5), good.up)
    e = _errors(base, LoraAdapter(modules={wrong.name: wrong}), out)
    assert e.type is ShapeMismatchError and good.name in str(e.value)
    inf = LoraModule(good.name, good.down, good.up.clone().fill_(float("inf")))
    e = _errors(base, LoraAdapter(modules={inf.name: inf}), out)  # fails mid-write: the temporary goes too
    assert e.type is NonFiniteError and not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    os.makedirs(out)
    e = _errors(base, LoraAdapter(modules={good.name: good}), os.path.join(out))
    assert e.type is OutputExistsError
    os.rmdir(out)
    assert _digest(str(tmp_path)) == before


def test_cli_pipeline_and_single_file(cases, tmp_path, capsys):
    case = cases["sd1"]
    adapter = str(tmp_path / "adapter")
    write_adapter(case.adapter(), adapter, format="peft")
    pipe = str(tmp_path / "pipe")
    case.pipeline().save_pretrained(pipe)
    single = str(tmp_path / "model.safetensors")
    build_single_file(case, single)
    assert main(["merge", pipe, adapter, "--dry-run", "-o", str(tmp_path / "x")]) == 0
    assert "diffusers pipeline" in capsys.readouterr().out and not os.path.exists(tmp_path / "x")
    assert main(["merge", pipe, adapter, "-o", str(tmp_path / "m1"), "-q"]) == 0
    got, _ = safetensors_io.load(str(tmp_path / "m1" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert_same(got, case.fused["unet"], atol=1e-5, what="unet")
    assert main(["merge", single, adapter, "-o", str(tmp_path / "m2.safetensors"), "-q"]) == 0
    merged, _ = safetensors_io.load(str(tmp_path / "m2.safetensors"))
    assert_same(from_single_file(case, merged)["text_encoder"], case.fused["text_encoder"], atol=1e-5, what="text")
    capsys.readouterr()
    assert main(["merge", single, adapter, "-o", str(tmp_path / "m2.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("loratools: error:") and "already exists" in err and len(err.strip().splitlines()) == 1


# The real SD 1.5 / 2.1 / SDXL UNet configs (public values), instantiated on the meta device.
REAL_UNETS = {
    "sd1": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True),
    "sdxl": dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
}
# keys that real checkpoints have and diffusers itself uses to recognise them (CHECKPOINT_KEY_NAMES)
KNOWN_KEYS = {"sd1": ["output_blocks.11.0.skip_connection.weight", "output_blocks.2.1.conv.weight"],
              "sd2": ["input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", "output_blocks.8.2.conv.weight"],
              "sdxl": ["output_blocks.2.2.conv.weight", "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight",
                       "label_emb.0.2.weight"]}


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_unet_map_at_real_size_agrees_with_diffusers(arch):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**REAL_UNETS[arch])
    names = list(unet.state_dict())
    layout = LdmLayout(arch, unet.config, {})
    ldm = {layout.slot("unet." + n).key: torch.tensor(i) for i, n in enumerate(names)}  # each carries its index
    assert len(ldm) == len(names)
    for k in KNOWN_KEYS[arch]:
        assert "model.diffusion_model." + k in ldm
    back = sfu.convert_ldm_unet_checkpoint(ldm, unet.config)
    assert {n: int(back[n]) for n in back} == {n: i for i, n in enumerate(names)}
    # and our reader of the single file's header finds the same layout
    found = LdmLayout.from_keys(list(ldm) + ["conditioner.embedders.1.model.ln_final.weight"] * (arch == "sdxl"))
    assert all(found.slot("unet." + n) == layout.slot("unet." + n) for n in names)
