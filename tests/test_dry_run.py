"""--dry-run of extract (planned from the safetensors headers) and pull (from the Hub's file listing):
exit 0, the printed plan agrees with what the real command then does (the oracle), nothing is written,
read or downloaded."""
from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from _tiny import peft_adapter, run_cli as run, save_base, tiny_llama
from loratools import safetensors_io
from loratools.extraction import extract
from loratools.inspection import adapter_bytes


def tree(root) -> dict:
    """Every file under `root` with its size and mtime: a dry run must leave this unchanged."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(folder, f))
            out[os.path.join(folder, f)] = (st.st_size, st.st_mtime_ns)
    return out


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 24)
        self.conv = nn.Conv2d(6, 12, 3)
        self.proj = nn.Linear(24, 300)  # min(300, 24) <= 4·(rank + 10): the exact SVD
        self.wide = nn.Linear(160, 200, bias=False)  # 4·(4+10) < 160: the randomized SVD


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry")
    torch.manual_seed(0)
    base = Net()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p += 0.01 * torch.randn_like(p)
    for name, model in (("b", base), ("t", tuned)):
        os.makedirs(root / name)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / name / "model.safetensors"))
    return root, str(root / "b"), str(root / "t")


def test_extract_dry_run_plans_what_extract_writes(pair, tmp_path, capsys, monkeypatch):
    root, b, t = pair
    before = tree(root), tree(tmp_path)
    out = tmp_path / "ex"
    args = [b, t, "-o", out, "--rank", "4", "--embeddings", "--dtype", "bf16"]
    read = safetensors_io.SafetensorsFile.read
    with monkeypatch.context() as m:  # headers only: reading any tensor fails the test
        m.setattr(safetensors_io.SafetensorsFile, "read", lambda *a, **k: pytest.fail("a tensor was read"))
        code, out_text, err = run(capsys, "extract", *args, "--dry-run")
        assert code == 0, err
        code, js, _ = run(capsys, "extract", *args, "--dry-run", "--format", "json")
        assert code == 0
    assert safetensors_io.SafetensorsFile.read is read
    assert (tree(root), tree(tmp_path)) == before and not out.exists()  # nothing written
    assert out_text == ""
    plan = json.loads(js)
    rows = {m["name"]: m for m in plan["modules"]}
    assert {n: (m["kind"], m["rank"], m["svd"]) for n, m in rows.items()} == {
        "embed": ("embedding", 4, "exact"), "conv": ("conv", 4, "exact"), "proj": ("linear", 4, "exact"),
        "wide": ("linear", 4, "randomized")}
    for name in rows:
        assert name in err
    assert f"would write {out} (peft, " in err and "nothing written (dry run)" in err
    # the oracle: the real extraction of the same pair (every weight changed, so the bound is exact)
    result = extract(b, t, out, rank=4, embeddings=True, dtype="bf16")
    assert {m.name: (m.kind, m.new_rank, result.methods[m.name]) for m in result.modules} == \
        {n: (m["kind"], m["rank"], m["svd"]) for n, m in rows.items()}
    assert plan["out_bytes"] == adapter_bytes(result.adapter)
    # peak memory: at least the largest pair of tensors (fp32 proj.weight, base and tuned) plus the output
    assert plan["peak_bytes"] >= 2 * 300 * 24 * 4 + plan["out_bytes"]
    assert plan["skipped"] == {}


def test_extract_dry_run_refuses_what_extract_refuses(pair, tmp_path, capsys):
    root, b, t = pair
    code, _, err = run(capsys, "extract", b, t, "-o", tmp_path / "x.safetensors", "--rank", "4", "--dry-run")
    assert code == 2 and err.count("\n") == 1 and "peft is a folder" in err
    other = tmp_path / "other"
    os.makedirs(other)
    save_file({"proj.weight": torch.zeros(5, 5)}, str(other / "model.safetensors"))
    code, _, err = run(capsys, "extract", b, other, "-o", tmp_path / "x", "--rank", "4", "--dry-run")
    assert code == 1 and err.count("\n") == 1 and "different tensors" in err
    code, _, err = run(capsys, "extract", b, t, "-o", tmp_path / "k.safetensors", "--rank", "8", "--dry-run",
                       "--to", "kohya", "--include", "wide", "--dynamic", "sv_fro", "--param", "0.9", "-q")
    assert code == 0 and err.count("\n") == 1 and "would write" in err and "kohya" in err
    assert sorted(os.listdir(tmp_path)) == ["other"]


# ---- pull ------------------------------------------------------------------------------------------
def hub_files(folder, prefix=""):
    return {prefix + n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if n != "README.md"}


def test_pull_dry_run_lists_the_files_without_downloading(fake_hub, tmp_path, capsys):
    model = tiny_llama()
    peft_adapter(model, str(tmp_path / "a"))
    save_base(model, str(tmp_path / "base"))
    files = dict(hub_files(tmp_path / "a"), **hub_files(tmp_path / "base", "base/"),
                 **hub_files(tmp_path / "a", "nested/"), **{"notes.txt": b"x" * 100})
    fake_hub.commit("alice/lora", files)
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 4)}, str(tmp_path / "one.safetensors"))
    fake_hub.commit("alice/many", {"one.safetensors": open(tmp_path / "one.safetensors", "rb").read(),
                                   "two.safetensors": open(tmp_path / "one.safetensors", "rb").read()})
    before = tree(tmp_path)
    commit = fake_hub.repos["alice/lora"].refs["main"]
    for ref, want in [("alice/lora", ["adapter_config.json", "adapter_model.safetensors"]),
                      ("alice/lora/nested", ["nested/adapter_config.json", "nested/adapter_model.safetensors"]),
                      ("alice/lora/nested/adapter_model.safetensors", ["nested/adapter_model.safetensors"])]:
        code, out, err = run(capsys, "pull", ref, "--dry-run", "-o", tmp_path / "pulled")
        assert code == 0, err
        assert out == "" and "nothing downloaded (dry run)" in err and commit in err
        for name in want:
            assert re.search(rf"^{re.escape(name)} +{len(files[name])}$", err, re.M), name
        code, out, _ = run(capsys, "pull", ref, "--dry-run", "--format", "json")
        plan = json.loads(out)
        assert plan["files"] == {n: len(files[n]) for n in want} and plan["commit"] == commit
        assert plan["bytes"] == sum(len(files[n]) for n in want)
    assert fake_hub.downloads() == []  # nothing was fetched ...
    assert tree(tmp_path) == before and not os.path.exists(fake_hub.home)  # ... nor written, not even the cache
    code, _, err = run(capsys, "pull", "alice/many", "--dry-run")
    assert code == 1 and err.count("\n") == 1 and "several .safetensors files" in err
    code, _, err = run(capsys, "pull", "alice/lora/nope.safetensors", "--dry-run")
    assert code == 1 and err.count("\n") == 1 and "no file nope.safetensors" in err
    # the oracle: the real pull fetches exactly the planned files
    code, out, err = run(capsys, "pull", "alice/lora", "--format", "json", "-q")
    assert code == 0, err
    assert sorted(json.loads(out)["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(fake_hub.downloads()) == ["alice/lora/adapter_config.json", "alice/lora/adapter_model.safetensors"]


def test_extract_and_blend_offer_only_what_they_can_write(pair, tmp_path, capsys):
    from loratools.errors import UsageError

    root, b, t = pair
    for cmd in (["extract", b, t, "--rank", "4"], ["blend", b, t]):
        code, _, err = run(capsys, *cmd, "-o", tmp_path / "x.gguf", "--to", "gguf", "--dry-run")
        assert code == 2 and err.count("\n") == 1 and "'gguf' is not one of" in err
    with pytest.raises(UsageError, match="convert --to gguf --base MODEL"):
        extract(b, t, tmp_path / "x.gguf", rank=4, to="gguf")
    assert os.listdir(tmp_path) == []


def test_push_quiet_prints_one_line(fake_hub, tmp_path, capsys):
    peft_adapter(tiny_llama(), str(tmp_path / "a"))
    code, out, err = run(capsys, "push", tmp_path / "a", "alice/lora", "--dry-run", "-q")
    assert code == 0 and out == "" and err.count("\n") == 1 and "nothing uploaded (dry run)" in err
    code, _, err = run(capsys, "push", tmp_path / "a", "alice/lora", "--dry-run")
    assert code == 0 and "--- README.md ---" in err and "adapter_model.safetensors" in err
