"""Interrupted and failing writes leave no output and an unchanged input.

`merge` runs as a real subprocess on a sharded base (~50 MB, several shards) and is killed once
its temporary output folder holds a shard. SIGKILL cannot be caught, so the only trace it may
leave is the `.OUT.tmp-PID-*` folder beside the target (never the target itself); the next run
that writes the same target removes it (the PID is dead). SIGTERM and SIGINT are caught: the
temporary folder is removed before exit. A full disk is simulated with RLIMIT_FSIZE, a read-only
target folder with file modes (as an unprivileged user when the tests run as root).
"""
from __future__ import annotations

import glob
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from benchmarks._models import make_llama, make_peft_adapter
from loratools.atomic import atomic_output
from loratools.cli.main import main
from _corpus import tree_hash, unprivileged

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def models():
    root = tempfile.mkdtemp(prefix="loratools-interrupt-")
    os.chmod(root, 0o755)
    base, adapter = os.path.join(root, "base"), os.path.join(root, "adapter")
    make_llama(base, dtype=torch.bfloat16, shard_bytes=8 << 20, hidden=512, intermediate=1536, layers=6,
               vocab=8000, heads=8, kv_heads=2)
    make_peft_adapter(adapter, base, rank=8)
    yield root, base, adapter
    shutil.rmtree(root, ignore_errors=True)


def start_merge(base, adapter, out, extra=(), **popen):
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "loratools", "merge", base, adapter, "-o", out, "-q", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def _half_way(proc, out):
    """The temporary output folder once it holds a shard file, else None."""
    pattern = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{proc.pid}-*")
    for tmp in glob.glob(pattern):
        if glob.glob(os.path.join(tmp, "*.safetensors")):
            return tmp
    return None


SIGNALS = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT]


@pytest.fixture(scope="module")
def interrupted(models):
    """Start one merge per signal at once (the interpreter start-up dominates), send each its
    signal as soon as its temporary output holds a shard, and collect what happened."""
    root, base, adapter = models
    before = tree_hash(base), tree_hash(adapter)
    runs = {"full": _start_full_disk(root, base, adapter)}
    for sig in SIGNALS:
        folder = tempfile.mkdtemp(dir=root, prefix=f"{sig.name}-")
        out = os.path.join(folder, "merged")
        runs[sig] = {"folder": folder, "out": out, "proc": start_merge(base, adapter, out), "tmp": None}
    deadline = time.monotonic() + 300
    while any(r["tmp"] is None for r in runs.values() if r is not runs["full"]) and time.monotonic() < deadline:
        for sig, r in runs.items():
            if sig == "full":
                continue
            if r["tmp"] is None and r["proc"].poll() is None:
                r["tmp"] = _half_way(r["proc"], r["out"])
                if r["tmp"]:
                    r["proc"].send_signal(sig)
            elif r["tmp"] is None:
                r["tmp"] = "ended before the signal"
        time.sleep(0.002)
    for sig, r in runs.items():
        if r["proc"].poll() is None and r["tmp"] is None and sig != "full":
            r["proc"].kill()
        r["err"] = r["proc"].communicate(timeout=300)[1]
    return runs, before


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_interrupted_merge_leaves_no_target(models, interrupted, sig):
    root, base, adapter = models
    runs, before = interrupted
    r = runs[sig]
    assert r["tmp"] and os.path.isdir(os.path.dirname(r["tmp"])), f"merge was not interrupted half-way: {r}"
    assert r["tmp"] != "ended before the signal", f"merge finished before it could be interrupted: {r['err']}"
    out, folder, proc = r["out"], r["folder"], r["proc"]
    assert not os.path.lexists(out), "an interrupted merge left its target"
    assert (tree_hash(base), tree_hash(adapter)) == before, "an interrupted merge changed its input"
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert os.listdir(folder) == [os.path.basename(r["tmp"])]  # the one trace SIGKILL can leave
        # the next run on the same target cleans it up and succeeds
        assert main(["merge", base, adapter, "-o", out, "-q"]) == 0
        assert os.listdir(folder) == ["merged"]
    else:
        assert proc.returncode == 130, r["err"]
        assert r["err"].strip() == "loratools: interrupted; no output was written"
        assert os.listdir(folder) == [], "the temporary output was not removed"


def _limit_file_size(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def _start_full_disk(root, base, adapter):
    """A merge with --overwrite over a previous output whose writes fail half-way (EFBIG under
    RLIMIT_FSIZE, as ENOSPC would on a full disk)."""
    folder = tempfile.mkdtemp(dir=root, prefix="full-")
    out = os.path.join(folder, "merged")
    os.makedirs(out)
    with open(os.path.join(out, "keep.txt"), "w") as f:
        f.write("previous output")
    with open(os.path.join(out, "config.json"), "w") as f:  # a model folder: --overwrite may replace it
        f.write("{}")
    hashes = tree_hash(base), tree_hash(adapter), tree_hash(out)
    proc = start_merge(base, adapter, out, extra=["--overwrite"], preexec_fn=_limit_file_size(3 << 20))
    return {"folder": folder, "out": out, "proc": proc, "tmp": None, "before": hashes}


def test_full_disk_mid_merge_keeps_old_output(models, interrupted):
    """The temporary output is removed, the previous output that --overwrite would have replaced
    is kept, and the error is one line."""
    root, base, adapter = models
    r = interrupted[0]["full"]
    assert r["proc"].returncode == 1
    assert r["err"].startswith("loratools: error: cannot write") and "File too large" in r["err"], r["err"]
    assert r["err"].count("\n") == 1 and "Traceback" not in r["err"]
    assert (tree_hash(base), tree_hash(adapter), tree_hash(r["out"])) == r["before"]
    assert os.listdir(r["folder"]) == ["merged"]


def test_read_only_target_folder(models, capsys):
    root, base, adapter = models
    parent = tempfile.mkdtemp(dir=root)
    os.chmod(parent, 0o555)
    before = tree_hash(base), tree_hash(adapter)
    try:
        with unprivileged(True):
            code = main(["merge", base, adapter, "-o", os.path.join(parent, "out"), "-q"])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("loratools: error: cannot write to") and "Permission denied" in err
        assert err.count("\n") == 1
        assert os.listdir(parent) == []
        assert (tree_hash(base), tree_hash(adapter)) == before
    finally:
        os.chmod(parent, 0o755)


def test_exception_half_way_removes_temporary_and_restores(tmp_path):
    """atomic_output itself: an error in the body leaves nothing; an existing target survives."""
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            open(os.path.join(tmp, "half"), "w").close()
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    os.makedirs(target)
    (target / "old").write_text("old")
    (target / "config.json").write_text("{}")  # a model folder: --overwrite may replace it
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target, overwrite=True) as tmp:
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["out"] and (target / "old").read_text() == "old"
    assert sorted(os.listdir(target)) == ["config.json", "old"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_leftovers_of_dead_runs_are_cleaned(tmp_path):
    dead = _dead_pid()
    os.makedirs(tmp_path / f".out.tmp-{dead}-abc")  # a killed run's temporary
    os.makedirs(tmp_path / f".out.tmp-{os.getpid()}-live")  # a live run's: must be left alone
    os.makedirs(tmp_path / f".out.old-{dead}-xyz")  # killed between the two renames: the previous output
    (tmp_path / f".out.old-{dead}-xyz" / "prev").write_text("prev")
    os.makedirs(tmp_path / ".other.tmp-1-x")  # another target's: not ours to touch
    with pytest.raises(Exception) as e:  # the restored previous output now exists
        with atomic_output(tmp_path / "out"):
            pass
    assert "already exists" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == sorted([f".out.tmp-{os.getpid()}-live", "out", ".other.tmp-1-x"])
    assert (tmp_path / "out" / "prev").read_text() == "prev"
