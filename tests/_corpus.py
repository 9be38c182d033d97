"""The malformed inputs of the corpus (tests/test_malformed.py), built at test time, and helpers
shared with tests/test_interrupt.py: a content hash of an input tree and an unprivileged block."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import stat
import struct

import torch

from loratools import safetensors_io

PREFIX = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"


# ---------------------------------------------------------------- raw builders

def st_raw(header, data: bytes = b"", header_len=None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def write_peft(folder, tensors=None, config=None, weights: bytes = None):
    os.makedirs(folder)
    if config is not None:
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            f.write(config if isinstance(config, str) else json.dumps(config))
    path = os.path.join(folder, "adapter_model.safetensors")
    if weights is not None:
        with open(path, "wb") as f:
            f.write(weights)
    elif tensors is not None:
        safetensors_io.save(path, tensors, {"format": "pt"})
    return folder


class Good:
    """The clean adapter's tensors and config, to mutate one thing at a time."""

    def __init__(self, folder):
        self.tensors, _ = safetensors_io.load(os.path.join(folder, "adapter_model.safetensors"))
        with open(os.path.join(folder, "adapter_config.json")) as f:
            self.config = json.load(f)
        with open(os.path.join(folder, "adapter_model.safetensors"), "rb") as f:
            self.bytes = f.read()

    def with_(self, **changes):
        t = {k: v.clone() for k, v in self.tensors.items()}
        for k, v in changes.items():
            key = PREFIX + Q + "." + k.replace("__", ".")
            if v is None:
                t.pop(key)
            else:
                t[key] = v
        return t

    def cfg(self, **changes):
        return dict(self.config, **changes)


def adapter_cases():
    """name -> (level, builder(path, good) -> input path)."""
    A, B = "lora_A__weight", "lora_B__weight"
    r32 = lambda *s: torch.randn(*s) * 0.01  # noqa: E731
    nan_a = lambda g: g.with_(**{A: g.tensors[PREFIX + Q + ".lora_A.weight"].clone().index_fill_(1, torch.tensor([3]), float("nan"))})  # noqa: E731,E501

    def inf_b(g):
        b = g.tensors[PREFIX + Q + ".lora_B.weight"].clone()
        b[0, 0] = float("inf")
        return g.with_(**{B: b})

    def st(header, data=b"", header_len=None):
        return lambda d, g: write_peft(d, config=g.config, weights=st_raw(header, data, header_len))

    def peft(tensors=None, config=None):
        return lambda d, g: write_peft(d, tensors=tensors(g) if tensors else g.tensors,
                                       config=config(g) if config else g.config)

    def bin_file(data: bytes):
        def build(d, g):
            write_peft(d, config=g.config)
            with open(os.path.join(d, "adapter_model.bin"), "wb") as f:
                f.write(data)
            return d
        return build

    def special(fn):
        def build(d, g):
            fn(d, g)
            return d
        return build

    ok = entry("F32", [2], 0, 8)
    cases = {
        # -- the safetensors container
        "st_zero_bytes": ("unreadable", lambda d, g: write_peft(d, config=g.config, weights=b"")),
        "st_shorter_than_length": ("unreadable", lambda d, g: write_peft(d, config=g.config, weights=g.bytes[:5])),
        "st_truncated_data": ("unreadable", lambda d, g: write_peft(d, config=g.config, weights=g.bytes[:-10])),
        "st_header_length_beyond_file": ("unreadable", st({"a": ok}, b"\0" * 8, header_len=10_000)),
        "st_header_length_2_63": ("unreadable", st({"a": ok}, b"\0" * 8, header_len=2**63)),
        "st_header_not_json": ("unreadable", st(b"{not json", b"")),
        "st_header_not_utf8": ("unreadable", st(b'{"\xff\xfe": 1}', b"")),
        "st_header_a_list": ("unreadable", st(b"[1, 2]", b"")),
        "st_header_deep_nesting": ("unreadable", st(b"[" * 200_000, b"")),
        "st_header_5000_digit_int": ("unreadable", st(b'{"a": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b'], '
                                                     b'"data_offsets": [0, 4]}}', b"\0" * 4)),
        "st_overlapping_offsets": ("unreadable", st({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)},
                                                    b"\0" * 12)),
        "st_offsets_outside_file": ("unreadable", st({"a": entry("F32", [4], 0, 16)}, b"\0" * 8)),
        "st_negative_offset": ("unreadable", st({"a": entry("F32", [2], -8, 0)}, b"\0" * 8)),
        "st_unknown_dtype": ("unreadable", st({"a": entry("F7", [2], 0, 8)}, b"\0" * 8)),
        "st_bytes_do_not_match_shape": ("unreadable", st({"a": entry("F32", [3], 0, 8)}, b"\0" * 8)),
        "st_negative_dimension": ("unreadable", st({"a": entry("F32", [-2], 0, 8)}, b"\0" * 8)),
        "st_metadata_not_strings": ("unreadable", st({"__metadata__": {"a": 1}, "a": ok}, b"\0" * 8)),
        "st_entry_not_object": ("unreadable", st({"a": 5}, b"")),
        "st_dim_2_63_with_a_zero_dim": ("unreadable", st({"a": entry("F32", [2**63, 0], 0, 0), "b": ok}, b"\0" * 8)),
        "st_dims_overflow_int64": ("unreadable", st({"a": entry("F32", [0, 2**40, 2**40], 0, 0), "b": ok}, b"\0" * 8)),
        # -- the factors
        "rank_mismatch": ("unreadable", peft(lambda g: g.with_(**{B: r32(32, 3)}))),
        "factors_1d": ("unreadable", peft(lambda g: g.with_(**{A: r32(128), B: r32(32)}))),
        "factors_5d": ("unreadable", peft(lambda g: g.with_(**{A: r32(4, 32, 1, 1, 1), B: r32(32, 4, 1, 1, 1)}))),
        "conv_up_not_1x1": ("unreadable", peft(lambda g: g.with_(**{A: r32(4, 32, 1, 1), B: r32(32, 4, 3, 3)}))),
        "lora_A_without_B": ("unreadable", peft(lambda g: g.with_(**{B: None}))),
        "unknown_lora_key": ("unreadable", peft(lambda g: g.with_(**{"lora_C__weight": r32(4, 4)}))),
        "lora_bias_key": ("unreadable", peft(lambda g: g.with_(**{"lora_B__bias": r32(32)}))),
        "nan_in_A": ("invalid", peft(nan_a)),
        "inf_in_B": ("invalid", peft(inf_b)),
        "integer_factors": ("invalid", peft(lambda g: g.with_(**{A: torch.ones(4, 32, dtype=torch.int32),
                                                                 B: torch.ones(32, 4, dtype=torch.int32)}))),
        "dora_magnitude_wrong_length": ("invalid", peft(lambda g: g.with_(lora_magnitude_vector=torch.ones(7)))),
        "nan_in_extra_tensor": ("invalid", peft(lambda g: dict(g.tensors, **{
            PREFIX + "model.norm.weight": torch.full((32,), float("nan"))}))),
        "no_tensors": ("invalid", st({"__metadata__": {"format": "pt"}}, b"")),
        # -- the config
        "config_rank_disagrees": ("unreadable", peft(config=lambda g: g.cfg(r=8))),
        "config_not_json": ("unreadable", peft(config=lambda g: "{'r': 4,")),
        "config_a_list": ("unreadable", peft(config=lambda g: [g.config])),
        "config_r_a_string": ("unreadable", peft(config=lambda g: g.cfg(r="four"))),
        "config_alpha_nan": ("unreadable", peft(config=lambda g: json.dumps(g.cfg(lora_alpha=float("nan"))))),
        "config_bad_pattern_regex": ("unreadable", peft(config=lambda g: g.cfg(rank_pattern={"(": 2}))),
        "config_pattern_a_list": ("unreadable", peft(config=lambda g: g.cfg(alpha_pattern=["q_proj"]))),
        "config_not_lora": ("unreadable", peft(config=lambda g: g.cfg(peft_type="PREFIX_TUNING"))),
        "config_alpha_10e400": ("unreadable", peft(config=lambda g: g.cfg(lora_alpha=10**400))),
        "config_rank_pattern_10e400": ("unreadable", peft(config=lambda g: g.cfg(rank_pattern={"q_proj": 10**400}))),
        "config_alpha_pattern_10e400": ("unreadable", peft(config=lambda g: g.cfg(alpha_pattern={"q_proj": 10**400}))),
        "config_target_modules_bad_regex": ("unreadable", peft(config=lambda g: g.cfg(target_modules="("))),
        "missing_config": ("unreadable", lambda d, g: write_peft(d, tensors=g.tensors)),
        "missing_weights": ("unreadable", lambda d, g: write_peft(d, config=g.config)),
        "weights_a_directory": ("unreadable", special(lambda d, g: (write_peft(d, config=g.config),
                                                                    os.makedirs(os.path.join(d, "adapter_model.safetensors"))))),
        "config_a_directory": ("unreadable", special(lambda d, g: (write_peft(d, tensors=g.tensors),
                                                                   os.makedirs(os.path.join(d, "adapter_config.json"))))),
        "bin_not_a_pickle": ("unreadable", bin_file(os.urandom(256))),
        "bin_malicious_pickle": ("unreadable", lambda d, g: bin_file(_evil_pickle(d))(d, g)),
        "input_random_bytes_file": ("unreadable", special(lambda d, g: open(d, "wb").write(os.urandom(300)))),
        "input_missing": ("unreadable", lambda d, g: d),
        "input_empty_folder": ("unreadable", special(lambda d, g: os.makedirs(d))),
        # -- well-formed but suspicious
        "huge_alpha": ("suspicious", peft(config=lambda g: g.cfg(lora_alpha=10_000))),
        "zero_alpha": ("suspicious", peft(config=lambda g: g.cfg(lora_alpha=0))),
        "update_larger_than_weight": ("suspicious-base", peft(lambda g: {
            k: v * (1000 if k.endswith("lora_B.weight") else 1) for k, v in g.tensors.items()})),
        # -- another model
        "other_architecture": ("base-mismatch", peft(lambda g: {
            PREFIX + "transformer.h.0.attn.c_attn.lora_A.weight": r32(4, 32),
            PREFIX + "transformer.h.0.attn.c_attn.lora_B.weight": r32(96, 4)})),
        "shapes_do_not_fit": ("base-mismatch", peft(lambda g: g.with_(**{A: r32(4, 48), B: r32(48, 4)}))),
        "extra_tensor_absent_from_base": ("base-mismatch", peft(lambda g: dict(g.tensors, **{
            PREFIX + "score.weight": r32(2, 32)}))),
        "extra_tensor_wrong_shape": ("base-mismatch", peft(lambda g: dict(g.tensors, **{
            PREFIX + "lm_head.weight": r32(95, 32)}))),
    }
    cases.update(single_file_cases())
    return cases


KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
DIFFUSERS = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def single_file_cases():
    """kohya and diffusers files (one module of the SD 1.x UNet, named by the shipped manifest)."""
    def kohya(**change):
        def build(d, g):
            t = {KOHYA + ".lora_down.weight": torch.randn(4, 320) * 0.01, KOHYA + ".lora_up.weight":
                 torch.randn(320, 4) * 0.01, KOHYA + ".alpha": torch.tensor(4.0)}
            for k, v in change.items():
                key = KOHYA + "." + k.replace("__", ".")
                t.pop(key) if v is None else t.__setitem__(key, v)
            safetensors_io.save(d + ".safetensors", t)
            return d + ".safetensors"
        return build

    def diffusers(meta=None, **change):
        def build(d, g):
            t = {DIFFUSERS + ".lora_A.weight": torch.randn(4, 320) * 0.01,
                 DIFFUSERS + ".lora_B.weight": torch.randn(320, 4) * 0.01}
            t.update({DIFFUSERS + "." + k.replace("__", "."): v for k, v in change.items()})
            safetensors_io.save(d + ".safetensors", t, meta)
            return d + ".safetensors"
        return build

    def truncated(d, g):
        path = kohya()(d, g)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 10)
        return path

    def pickled(d, g):
        with open(d + ".pt", "wb") as f:
            f.write(_evil_pickle(d))
        return d + ".pt"

    nan = torch.randn(320, 4)
    nan[3, 1] = float("nan")
    return {
        "kohya_rank_mismatch": ("unreadable", kohya(lora_up__weight=torch.randn(320, 3))),
        "kohya_down_without_up": ("unreadable", kohya(lora_up__weight=None)),
        "kohya_up_without_down": ("unreadable", kohya(lora_down__weight=None)),
        "kohya_alpha_not_scalar": ("unreadable", kohya(alpha=torch.tensor([1.0, 2.0]))),
        "kohya_factors_1d": ("unreadable", kohya(lora_down__weight=torch.randn(320), lora_up__weight=torch.randn(320))),
        "kohya_factors_5d": ("unreadable", kohya(lora_down__weight=torch.randn(4, 320, 1, 1, 1))),
        "kohya_tucker_core_wrong_shape": ("unreadable", kohya(lora_down__weight=torch.randn(4, 320, 1, 1),
                                                              lora_up__weight=torch.randn(320, 4, 1, 1),
                                                              lora_mid__weight=torch.randn(3, 5, 3, 3))),
        "kohya_unknown_module": ("unresolved", lambda d, g: _rename(kohya()(d, g), KOHYA, "lora_unet_no_such_block")),
        "kohya_stray_key": ("unreadable", kohya(lora_gate__weight=torch.randn(4))),
        "kohya_truncated": ("unreadable", truncated),
        "kohya_malicious_pickle": ("unreadable", pickled),
        "kohya_nan_up": ("invalid", kohya(lora_up__weight=nan)),
        "kohya_alpha_inf": ("invalid", kohya(alpha=torch.tensor(float("inf")))),
        "kohya_huge_alpha": ("suspicious", kohya(alpha=torch.tensor(1e5))),
        "diffusers_rank_mismatch": ("unreadable", diffusers(lora_B__weight=torch.randn(320, 2))),
        "diffusers_metadata_not_json": ("unreadable", diffusers({"lora_adapter_metadata": "{"})),
        "diffusers_metadata_bad_alpha": ("unreadable", diffusers({"lora_adapter_metadata": '{"unet.lora_alpha": "x"}'})),
        "diffusers_metadata_bad_pattern": ("unreadable", diffusers({"lora_adapter_metadata":
                                                                    '{"unet.alpha_pattern": {"[": 2}}'})),
        "diffusers_metadata_alpha_10e400": ("unreadable", diffusers({"lora_adapter_metadata":
                                                                     '{"unet.lora_alpha": 1' + "0" * 400 + "}"})),
        "diffusers_metadata_r_10e400": ("unreadable", diffusers({"lora_adapter_metadata":
                                                                 '{"unet.r": 1' + "0" * 400 + "}"})),
        "diffusers_inf_A": ("invalid", diffusers(lora_A__weight=torch.full((4, 320), float("inf")))),
    }


def _rename(path, old, new):
    t, meta = safetensors_io.load(path)
    safetensors_io.save(path, {k.replace(old, new): v for k, v in t.items()}, meta)
    return path


def _evil_pickle(d) -> bytes:
    """A torch.save file that would create a marker folder if unpickled without weights_only."""
    class Evil:
        def __reduce__(self):
            return os.makedirs, (d + ".PWNED",)
    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    return buf.getvalue()


def base_cases():
    def shard_names(d):
        return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))

    def from_good(mutate):
        def build(d, root):
            shutil.copytree(os.path.join(root, "base"), d)
            mutate(d)
            return d
        return build

    def truncate(d):
        p = os.path.join(d, shard_names(d)[0])
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) - 16)

    def edit_index(fn):
        def mutate(d):
            p = os.path.join(d, "model.safetensors.index.json")
            with open(p) as f:
                index = json.load(f)
            fn(index)
            with open(p, "w") as f:
                json.dump(index, f)
        return mutate

    def int_weights(d):
        for s in shard_names(d):
            p = os.path.join(d, s)
            t, meta = safetensors_io.load(p)
            if Q + ".weight" in t:
                t[Q + ".weight"] = torch.zeros(t[Q + ".weight"].shape, dtype=torch.int32)
                safetensors_io.save(p, t, meta)

    def duplicate(d):
        names = shard_names(d)
        t, meta = safetensors_io.load(os.path.join(d, names[0]))
        u, _ = safetensors_io.load(os.path.join(d, names[1]))
        safetensors_io.save(os.path.join(d, names[1]), dict(u, **t), meta)

    def lonely(fn):
        def build(d, root):
            os.makedirs(d)
            fn(d)
            return d
        return build

    return {
        "base_missing": lambda d, root: d,
        "base_empty_folder": lonely(lambda d: None),
        "base_random_safetensors": lonely(lambda d: open(os.path.join(d, "model.safetensors"), "wb").write(os.urandom(64))),
        "base_only_bin": lonely(lambda d: torch.save({"w": torch.ones(2)}, os.path.join(d, "pytorch_model.bin"))),
        "base_a_text_file": lambda d, root: open(d, "w").write("not a model") and d,
        "base_truncated_shard": from_good(truncate),
        "base_index_not_json": from_good(lambda d: open(os.path.join(d, "model.safetensors.index.json"), "w").write("{")),
        "base_index_names_missing_shard": from_good(edit_index(lambda i: i["weight_map"].update(x="model-9.safetensors"))),
        "base_index_disagrees": from_good(edit_index(lambda i: i["weight_map"].pop(Q + ".weight"))),
        "base_index_shard_not_a_string": from_good(edit_index(lambda i: i["weight_map"].update({Q + ".weight": 7}))),
        "base_index_metadata_a_list": from_good(edit_index(lambda i: i.update(metadata=[1]))),
        "base_integer_weights": from_good(int_weights),
        "base_tensor_in_two_shards": from_good(duplicate),
        "base_several_files_no_index": from_good(lambda d: os.remove(os.path.join(d, "model.safetensors.index.json"))),
    }


def tree_hash(path) -> str:
    h = hashlib.sha256()
    if not os.path.lexists(path):
        return "absent"
    for dirpath, dirs, files in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [os.path.basename(path)])]:
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, path)} {st.st_mode} {st.st_size} {st.st_mtime_ns}".encode())
            if st.st_mode & 0o444 and stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


@contextlib.contextmanager
def unprivileged(enabled: bool):
    """Drop to `nobody` for the block when we are root, so mode-000 files are really unreadable."""
    if not (enabled and os.geteuid() == 0):
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
