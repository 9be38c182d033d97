"""`loratools.blend` on tiny Llama models against PEFT's `add_weighted_adapter`, PEFT's loader,
transformers' logits and loratools' own weighted merge."""
from __future__ import annotations

import copy

import pytest
import torch

from _tiny import assert_close_rel, load_folder, peft_adapter, save_base, tiny_llama
from loratools import merge
from loratools.blending import blend

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import PeftModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

PREFIX = "base_model.model."
W = [0.7, -0.4]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Two adapters with different ranks, alphas, rsLoRA flags and target sets, plus a third of
    adapter a's rank for `linear`."""
    root = tmp_path_factory.mktemp("blend")
    model = tiny_llama()
    save_base(model, str(root / "base"))
    peft_adapter(model, str(root / "a"), seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_adapter(model, str(root / "b"), seed=2, r=6, lora_alpha=3, use_rslora=True,
                 target_modules=["q_proj", "k_proj", "v_proj"])
    peft_adapter(model, str(root / "c"), seed=3, r=4, lora_alpha=2, target_modules=["q_proj", "v_proj", "down_proj"])
    return model, root


def peft_weighted(model, root, names, weights, combination, **kw):
    """PEFT's add_weighted_adapter; returns {module name: delta weight of the new adapter}."""
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(root / names[0]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(root / n), adapter_name=n)
    pm.add_weighted_adapter(list(names), list(weights), "mix", combination_type=combination, **kw)
    return {name[len(PREFIX):]: mod.get_delta_weight("mix").detach()
            for name, mod in pm.named_modules() if isinstance(mod, LoraLayer) and "mix" in mod.lora_A}


def check_against_peft(ours, ref, rel):
    assert set(ours.modules) == set(ref)
    for name, delta in ref.items():
        assert_close_rel(ours.modules[name].dense_delta(), delta, rel, name)


def test_svd_matches_peft_add_weighted_adapter(llama):
    model, root = llama
    ours, report = blend([root / "a", root / "b"], W, method="svd", rank=3)
    check_against_peft(ours, peft_weighted(model, root, ["a", "b"], W, "svd", svd_rank=3), 1e-4)
    assert {m.rank_out for m in report.modules} == {3}


def test_cat_matches_peft_add_weighted_adapter(llama):
    model, root = llama
    ours, report = blend([root / "a", root / "b"], W, method="cat")
    check_against_peft(ours, peft_weighted(model, root, ["a", "b"], W, "cat"), 1e-6)
    ranks = {m.name.split(".")[-1]: m.rank_out for m in report.modules}
    assert ranks == {"q_proj": 10, "v_proj": 10, "k_proj": 6, "down_proj": 4}


def test_linear_matches_peft_add_weighted_adapter(llama):
    model, root = llama
    ours, _ = blend([root / "a", root / "c"], W, method="linear")
    check_against_peft(ours, peft_weighted(model, root, ["a", "c"], W, "linear"), 1e-6)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_element_wise_methods_match_peft_svd_variants(llama, method):
    # k_proj and v_proj are 16x32: rank 16 keeps the element-wise result whole, so it is compared exactly
    model, root = llama
    ours, _ = blend([root / "a", root / "b"], W, method=method, density=0.4, rank=16, svd="exact")
    ref = peft_weighted(model, root, ["a", "b"], W, method + "_svd", density=0.4, svd_rank=16)
    for name, delta in ref.items():
        if name.endswith(("k_proj", "v_proj")):
            assert_close_rel(ours.modules[name].dense_delta(), delta, 1e-5, name)


def test_merging_the_blend_equals_the_weighted_merge(llama, tmp_path):
    """loratools merge of the blend == loratools merge of the inputs with their weights, within the
    error the blend reported; and PEFT loads the blend (with its rank_pattern) to the same logits."""
    model, root = llama
    merge(root / "base", [root / "a", root / "b"], tmp_path / "ref", weights=W)
    ref = load_folder(tmp_path / "ref")
    for method, rank in (("cat", None), ("svd", 3)):
        out = tmp_path / method
        _, report = blend([root / "a", root / "b"], W, method=method, rank=rank, output=out / "adapter")
        merge(root / "base", [out / "adapter"], out / "merged")
        got = load_folder(out / "merged")
        errors = {m.name + ".weight": m.error for m in report.modules}
        for k, v in ref.items():
            diff = float((got[k].double() - v.double()).norm())
            assert diff <= errors.get(k, 0.0) * (1 + 1e-3) + 1e-6 * float(v.double().norm()), k
        if method == "svd":
            assert report.totals()["rel_error"] > 1e-3  # a truncating blend, so the bound above was tested
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    merged_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ref").eval()
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "cat" / "adapter")).eval()
    with torch.no_grad():
        assert_close_rel(loaded(ids).logits, merged_model(ids).logits, 1e-5, "logits")
