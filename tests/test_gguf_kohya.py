"""A kohya-named LLM LoRA (`lora_unet_model_layers_0_self_attn_q_proj`, `lora_te_…`) converted with a Hugging
Face model folder or its config.json as --base: resolved against the model's own module names, it gives the
same GGUF and PEFT adapters as the PEFT adapter it was made from, and merges as PEFT's merge_and_unload does."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from _gguf import gguf, small_llama
from _tiny import load_folder, peft_adapter, run_cli, save_base

pytest.importorskip("peft")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALPHAS = {"k_proj": 3.0, "up_proj": 20.0}  # per-module alphas (kohya stores one per module); the rest 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_kohya")
    model = small_llama()
    save_base(model, str(root / "base"))
    pm = peft_adapter(model, str(root / "lora"), r=4, lora_alpha=8, target_modules=ALL,
                      rank_pattern={"down_proj": 6}, alpha_pattern=ALPHAS)
    return root, model, pm


def kohya_from_peft(peft_dir, path, prefix):
    """The PEFT adapter's tensors under kohya names, with each module's alpha."""
    out = {}
    for key, t in load_file(str(peft_dir / "adapter_model.safetensors")).items():
        module, part = key[len("base_model.model."):].rsplit(".lora_", 1)
        name = prefix + module.replace(".", "_")
        out[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = t
        alpha = next((a for short, a in ALPHAS.items() if module.endswith(short)), 8.0)
        out[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(out, str(path))
    return path


def gguf_tensors(path):
    reader = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("adapter.", "general.", "llama."))}
    return kv, {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}


@pytest.mark.parametrize("prefix", ["lora_unet_", "lora_te_"])
@pytest.mark.parametrize("base_of", ["folder", "config"])
def test_kohya_llm_converts_like_its_peft_adapter(setup, tmp_path, capsys, prefix, base_of):
    root, model, pm = setup
    base = root / "base" if base_of == "folder" else root / "base" / "config.json"
    kohya = kohya_from_peft(root / "lora", tmp_path / "llm_kohya.safetensors", prefix)
    for src, out in ((kohya, tmp_path / "k.gguf"), (root / "lora", tmp_path / "p.gguf")):
        code, _, err = run_cli(capsys, "convert", src, "--to", "gguf", "--base", base, "-o", out)
        assert code == 0, err
    kv_k, t_k = gguf_tensors(tmp_path / "k.gguf")
    kv_p, t_p = gguf_tensors(tmp_path / "p.gguf")
    assert kv_k == kv_p and set(t_k) == set(t_p) and len(t_k) == 2 * 7 * 2
    for name, t in t_p.items():
        assert torch.equal(t_k[name], t), name
    code, _, err = run_cli(capsys, "convert", kohya, "--to", "peft", "--base", base, "-o", tmp_path / "peft")
    assert code == 0, err
    ours = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    theirs = load_file(str(root / "lora" / "adapter_model.safetensors"))
    assert set(ours) == set(theirs)
    for key, t in theirs.items():
        assert torch.equal(ours[key], t), key
    from peft import PeftModel

    merged = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).merge_and_unload()
    expected = copy.deepcopy(pm).merge_and_unload().state_dict()
    for name, t in merged.state_dict().items():
        torch.testing.assert_close(t, expected[name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("prefix", ["lora_unet_", "lora_te_"])
def test_kohya_llm_merges_into_model_folder_like_peft(setup, tmp_path, capsys, prefix):
    root, model, pm = setup
    kohya = kohya_from_peft(root / "lora", tmp_path / "llm_kohya.safetensors", prefix)
    code, _, err = run_cli(capsys, "merge", root / "base", kohya, "-o", tmp_path / "merged")
    assert code == 0, err
    got = load_folder(str(tmp_path / "merged"))
    expected = copy.deepcopy(pm).merge_and_unload().state_dict()
    base = model.state_dict()
    assert sum(not torch.equal(expected[n], base[n]) for n in base) == 2 * 7
    for name, t in expected.items():
        torch.testing.assert_close(got[name], t, atol=1e-6, rtol=1e-5, msg=name)


def test_kohya_llm_names_not_in_the_model(setup, tmp_path, capsys):
    root, _, _ = setup
    bad = {"lora_unet_model_layers_7_self_attn_q_proj.lora_down.weight": torch.zeros(4, 64),
           "lora_unet_model_layers_7_self_attn_q_proj.lora_up.weight": torch.zeros(64, 4)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    out = tmp_path / "bad.gguf"
    code, _, err = run_cli(capsys, "convert", tmp_path / "bad.safetensors", "--to", "gguf", "--base", root / "base",
                           "-o", out)
    assert code == 1 and "model_layers_7_self_attn_q_proj" in err and "Traceback" not in err
    assert not out.exists()
