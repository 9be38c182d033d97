"""Inputs that reached the catch-all (issue 11 §7): each is a typed one-line error with the right exit
code. (Malformed files are in the corpus, tests/_corpus.py; these are options, paths and signals.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from _tiny import peft_adapter, run_cli, tiny_llama


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    model = tiny_llama()
    peft_adapter(model, str(root / "a"))
    peft_adapter(model, str(root / "b"), seed=3)
    return root


def _one_line(capsys, code, *args):
    rc, _, err = run_cli(capsys, *args)
    assert rc == code and err.startswith("loratools: error: ") and err.count("\n") == 1, err
    assert "LORATOOLS_DEBUG" not in err, err  # a known error, not the catch-all
    return err


@pytest.mark.parametrize("method", ["svd", "cat", "ties"])
def test_blend_huge_weights_and_bad_numbers(pair, capsys, tmp_path, method):
    a, b = pair / "a", pair / "b"
    extra = ["--density", "0.5"] if method == "ties" else []
    if method != "cat":  # cat keeps the factors apart: each stays finite
        err = _one_line(capsys, 1, "blend", f"{a}:1e38", f"{b}:1e38", "-m", method, *extra, "-o", tmp_path / "o")
        assert "overflow" in err
    for spec in ("nan", "inf", "-inf"):
        err = _one_line(capsys, 2, "blend", f"{a}:{spec}", b, "-m", method, *extra, "-o", tmp_path / "o")
        assert "finite" in err
    _one_line(capsys, 2, "blend", a, b, "-m", method, *extra, "--seed", str(2**70), "-o", tmp_path / "o")
    assert os.listdir(tmp_path) == []


def test_paths_with_newlines_stay_on_one_line(pair, capsys, tmp_path):
    odd = tmp_path / "bad\nname"
    err = _one_line(capsys, 1, "inspect", odd)
    assert "bad\\nname" in err
    odd.mkdir()
    (odd / "config.json").write_text("{}")
    err = _one_line(capsys, 1, "convert", pair / "a", "--to", "peft", "-o", odd)
    assert "already exists" in err and "bad\\nname" in err


def test_sigterm_after_the_command_is_the_default_action(tmp_path):
    """main() puts the previous SIGTERM handler back: a SIGTERM during interpreter shutdown ends
    the process quietly instead of raising KeyboardInterrupt into the teardown."""
    script = ("import os, signal\nfrom loratools.cli.main import main\n"
              "assert main(['--version']) == 0\n"
              "assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "import time; time.sleep(5)\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert p.returncode == -signal.SIGTERM and "Traceback" not in p.stderr, p.stderr


def test_relative_glob_in_the_current_folder(pair, capsys, tmp_path, monkeypatch):
    """`lora*` (a glob with no folder part) matched names relpath could not take (ValueError)."""
    monkeypatch.chdir(pair)
    code, out, err = run_cli(capsys, "ls", "a*")
    assert code == 0 and "adapter_config" not in err and out.count("\n") >= 2, err
