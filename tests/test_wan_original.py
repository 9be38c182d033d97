"""Wan 2.x LoRAs under Wan's original names (ComfyUI `diffusion_model.blocks.0.self_attn.q`, both `lora_down` and
`lora_A` spellings) and musubi-tuner's kohya names (`lora_unet_blocks_0_self_attn_q`): read exactly as diffusers'
`WanPipeline.lora_state_dict` converts them (its alpha folding redone on our factors), written back bit for bit,
and merged into a tiny Wan pipeline folder as `load_lora_weights` + `fuse_lora` does."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from safetensors.torch import load_file, save_file

from loratools import merge
from loratools.archs import load_manifest, wan
from loratools.archs.family import WAN, adapter_family
from loratools.errors import IncompatibleError
from loratools.formats import detect, read_adapter, write_adapter
from loratools.loaders import compatibility
from tests._pipes import merge_matches_fuse_lora
from tests._tiny import run_cli, ulp

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
T2V = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
           text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
I2V = dict(T2V, image_dim=8, added_kv_proj_dim=16)  # Wan2.1-I2V-14B: img_emb, cross_attn.k_img / v_img


def _shapes(config):
    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    return {n[: -len(".weight")]: tuple(p.shape) for n, p in model.named_parameters()
            if n.endswith(".weight") and p.dim() == 2}


def _alpha_scales(alpha, rank):
    """diffusers' own split of alpha/rank between A and B (`get_alpha_scales`), redone on our factors."""
    down, up = alpha / rank, 1.0
    while down * 2 < up:
        down, up = down * 2, up / 2
    return down, up


def _original_file(path, config, spelling=("lora_down", "lora_up"), blocks_only=False, seed=0):
    """A ComfyUI-style Wan LoRA on every linear module: blocks' modules carry alphas (one below rank/2, which
    diffusers splits between A and B), the embedders and head none (diffusers 0.42 takes no alpha there)."""
    torch.manual_seed(seed)
    sd, rank = {}, 4
    for i, (name, (out, inp)) in enumerate(sorted(_shapes(config).items())):
        orig = wan.to_original(name)
        if orig is None or (blocks_only and not wan.is_block_module(orig)):
            continue
        key = f"diffusion_model.{orig}"
        sd[f"{key}.{spelling[0]}.weight"] = torch.randn(rank, inp)
        sd[f"{key}.{spelling[1]}.weight"] = torch.randn(out, rank)
        if wan.is_block_module(orig):
            sd[f"{key}.alpha"] = torch.tensor((1.0, 8.0, 4.0, 3.0)[i % 4])
    save_file(sd, str(path))
    return sd


def _assert_equals_diffusers(adapter, want):
    assert len(want) == 2 * len(adapter)
    for m in adapter:
        down, up = _alpha_scales(m.alpha_value, m.rank) if m.alpha is not None else (1.0, 1.0)
        assert torch.equal(m.down * down, want[f"{m.name}.lora_A.weight"]), m.name
        assert torch.equal(m.up * up, want[f"{m.name}.lora_B.weight"]), m.name


def test_every_wan_module_has_an_original_name():
    for config in (T2V, I2V):
        for name in _shapes(config):
            assert wan.to_diffusers(wan.to_original(name)) == name
            assert wan.unflatten(wan.to_original(name).replace(".", "_")) == wan.to_original(name)
    for arch in ("wan", "wan-1.3b"):  # 14B (and Wan 2.2 A14B experts) and 1.3B
        names = load_manifest(arch)["components"]["transformer"]
        assert [n for n in names if wan.to_original(n) is None] == ["patch_embedding"]  # a Conv3d: no LoRA maps it


@pytest.mark.parametrize("spelling", [("lora_down", "lora_up"), ("lora_A", "lora_B")])
@pytest.mark.parametrize("config", [T2V, I2V], ids=["t2v", "i2v"])
def test_original_names_read_as_diffusers_reads_them_and_written_back_bit_exact(tmp_path, config, spelling):
    path = tmp_path / "wan_comfy.safetensors"
    sd = _original_file(path, config, spelling)
    assert detect(str(path)) == "comfyui"
    adapter = read_adapter(str(path))
    assert adapter_family(adapter)[0] == WAN
    _assert_equals_diffusers(adapter, WanPipeline.lora_state_dict(str(path)))
    out = write_adapter(adapter, tmp_path / "again.safetensors", format="comfyui")
    got = load_file(str(out))
    spelled = {k.replace(".lora_down.", f".{spelling[0]}.").replace(".lora_up.", f".{spelling[1]}."): v
               for k, v in got.items()}
    assert set(spelled) == set(sd) and all(torch.equal(spelled[k], sd[k]) and spelled[k].dtype == sd[k].dtype
                                           for k in sd)


def test_musubi_names_read_as_diffusers_reads_them_and_round_trip(tmp_path):
    comfy = tmp_path / "wan_comfy.safetensors"
    _original_file(comfy, I2V, blocks_only=True)  # musubi-tuner trains the blocks' linears only
    musubi = write_adapter(read_adapter(str(comfy)), tmp_path / "musubi.safetensors", format="kohya")
    keys = load_file(str(musubi))
    assert "lora_unet_blocks_1_cross_attn_k_img.lora_down.weight" in keys and detect(str(musubi)) == "kohya"
    assert all(k.startswith("lora_unet_blocks_") for k in keys)
    adapter = read_adapter(str(musubi))
    assert adapter_family(adapter)[0] == WAN
    _assert_equals_diffusers(adapter, WanPipeline.lora_state_dict(str(musubi)))
    again = load_file(str(write_adapter(adapter, tmp_path / "again.safetensors", format="kohya")))
    assert set(again) == set(keys) and all(torch.equal(again[k], keys[k]) for k in keys)
    back = read_adapter(str(write_adapter(adapter, tmp_path / "comfy.safetensors", format="comfyui")))
    first = read_adapter(str(comfy))  # the same factors and scales (an alpha of 1·rank may be left out)
    assert list(back.modules) == list(first.modules) and all(
        torch.equal(m.down, first.modules[n].down) and torch.equal(m.up, first.modules[n].up)
        and m.scale == first.modules[n].scale for n, m in back.modules.items())


def test_diffusers_wan_lora_written_in_original_names_loads_in_diffusers(tmp_path):
    comfy = tmp_path / "wan_comfy.safetensors"
    _original_file(comfy, I2V)
    want = WanPipeline.lora_state_dict(str(comfy))
    diff = write_adapter(read_adapter(str(comfy)), tmp_path / "diff.safetensors", format="diffusers")
    adapter = read_adapter(str(diff))  # diffusers names, alphas kept in its metadata
    out = write_adapter(adapter, tmp_path / "out.safetensors", format="comfyui")
    got = WanPipeline.lora_state_dict(str(out))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_merge_original_names_into_wan_pipeline_matches_fuse_lora(tmp_path):
    torch.manual_seed(3)
    transformer = WanTransformer3DModel(**I2V)
    lora = tmp_path / "wan_comfy.safetensors"
    _original_file(lora, I2V, seed=4)
    changed = merge_matches_fuse_lora(tmp_path, WanPipeline, transformer, lora)
    assert changed == len(_shapes(I2V))  # every linear (patch_embedding is a Conv3d)


def test_inspect_and_refusals(tmp_path, capsys):
    comfy = tmp_path / "wan_comfy.safetensors"
    sd = _original_file(comfy, T2V)
    code, out, err = run_cli(capsys, "inspect", str(comfy), "--format", "json")
    rep = json.loads(out)
    assert code == 0 and rep["family"]["name"] == WAN and rep["unresolved"] == []
    sd["diffusion_model.blocks.0.self_attn.o.diff_b"] = torch.zeros(16)  # lightx2v-style bias deltas
    bad = tmp_path / "diff_b.safetensors"
    save_file(sd, str(bad))
    code, out, err = run_cli(capsys, "convert", str(bad), "--to", "diffusers", "-o", str(tmp_path / "x.safetensors"))
    assert code == 1 and "diff_b" in err and "Traceback" not in err and not (tmp_path / "x.safetensors").exists()


def test_loads_in_says_what_diffusers_does(tmp_path):
    """inspect's "loads in" verdict for diffusers, checked against `WanPipeline.lora_state_dict` itself."""
    comfy = tmp_path / "wan_comfy.safetensors"
    sd = _original_file(comfy, I2V)
    head_alpha = tmp_path / "head_alpha.safetensors"
    save_file({**sd, "diffusion_model.head.head.alpha": torch.tensor(2.0)}, str(head_alpha))
    blocks = tmp_path / "blocks.safetensors"
    _original_file(blocks, I2V, blocks_only=True)
    files = {"comfy": comfy, "head_alpha": head_alpha,
             "musubi_all": write_adapter(read_adapter(str(comfy)), tmp_path / "k1.safetensors", format="kohya"),
             "musubi_blocks": write_adapter(read_adapter(str(blocks)), tmp_path / "k2.safetensors", format="kohya")}
    verdicts = {}
    for name, path in files.items():
        loads = compatibility(read_adapter(str(path)))
        assert not loads["A1111/Forge"]["ok"]
        verdicts[name] = loads["diffusers"]["ok"]
        if verdicts[name]:
            WanPipeline.lora_state_dict(str(path))
        else:
            with pytest.raises((ValueError, KeyError, IndexError)):  # what each converter raises
                WanPipeline.lora_state_dict(str(path))
    assert verdicts == {"comfy": True, "head_alpha": False, "musubi_all": False, "musubi_blocks": True}


def test_cli_converts_between_the_wan_layouts(tmp_path, capsys):
    comfy = tmp_path / "wan_comfy.safetensors"
    sd = _original_file(comfy, T2V, spelling=("lora_A", "lora_B"))
    outs = {}
    for fmt in ("kohya", "diffusers", "comfyui"):
        outs[fmt] = tmp_path / f"out_{fmt}.safetensors"
        source = outs["diffusers"] if fmt == "comfyui" else comfy  # back from diffusers names
        code, out, err = run_cli(capsys, "convert", str(source), "--to", fmt, "-o", str(outs[fmt]))
        assert code == 0, err
    back = load_file(str(outs["comfyui"]))
    spelled = {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in back.items()}
    assert {k for k in sd if not k.endswith(".alpha")} <= set(spelled)
    assert all(torch.equal(spelled[k], v) for k, v in sd.items() if not k.endswith(".alpha"))
    first, last = read_adapter(str(comfy)), read_adapter(str(outs["comfyui"]))
    assert all(m.scale == first.modules[n].scale for n, m in last.modules.items()) and len(last) == len(first)


def _wan_file(path, dtype, prefix="", config=T2V):
    """A tiny Wan transformer saved under Wan's original names (linears renamed; other tensors as they are)."""
    torch.manual_seed(7)
    sd = {}
    for k, v in WanTransformer3DModel(**config).state_dict().items():
        module, _, param = k.rpartition(".")
        orig = wan.to_original(module)
        sd[prefix + (f"{orig}.{param}" if orig else k)] = v.detach().to(dtype)
    save_file(sd, str(path))
    return sd


@pytest.mark.parametrize("dtype, config", [(torch.bfloat16, I2V), (torch.float8_e4m3fn, T2V)])
def test_merge_into_single_file_wan_checkpoint(tmp_path, dtype, config):
    base = tmp_path / "wan.safetensors"
    prefix = "model.diffusion_model." if dtype == torch.bfloat16 else ""
    sd = _wan_file(base, dtype, prefix, config)
    lora = tmp_path / "wan_comfy.safetensors"
    _original_file(lora, config, seed=8)
    out = tmp_path / "merged.safetensors"
    merge(str(base), [str(lora)], str(out))
    got = load_file(str(out))
    assert set(got) == set(sd)
    adapter = read_adapter(str(lora))
    for m in adapter:
        key = f"{prefix}{wan.original_name(m.name)}.weight"
        delta = m.dense_delta(torch.float64)
        exact = sd[key].double() + delta
        # fp32 accumulation, then one rounding into the file's dtype: within one unit of the exact sum
        bound = ulp(exact.float(), dtype).double() + 1e-6 * (sd[key].double().abs() + delta.abs())
        assert got[key].dtype == dtype and ((got[key].double() - exact).abs() <= bound).all(), key
    targets = {f"{prefix}{wan.original_name(m.name)}.weight" for m in adapter}
    assert all(torch.equal(got[k].float(), sd[k].float()) for k in set(sd) - targets)  # biases, norms, patches
    scaled = tmp_path / "scaled.safetensors"
    save_file({**sd, f"{prefix}blocks.0.self_attn.q.scale_weight": torch.ones(1)}, str(scaled))
    with pytest.raises(IncompatibleError, match="scaled-fp8"):
        merge(str(scaled), [str(lora)], str(tmp_path / "never.safetensors"))


def test_a_lora_on_wan_embedders_only_is_still_wan(tmp_path):
    sd = {}
    for name, (out, inp) in {"time_projection.1": (96, 16), "head.head": (16, 16)}.items():
        sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(2, inp)
        sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out, 2)
    path = tmp_path / "embedders.safetensors"
    save_file(sd, str(path))
    adapter = read_adapter(str(path))
    assert adapter_family(adapter)[0] == WAN  # transformer.condition_embedder.time_proj
    back = load_file(str(write_adapter(adapter, tmp_path / "again.safetensors", format="comfyui")))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)  # not Flux's final_layer
