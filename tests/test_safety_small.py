"""Smaller correctness gaps (issue 11 §8): float64 adapters and bases merge (checked against PEFT in
fp64), an adapter with no LoRA modules is an error for validate and a problem for inspect, and
resize writes the adapter and its --plot together or not at all."""
from __future__ import annotations

import copy
import errno
import json
import os

import pytest
import torch

from _tiny import peft_adapter, run_cli, save_base, tiny_llama
from loratools import safetensors_io
from loratools.merging import merge


@pytest.mark.parametrize("base_dtype", [torch.float64, torch.float32])
def test_float64_adapter_and_base_merge_like_peft(tmp_path, base_dtype):
    model = tiny_llama(dtype=base_dtype)
    save_base(model, str(tmp_path / "base"))
    adapter_model = copy.deepcopy(model).to(torch.float64)  # the same weights, exactly; fp64 factors
    peft_model = peft_adapter(adapter_model, str(tmp_path / "lora"))
    t, _ = safetensors_io.load(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert {v.dtype for v in t.values()} == {torch.float64}
    merge(str(tmp_path / "base"), [str(tmp_path / "lora")], str(tmp_path / "out"))
    got, _ = safetensors_io.load(str(tmp_path / "out" / "model.safetensors"))
    want = {k: v for k, v in peft_model.merge_and_unload().state_dict().items()}
    for name, w in got.items():
        assert w.dtype == base_dtype, name
        ref = want[name].to(base_dtype)
        if base_dtype == torch.float64:
            torch.testing.assert_close(w, ref, rtol=1e-12, atol=1e-14)
        else:  # fp64 factors, fp32 accumulation, one rounding
            torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-7)
    changed = [n for n in got if not torch.equal(got[n], model.state_dict()[n].to(base_dtype))]
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)


def test_no_lora_modules_is_an_error(tmp_path, capsys):
    model = tiny_llama()
    peft_adapter(model, str(tmp_path / "a"))
    path = tmp_path / "a" / "adapter_model.safetensors"
    safetensors_io.save(str(path), {"base_model.model.model.norm.weight": torch.ones(32)})
    code, out, err = run_cli(capsys, "validate", tmp_path / "a")
    assert code == 1 and "no LoRA modules" in out + err and "ok" not in err, (out, err)
    code, out, err = run_cli(capsys, "inspect", tmp_path / "a")
    assert code == 0 and "no LoRA modules" in out, out


def test_resize_plot_failure_writes_nothing(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    peft_adapter(tiny_llama(), str(tmp_path / "a"))
    out = tmp_path / "small"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"previous": True}))

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    code, _, err = run_cli(capsys, "resize", tmp_path / "a", "--rank", "2", "-o", out, "--plot",
                           tmp_path / "s.png", "--overwrite")
    assert code == 1 and "nothing was written" in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["a", "small"]
    assert json.loads((out / "adapter_config.json").read_text()) == {"previous": True}
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "resize", tmp_path / "a", "--rank", "2", "-o", out, "--plot",
                           tmp_path / "s.png", "--overwrite")
    assert code == 0, err
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG" and (out / "adapter_model.safetensors").exists()
