"""LyCORIS LoHa / LoKr reading: ΔW built from the factors with plain torch (the formulas LyCORIS and
ComfyUI apply), factored by SVD; checked against the Eckart–Young optimum and a diffusers UNet forward."""
import os

import pytest
import safetensors.torch
import torch

import _formats_models as M
from loratools.cli.main import main
from loratools.errors import IncompatibleError
from loratools.formats import detect, read_adapter

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"       # linear [32, 32]
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"                                 # conv [32, 32, 3, 3]
# (a text-encoder LoRA of MLP layers only does not load in diffusers 0.42: it cannot infer its key type)
FC1 = "lora_te_text_model_encoder_layers_0_self_attn_out_proj"                   # linear [32, 32]


def _loha(g, out, inp, r):
    return {"hada_w1_a": torch.randn(out, r, generator=g), "hada_w1_b": torch.randn(r, inp, generator=g),
            "hada_w2_a": torch.randn(out, r, generator=g), "hada_w2_b": torch.randn(r, inp, generator=g)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lycoris")
    g = torch.Generator().manual_seed(5)
    sd = {}
    for name, p in {Q: _loha(g, 32, 32, 3), CONV: _loha(g, 32, 32 * 9, 2), FC1: _loha(g, 32, 32, 2)}.items():
        sd.update({f"{name}.{k}": v for k, v in p.items()})
        sd[f"{name}.alpha"] = torch.tensor(1.5)
    base = M.save_pipeline(str(d / "base"))
    loha = str(d / "loha.safetensors")
    safetensors.torch.save_file(sd, loha)
    lokr = str(d / "lokr.safetensors")
    safetensors.torch.save_file({f"{Q}.lokr_w1": torch.randn(4, 2, generator=g),
                                 f"{Q}.lokr_w2_a": torch.randn(8, 2, generator=g), f"{Q}.lokr_w2_b": torch.randn(2, 16, generator=g),
                                 f"{Q}.alpha": torch.tensor(1.0),
                                 f"{CONV}.lokr_w1": torch.randn(2, 4, generator=g),
                                 f"{CONV}.lokr_w2": torch.randn(16, 8, 3, 3, generator=g)}, lokr)
    return d, base, loha, lokr, sd


def _expected_loha(sd, name, shape):
    f = lambda k: sd[f"{name}.{k}"]  # noqa: E731
    delta = (f("hada_w1_a") @ f("hada_w1_b")) * (f("hada_w2_a") @ f("hada_w2_b")) * 1.5 / f("hada_w1_b").shape[0]
    return delta.reshape(shape)


def test_loha_is_rebuilt_exactly_at_its_numerical_rank(files):
    d, base, loha, lokr, sd = files
    assert detect(loha) == "lycoris"
    a = read_adapter(loha, base=base)
    shapes = {Q: (32, 32), CONV: (32, 32, 3, 3), FC1: (32, 32)}
    names = {Q: "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             CONV: "unet.down_blocks.0.resnets.0.conv1", FC1: "text_encoder.text_model.encoder.layers.0.self_attn.out_proj"}
    for k, name in names.items():
        m = a.modules[name]
        assert m.weight_shape == shapes[k] and m.rank <= 9  # a rank-r Hadamard product has rank <= r²
        torch.testing.assert_close(m.dense_delta(), _expected_loha(sd, k, shapes[k]), rtol=1e-4, atol=1e-4)
        assert a.config["retained"][name] == pytest.approx(1.0, abs=1e-6)


def test_rank_cap_is_the_best_approximation_and_reports_energy(files):
    d, base, loha, lokr, sd = files
    a = read_adapter(loha, base=base, rank=2)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    exact = _expected_loha(sd, Q, (32, 32))
    s = torch.linalg.svdvals(exact.double())
    err = torch.linalg.matrix_norm(a.modules[name].dense_delta().double() - exact.double())
    assert a.modules[name].rank == 2
    assert float(err) == pytest.approx(float(s[2:].norm()), rel=1e-4)  # Eckart–Young optimum
    assert a.config["retained"][name] == pytest.approx(float(s[:2].norm() / s.norm()), rel=1e-5)


def test_lokr_linear_and_conv(files):
    d, base, loha, lokr, sd = files
    t = safetensors.torch.load_file(lokr)
    a = read_adapter(lokr, base=base)
    q = a.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    want_q = torch.kron(t[f"{Q}.lokr_w1"], t[f"{Q}.lokr_w2_a"] @ t[f"{Q}.lokr_w2_b"]) * (1.0 / 2)
    torch.testing.assert_close(q.dense_delta(), want_q, rtol=1e-4, atol=1e-4)
    c = a.modules["unet.down_blocks.0.resnets.0.conv1"]
    want_c = torch.kron(t[f"{CONV}.lokr_w1"][:, :, None, None], t[f"{CONV}.lokr_w2"])  # no factored part: scale 1
    assert c.kind == "conv" and c.weight_shape == (32, 32, 3, 3)
    torch.testing.assert_close(c.dense_delta(), want_c, rtol=1e-4, atol=1e-4)


def test_converted_loha_gives_the_same_unet_output(files, tmp_path):
    d, base, loha, lokr, sd = files
    out = str(tmp_path / "lora.safetensors")
    assert main(["convert", loha, "--base", base, "--to", "diffusers", "-o", out, "--format", "json"]) == 0
    pipe = M.pipeline()
    pipe.load_lora_weights(out)
    unet = M.unet()
    with torch.no_grad():
        for k, name in {Q: "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                        CONV: "down_blocks.0.resnets.0.conv1"}.items():
            w = unet.get_submodule(name).weight
            w += _expected_loha(sd, k, w.shape)
    torch.testing.assert_close(M.unet_out(pipe.unet), M.unet_out(unet), rtol=1e-4, atol=1e-4)


def test_conv_loha_without_shape_needs_base_and_input_axis_dora_is_a_transform(files, tmp_path):
    d, base, loha, lokr, sd = files
    assert main(["convert", loha, "--to", "kohya", "-o", str(tmp_path / "x.safetensors")]) == 1  # tiny conv vs SD1 shape
    bad = dict(sd)
    bad[f"{Q}.dora_scale"] = torch.ones(1, 32)
    p = str(tmp_path / "dora.safetensors")
    safetensors.torch.save_file(bad, p)
    m = read_adapter(p, base=base).modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert m.op is not None and m.op.algo == "dora"  # LyCORIS wd_on_output=False: merged exactly, no PEFT form
    with pytest.raises(IncompatibleError, match="DoRA"):
        m.factors_2d()
    assert not os.path.exists(tmp_path / "x.safetensors")
