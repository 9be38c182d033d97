"""Merging into a transformer-only diffusers pipeline folder, checked against diffusers' own
`load_lora_weights` + `fuse_lora` on the same pipeline class."""
from __future__ import annotations

import copy
import inspect
import json

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from loratools import merge
from loratools.checkpoint import Checkpoint


def merge_matches_fuse_lora(tmp_path, pipe_cls, transformer, lora) -> int:
    """Merge `lora` into a folder holding `transformer` only; assert every weight equals diffusers' fused one
    (1e-5); return how many weights the LoRA changed."""
    root = tmp_path / "pipe"
    transformer.save_pretrained(root / "transformer")
    with open(root / "model_index.json", "w") as f:
        json.dump({"_class_name": pipe_cls.__name__, "transformer": ["diffusers", type(transformer).__name__]}, f)
    others = [p for p in inspect.signature(pipe_cls.__init__).parameters if p not in ("self", "transformer")]
    pipe = pipe_cls(**{**dict.fromkeys(others), "scheduler": FlowMatchEulerDiscreteScheduler(),
                       "transformer": copy.deepcopy(transformer)})
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    merge(str(root), [str(lora)], str(tmp_path / "merged"))
    got, want = Checkpoint(str(tmp_path / "merged" / "transformer")), pipe.transformer.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got.read(k), v, rtol=1e-5, atol=1e-5, msg=k)
    return sum(not torch.equal(want[k], v) for k, v in transformer.state_dict().items())
