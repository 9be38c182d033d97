"""Random bytes and random headers into the format detector and the readers: every outcome is an
adapter or a `LoraToolsError`, never another exception, and nothing is allocated from a header's
claims before they are checked (a claimed 2^60-byte tensor would fail the run with MemoryError)."""
from __future__ import annotations

import json
import os
import struct
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratools import safetensors_io
from loratools.errors import LoraToolsError
from loratools.formats import FORMATS, detect, read_adapter

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
SMALL = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
DTYPE_NAMES = sorted(safetensors_io.DTYPES) + ["F7", "", "f32", "I128"]
KEYS = ["base_model.model.m.lora_A.weight", "base_model.model.m.lora_B.weight", "m.lora_A.weight",
        "unet.a.to_q.lora_A.weight", "unet.a.to_q.lora_B.weight", "lora_unet_x.lora_down.weight",
        "lora_unet_x.lora_up.weight", "lora_unet_x.alpha", "x.hada_w1_a", "x.lokr_w1", "__metadata__", "w"]

dims = st.integers(min_value=-2, max_value=6) | st.sampled_from([2**31, 2**62, 2**64])
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPE_NAMES),
    "shape": st.lists(dims, max_size=5) | st.none() | st.text(max_size=3),
    "data_offsets": st.lists(st.integers(min_value=-4, max_value=300) | st.sampled_from([2**63, 2**70]),
                             min_size=0, max_size=3),
})
headers = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), entries, max_size=5)


def _check(path: str) -> None:
    try:
        fmt = detect(path)
    except LoraToolsError:
        return
    try:
        read_adapter(path, format=fmt)
    except LoraToolsError:
        pass


def _tmpdir():
    return tempfile.TemporaryDirectory(prefix="loratools-fuzz-")


@SETTINGS
@given(data=st.binary(max_size=512), name=st.sampled_from(["a.safetensors", "a.bin", "a.pt", "a"]))
def test_random_bytes(data, name):
    with _tmpdir() as d:
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            f.write(data)
        _check(path)
        for fmt in FORMATS:  # forcing a format must fail just as cleanly
            try:
                read_adapter(path, format=fmt)
            except LoraToolsError:
                pass


@SETTINGS
@given(header=headers, data_len=st.integers(min_value=0, max_value=256), pad=st.integers(0, 3),
       length_delta=st.sampled_from([0, 0, 0, -1, 1, 8, 2**40]))
def test_random_headers(header, data_len, pad, length_delta):
    raw = json.dumps(header).encode() + b" " * pad
    blob = struct.pack("<Q", max(len(raw) + length_delta, 0)) + raw + bytes(range(256))[:data_len]
    with _tmpdir() as d:
        path = os.path.join(d, "adapter.safetensors")
        with open(path, "wb") as f:
            f.write(blob)
        try:
            with safetensors_io.SafetensorsFile(path) as sf:
                for name in sf.keys():  # whatever the header promised must read back or fail cleanly
                    t = sf.read(name)
                    assert t.dtype == sf.tensors[name].dtype and tuple(t.shape) == sf.tensors[name].shape
        except LoraToolsError:
            pass
        _check(path)
        # the same weights inside a PEFT folder
        folder = os.path.join(d, "peft")
        os.makedirs(folder)
        os.replace(path, os.path.join(folder, "adapter_model.safetensors"))
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 4}, f)
        _check(folder)


configs = st.dictionaries(
    st.sampled_from(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out",
                     "peft_type", "base_model_name_or_path", "use_dora", "target_modules"]),
    st.recursive(st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats() | st.text(max_size=4),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                 max_leaves=6),
    max_size=6)


@SMALL
@given(config=configs | st.lists(st.integers(), max_size=2) | st.text(max_size=5))
def test_random_peft_configs(config):
    with _tmpdir() as d:
        torch.manual_seed(0)
        safetensors_io.save(os.path.join(d, "adapter_model.safetensors"),
                            {"base_model.model.m.lora_A.weight": torch.randn(2, 4),
                             "base_model.model.m.lora_B.weight": torch.randn(3, 2)})
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            f.write(json.dumps(config))
        _check(d)


@SMALL
@given(meta=st.dictionaries(st.sampled_from(["lora_adapter_metadata", "ss_network_dim", "format"]),
                            st.text(max_size=40) | configs.map(lambda c: json.dumps({f"unet.{k}": v for k, v in c.items()})),
                            max_size=3))
def test_random_diffusers_metadata(meta):
    with _tmpdir() as d:
        path = os.path.join(d, "pytorch_lora_weights.safetensors")
        safetensors_io.save(path, {"unet.a.to_q.lora_A.weight": torch.ones(2, 4),
                                   "unet.a.to_q.lora_B.weight": torch.ones(3, 2)}, meta)
        _check(path)
