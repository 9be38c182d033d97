"""Outputs by identity (issue 11 §1–§3): an output that is, contains or lies inside an input (reached
through a symlink, a parent, `.`), the current/home/root folder, a device node or FIFO, an output
that appears mid-run, and concurrent writers. Each is refused in one line and destroys nothing."""
from __future__ import annotations

import multiprocessing
import os
import shutil
import stat

import pytest

from _corpus import tree_hash
from _tiny import peft_adapter, run_cli, save_base, tiny_llama
from loratools import checkpoint
from loratools.atomic import atomic_output
from loratools.errors import OutputExistsError


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    root = tmp_path_factory.mktemp("proj")
    model = tiny_llama()
    save_base(model, str(root / "base"))
    (root / "base" / "README.md").write_text("base card")
    peft_adapter(model, str(root / "lora"))
    (root / "lora" / "README.md").write_text("adapter card")
    return root


def _refused(capsys, proj, *args, code=2, words=("input",)):
    before = tree_hash(str(proj))
    rc, _, err = run_cli(capsys, *args)
    assert rc == code, err
    assert err.startswith("loratools: error: ") and err.count("\n") == 1, err
    assert any(w in err for w in words), err
    assert tree_hash(str(proj)) == before, "an input changed"
    return err


def test_output_through_symlink_parent_or_file_is_refused(proj, capsys, monkeypatch):
    base, lora = proj / "base", proj / "lora"
    os.symlink(base, proj / "bl")
    os.symlink(".", proj / "p")
    try:
        _refused(capsys, proj, "merge", proj / "bl", lora, "-o", base, "--overwrite")
        _refused(capsys, proj, "merge", base, lora, "-o", proj / "p" / "base", "--overwrite")
        _refused(capsys, proj, "merge", base / "model.safetensors", lora, "-o", base / "model.safetensors",
                 "--overwrite")
        _refused(capsys, proj, "merge", base, lora, "-o", lora, "--overwrite")
        _refused(capsys, proj, "merge", base, lora, "-o", base / "sub" / "out")
        os.makedirs(base / "sub")
        _refused(capsys, proj, "merge", base, lora, "-o", base / "sub" / "out")
        os.rmdir(base / "sub")
        _refused(capsys, proj, "convert", lora, "--to", "peft", "-o", lora, "--overwrite")
        _refused(capsys, proj, "resize", lora, "--rank", "2", "-o", proj / "p" / "lora", "--overwrite")
        _refused(capsys, proj, "blend", lora, lora, "-m", "cat", "-o", lora,
                 "--overwrite")
        _refused(capsys, proj, "extract", base, base, "--rank", "2", "-o", base, "--overwrite")
        monkeypatch.chdir(proj)
        _refused(capsys, proj, "merge", "base", "lora", "-o", ".", "--overwrite")
        _refused(capsys, proj, "merge", "base", "lora", "-o", "..", "--overwrite")
        monkeypatch.chdir(base)
        _refused(capsys, proj, "merge", "../base", "../lora", "-o", "..", "--overwrite")
    finally:
        os.unlink(proj / "bl")
        os.unlink(proj / "p")


def test_resize_file_in_place_and_plot_on_input_are_refused(proj, capsys, tmp_path):
    k = tmp_path / "k.safetensors"
    assert run_cli(capsys, "convert", proj / "lora", "--to", "diffusers", "--component", "text_encoder",
                   "-o", k)[0] == 0
    before = tree_hash(str(tmp_path))
    assert run_cli(capsys, "resize", k, "--rank", "2", "-o", k, "--overwrite")[0] == 2
    assert run_cli(capsys, "resize", k, "--rank", "2", "-o", tmp_path / "s.safetensors", "--plot", k,
                   "--overwrite")[0] == 2
    assert run_cli(capsys, "resize", k, "--rank", "2", "-o", tmp_path / "s.safetensors", "--plot",
                   tmp_path / "s.safetensors")[0] == 2
    assert tree_hash(str(tmp_path)) == before


def test_home_and_root_are_refused(proj, capsys, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.json").write_text("{}")  # looks like a model folder; still never replaced
    monkeypatch.setenv("HOME", str(home))
    _refused(capsys, proj, "merge", proj / "base", proj / "lora", "-o", home, "--overwrite", words=("home",))
    assert (home / "config.json").read_text() == "{}"
    _refused(capsys, proj, "merge", proj / "base", proj / "lora", "-o", "/", "--overwrite", words=("root",))


def test_special_files_and_foreign_folders_are_never_replaced(proj, capsys, tmp_path):
    base, lora = proj / "base", proj / "lora"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    os.symlink(tmp_path / "docs", tmp_path / "link")
    for target in ("/dev/null", fifo, tmp_path / "docs", tmp_path / "link"):
        err = _refused(capsys, proj, "merge", base, lora, "-o", target, "--overwrite", code=1,
                       words=("replaces only",))
        assert str(target) in err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "precious"
    assert os.path.islink(tmp_path / "link")


def test_an_output_that_appears_mid_run_survives(proj, capsys, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = checkpoint.copy_other_files

    def racing(src, dst, skip):  # someone creates OUT while the merge is writing
        real(src, dst, skip)
        if not out.exists():
            out.mkdir()
            (out / "precious.txt").write_text("precious")

    monkeypatch.setattr(checkpoint, "copy_other_files", racing)
    rc, _, err = run_cli(capsys, "merge", proj / "base", proj / "lora", "-o", out, "-q")
    assert rc == 1 and "appeared while" in err and err.count("\n") == 1, err
    assert os.listdir(out) == ["precious.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    # with --overwrite too: only what was checked at the start may be replaced (here: nothing)
    os.rename(out, tmp_path / "keep")
    rc, _, err = run_cli(capsys, "merge", proj / "base", proj / "lora", "-o", out, "-q", "--overwrite")
    assert rc == 1 and "appeared while" in err, err
    assert os.listdir(out) == ["precious.txt"]


def test_overwrite_replaces_only_what_it_checked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="replaced while"):
        with atomic_output(out, overwrite=True) as tmp:
            open(os.path.join(tmp, "new"), "w").close()
            os.rename(out, tmp_path / "first")  # swapped for another folder mid-run
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert os.listdir(out) == ["theirs.txt"]
    with atomic_output(tmp_path / "first", overwrite=True) as tmp:  # the normal case still replaces
        open(os.path.join(tmp, "new"), "w").close()
    assert os.listdir(tmp_path / "first") == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["first", "out"]


def _writer(path, barrier, results, i):
    try:
        with atomic_output(path, directory=True) as tmp:
            with open(os.path.join(tmp, "who"), "w") as f:
                f.write(str(i))
            barrier.wait(timeout=30)  # all three commit at once
        results.put((i, "ok"))
    except OutputExistsError as e:
        results.put((i, str(e)))


def test_concurrent_writers_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    out = str(tmp_path / "out")
    procs = [ctx.Process(target=_writer, args=(out, barrier, results, i)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = dict(results.get(timeout=5) for _ in procs)
    winners = [i for i, r in got.items() if r == "ok"]
    assert len(winners) == 1, got
    assert all("appeared while" in r for i, r in got.items() if i not in winners)
    assert os.listdir(tmp_path) == ["out"] and open(os.path.join(out, "who")).read() == str(winners[0])


@pytest.mark.parametrize("native", [True, False])
def test_no_replace_rename_with_and_without_renameat2(tmp_path, monkeypatch, native):
    """The link/mkdir reservation used where renameat2 is missing keeps the same promise."""
    from loratools import renames

    if not native:
        monkeypatch.setattr(renames, "_renameat2", None)
    else:
        assert renames._renameat2 is not None  # Linux with glibc >= 2.28: the native path is tested
    for directory in (True, False):
        out = tmp_path / f"out-{directory}"
        with pytest.raises(OutputExistsError, match="appeared while"):
            with atomic_output(out, directory=directory):
                out.mkdir() if directory else out.write_text("theirs")
                if directory:
                    (out / "theirs").write_text("theirs")
        assert (out / "theirs" if directory else out).read_text() == "theirs"
        os.rename(out, tmp_path / "gone")
        with atomic_output(out, directory=directory):
            pass
        assert os.path.isdir(out) == directory
        (shutil.rmtree if directory else os.unlink)(tmp_path / "gone")
    assert sorted(os.listdir(tmp_path)) == ["out-False", "out-True"]


def test_overwrite_replaces_pipeline_adapter_folders(tmp_path):
    """A peft_diffusion output holds its adapters in component subfolders: still a model folder."""
    out = tmp_path / "pipe_lora"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "adapter_config.json").write_text("{}")
    with atomic_output(out, overwrite=True) as tmp:
        open(os.path.join(tmp, "new"), "w").close()
    assert os.listdir(out) == ["new"]
    (tmp_path / "photos" / "2024").mkdir(parents=True)
    (tmp_path / "photos" / "2024" / "a.jpg").write_bytes(b"jpg")
    with pytest.raises(OutputExistsError, match="holds no model"):
        with atomic_output(tmp_path / "photos", overwrite=True):
            pass
    assert (tmp_path / "photos" / "2024" / "a.jpg").read_bytes() == b"jpg"


def test_concurrent_cli_merges_one_wins(proj, tmp_path):
    """Three `loratools merge` processes on one OUT: exactly one writes it; the others fail in one
    line (at the start or at the rename) and leave nothing behind."""
    import subprocess
    import sys

    out = tmp_path / "OUT"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, "-m", "loratools", "merge", str(proj / "base"), str(proj / "lora"),
                               "-o", str(out), "-q"], stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1, 1], results
    for code, err in results:
        if code:
            assert err.count("\n") == 1 and ("appeared while" in err or "already exists" in err), err
    assert os.listdir(tmp_path) == ["OUT"] and "model.safetensors" in os.listdir(out)


def test_batch_output_folder_is_checked_against_every_input(proj, capsys, tmp_path):
    """Each run of a batch checks only its own input: the OUTPUT folder itself must not be, lie inside
    or hold any input, nor be a file (`resize A B -o A`, `convert DIR/ -o DIR/out`)."""
    lora = proj / "lora"
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(lora / "adapter_model.safetensors", d / "a.safetensors")
    shutil.copy(lora / "adapter_model.safetensors", d / "b.safetensors")
    for root in (proj, tmp_path):
        before = tree_hash(str(root))
        for args in ([d / "a.safetensors", lora, "-o", lora], [d / "a.safetensors", lora, "-o", d],
                     [f"{d}{os.sep}", "-o", d / "out"], [d / "a.safetensors", lora, "-o", d / "a.safetensors"]):
            _refused(capsys, tmp_path, "resize", *args, "--rank", "2", "--overwrite",
                     words=("input", "not one"))
        assert tree_hash(str(root)) == before


def test_dry_run_refuses_what_the_run_would(proj, capsys, tmp_path):
    """A dry run says the output aliases an input (before any report), in one line, -q or not."""
    base, lora = proj / "base", proj / "lora"
    _refused(capsys, proj, "merge", base, lora, "-o", base, "--dry-run", "-q")
    _refused(capsys, proj, "merge", base, lora, "-o", proj / "p2" / ".." / "lora", "--dry-run")
    _refused(capsys, proj, "resize", lora, "--rank", "2", "-o", lora, "--dry-run")
    _refused(capsys, proj, "convert", lora, "--to", "peft", "-o", lora, "--dry-run", "--format", "json")
    _refused(capsys, proj, "blend", lora, lora, "-m", "cat", "-o", lora, "--dry-run")
    tuned = shutil.copytree(base, tmp_path / "tuned")
    _refused(capsys, proj, "extract", base, tuned, "--rank", "2", "-o", base / "x", "--dry-run")


def test_convert_base_is_an_input(proj, capsys):
    """`--base` is read (names, shapes): the output may not replace it or lie inside it."""
    _refused(capsys, proj, "convert", proj / "lora", "--to", "peft", "--base", proj / "base",
             "-o", proj / "base" / "sub", "--overwrite")
