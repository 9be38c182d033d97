"""Inputs that must never hang or leak (issue 11 §2, §4): FIFOs and devices where a file is
expected, and what a merge copies from the base folder besides its weights."""
from __future__ import annotations

import os
import shutil
import signal

import pytest

from _corpus import tree_hash
from _tiny import run_cli, tiny_project


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    root, _ = tiny_project(tmp_path_factory, "inputs", "lora")
    return root


@pytest.fixture
def deadline():
    """A command that blocks fails this test within 30 s instead of hanging the suite."""
    def expire(signum, frame):
        raise TimeoutError("blocked on a special file")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_fifo_inputs_are_refused_without_blocking(proj, capsys, tmp_path, deadline):
    bad = tmp_path / "fifo_adapter"
    bad.mkdir()
    shutil.copy(proj / "lora" / "adapter_config.json", bad)
    os.mkfifo(bad / "adapter_model.safetensors")
    fifo_base = tmp_path / "fifo_base"
    fifo_base.mkdir()
    shutil.copy(proj / "base" / "config.json", fifo_base)
    os.mkfifo(fifo_base / "model.safetensors")
    runs = [("inspect", bad), ("validate", bad), ("convert", bad, "--to", "peft", "-o", tmp_path / "o1"),
            ("resize", bad, "--rank", "2", "-o", tmp_path / "o2"), ("merge", proj / "base", bad, "-o", tmp_path / "o3"),
            ("merge", fifo_base, proj / "lora", "-o", tmp_path / "o4"),
            ("validate", proj / "lora", "--base", fifo_base), ("inspect", "/dev/zero")]
    for args in runs:
        code, _, err = run_cli(capsys, *args)
        assert code == 1 and err.count("\n") == 1, (args, err)
        assert "not a regular file" in err or "not a LoRA adapter" in err, (args, err)
    assert sorted(os.listdir(tmp_path)) == ["fifo_adapter", "fifo_base"]


def test_merge_copies_no_links_out_no_specials_no_unmerged_weights(proj, capsys, tmp_path, deadline):
    base = tmp_path / "base"
    shutil.copytree(proj / "base", base)
    secret = tmp_path / "secret.txt"
    secret.write_text("hf_secret_token")
    (base / "README.md").write_text("card")
    os.symlink(secret, base / "tokenizer_config.json")  # out of the folder: would leak the secret
    os.symlink("/etc", base / "extra")
    os.symlink("/dev/zero", base / "vocab.txt")  # would copy forever
    os.mkfifo(base / "merges.txt")
    os.symlink("README.md", base / "card.md")  # inside the folder: copied as the file it names
    (base / "sub").mkdir()
    os.symlink(secret, base / "sub" / "nested.json")
    stale = ["pytorch_model.bin", "consolidated.pth", "model.onnx", "model.gguf", "flax_model.msgpack", "tf_model.h5",
             "pytorch_model.bin.index.json"]
    for name in stale:
        (base / name).write_bytes(b"unmerged")
    (base / "original").mkdir()
    (base / "original" / "consolidated.00.pth").write_bytes(b"unmerged")
    before = tree_hash(str(base))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "merge", base, proj / "lora", "-o", out, "-q")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("warning: not copied from the base: "), err
    for name in ["tokenizer_config.json", "extra", "vocab.txt", "merges.txt", "sub/nested.json", "original/"] + stale:
        assert name in lines[1], name
    assert sorted(os.listdir(out)) == ["README.md", "card.md", "config.json", "generation_config.json",
                                       "model.safetensors", "sub"]
    assert (out / "card.md").read_text() == "card" and not os.path.islink(out / "card.md")
    assert os.listdir(out / "sub") == []
    assert "hf_secret_token" not in "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())
    assert tree_hash(str(base)) == before
