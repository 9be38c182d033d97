"""A collection of adapters: `ls` (rows from headers only, filters, sorts, JSON/CSV, unreadable
files, duplicates by sd-scripts' sshs_model_hash), `compat` against PEFT loading the adapters,
and the batch forms of convert / validate / inspect / resize against their single-input runs."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import struct

import pytest

from _collection import make_collection, sd1_kohya
from _tiny import foreign_adapters, peft_adapter, run_cli, save_base, tiny_llama
from loratools import safetensors_io
from loratools.collection import expand, walk
from loratools.formats import read_adapter
from loratools.inspection import report


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("coll")
    return root, make_collection(root)


def ls_json(capsys, *args):
    code, out, err = run_cli(capsys, "ls", *args, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def test_ls_rows_match_a_full_read(coll, capsys):
    root, paths = coll
    doc = ls_json(capsys, root)
    rows = {r["path"]: r for r in doc["adapters"]}
    assert set(rows) == {str(p) for p in paths.values()}
    assert rows[paths["corrupt"]]["error"].startswith("not a valid safetensors file")
    for name, path in paths.items():
        if name == "corrupt":
            continue
        full = report(read_adapter(path), path=path, norms=False)  # reads every tensor
        row = rows[path]
        assert row["format"] == full["format"]
        assert row["family"] == (full["family"]["name"] if full["family"] else None)
        assert row["ranks"] == sorted({r["rank"] for r in full["module_list"]})
        assert row["alphas"] == sorted({r["alpha"] for r in full["module_list"]})
        assert row["dora"] == full["dora"]
        assert row["modules"] == full["modules"]
        assert row["targets"] == sorted(full["targets"])
        assert row["dtype"] in full["dtypes"]
        assert row["size"] == full["disk_bytes"]
        # the same loaders as inspect's "loads in" line (tested against PEFT/diffusers in test_loaders)
        assert row["loads_in"] == [k for k, v in full["loads_in"].items() if v["ok"]]
    assert rows[paths["sd1"]]["family"] == "SD 1.x" and rows[paths["sdxl"]]["family"] == "SDXL"
    assert rows[paths["flux"]]["family"] == "Flux"
    assert rows[paths["peft"]]["base"] == "meta-llama/Llama-3.2-1B"
    assert rows[paths["dora"]]["dora"] is True
    assert "ComfyUI" in rows[paths["sd1"]]["loads_in"] and "PEFT" in rows[paths["peft"]]["loads_in"]


def test_ls_reads_no_tensor_data_but_scalars(coll, capsys, monkeypatch):
    root, paths = coll
    read = []
    original = safetensors_io.SafetensorsFile.read

    def counting(self, name, scratch=None):
        t = original(self, name, scratch)
        read.append(t.numel())
        return t
    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", counting)
    loaded = []
    original_load = safetensors_io.load

    def checked_load(path):
        tensors, meta = original_load(path)
        loaded.append(path)
        assert all(t.is_meta for t in tensors.values() if t.numel() > 1), path
        return tensors, meta
    monkeypatch.setattr(safetensors_io, "load", checked_load)
    ls_json(capsys, paths["sd1"], paths["peft"], paths["flux"])
    assert len(loaded) == 3
    assert read and max(read) == 1  # the kohya alphas only


def test_ls_filters_sorts_and_csv(coll, capsys):
    root, paths = coll
    sd1 = ls_json(capsys, root, "--family", "sd1")["adapters"]
    assert {r["path"] for r in sd1} == {paths["sd1"], paths["dup"], paths["sd1_small"], paths["corrupt"]}
    assert [r["path"] for r in ls_json(capsys, root, "--family", "SDXL")["adapters"]
            if not r["error"]] == [paths["sdxl"]]
    llama = [r["path"] for r in ls_json(capsys, root, "--base", "LLAMA")["adapters"] if not r["error"]]
    assert sorted(llama) == sorted([paths["peft"], paths["dora"]])
    by_size = [r["size"] for r in ls_json(capsys, root, "--sort", "size")["adapters"] if not r["error"]]
    assert by_size == sorted(by_size)
    code, out, _ = run_cli(capsys, "ls", root, "--format", "csv", "--sort", "rank")
    assert code == 0
    table = list(csv.DictReader(io.StringIO(out)))
    assert len(table) == len(paths) and table[0]["path"] == paths["corrupt"]  # no rank sorts first
    assert [t for t in table if t["path"] == paths["sdxl"]][0]["rank"] == "16"
    code, out, err = run_cli(capsys, "ls", root)
    assert code == 0 and f"unreadable: {paths['corrupt']}: not a valid safetensors file" in out
    assert "7 adapter(s), 1 unreadable" in err


def sshs_model_hash(path):
    """sd-scripts `addnet_hash_safetensors`: sha256 of the bytes after the header."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()


def test_duplicates_by_tensor_content(coll, capsys):
    root, paths = coll
    doc = ls_json(capsys, root, "--duplicates")
    assert doc["duplicates"] == [sorted([paths["sd1"], paths["dup"]])]
    rows = {r["path"]: r for r in doc["adapters"]}
    # the hash is sd-scripts' own, and equals what the kohya writer (via safetensors) stored
    assert rows[paths["sd1"]]["hash"] == sshs_model_hash(paths["sd1"])
    with safetensors_io.SafetensorsFile(paths["sd1"]) as f:
        assert rows[paths["sd1"]]["hash"] == f.metadata["sshs_model_hash"]
    assert len({r["hash"] for r in rows.values() if r["hash"]}) == len(paths) - 2
    code, out, _ = run_cli(capsys, "ls", root, "--duplicates")
    assert code == 0 and "duplicates (" in out


def test_walk_stays_in_the_tree_and_is_bounded(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    sd1_kohya(str(outside / "far.safetensors"))
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    sd1_kohya(str(tree / "sub" / "near.safetensors"))
    os.symlink(outside, tree / "link")
    (tree / ".hidden").mkdir()
    sd1_kohya(str(tree / ".hidden" / "x.safetensors"))
    assert walk(str(tree)) == [str(tree / "sub" / "near.safetensors")]
    code, _, err = run_cli(capsys, "ls", tree, "--max-entries", "2")
    assert code == 2 and "more than 2 folder entries" in err and len(err.strip().splitlines()) == 1
    entries = expand([str(tree / "nothing*"), str(tree / "absent"), str(tree / "**" / "*.safetensors")])
    assert [(e.path, e.error) for e in entries] == [
        (str(tree / "nothing*"), "no file or folder matches this pattern"),
        (str(tree / "absent"), "no such file or folder"),
        (str(tree / "sub" / "near.safetensors"), None)]


@pytest.fixture(scope="module")
def llama_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama()
    save_base(base, str(root / "base"))
    peft_adapter(base, str(root / "adapters" / "fits"))
    peft_adapter(base, str(root / "adapters" / "mlp"), target_modules=["up_proj", "down_proj"])
    foreign_adapters(root / "adapters")
    return root, base


def peft_loads(base, folder) -> bool:
    """The oracle: does PEFT load the adapter onto the model without error?"""
    import copy

    from peft import PeftModel
    try:
        PeftModel.from_pretrained(copy.deepcopy(base), folder)
        return True
    except (RuntimeError, ValueError, KeyError):
        return False


def test_compat_agrees_with_peft(llama_world, capsys, monkeypatch):
    pytest.importorskip("peft")
    root, base = llama_world
    adapters = root / "adapters"
    reads = []
    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", lambda self, n, s=None: reads.append(n))
    code, out, err = run_cli(capsys, "compat", adapters, "--base", root / "base", "--format", "json")
    monkeypatch.undo()
    assert code == 1 and "2 of 4 adapter(s) do not fit" in err, err
    assert reads == []  # headers only, adapter and base
    fits = {os.path.basename(f["path"]): f for f in json.loads(out)["adapters"]}
    assert set(fits) == {"fits", "mlp", "wrong_shape", "gpt2"}
    for name, f in fits.items():
        assert f["fits"] == peft_loads(base, str(adapters / name)), name
    assert fits["wrong_shape"]["problem"] and "shape" in fits["wrong_shape"]["problem"]
    assert fits["fits"]["matched"] == fits["fits"]["modules"] == 4
    code, out, err = run_cli(capsys, "compat", adapters / "fits", adapters / "gpt2", "--base", root / "base")
    assert code == 1 and "1 of 2 adapter(s) do not fit" in err and "gpt2" in out
    code, out, err = run_cli(capsys, "compat", adapters / "fits", "--base", root / "base")
    assert code == 0 and "all 1 adapter(s) fit" in err


def test_batch_convert_matches_single_runs(coll, tmp_path, capsys):
    root, paths = coll
    inputs = [paths["sd1"], paths["sdxl"], paths["corrupt"], paths["sd1_small"]]
    code, out, err = run_cli(capsys, "convert", *inputs, "--to", "diffusers", "-o", tmp_path / "out")
    assert code == 1
    assert "1 of 4 input(s) failed" in err and "not a valid safetensors file" in err
    written = sorted(os.listdir(tmp_path / "out"))
    assert written == ["small.safetensors", "style.safetensors", "xl_te.safetensors"]
    for p in (paths["sd1"], paths["sdxl"], paths["sd1_small"]):
        single = tmp_path / ("single_" + os.path.basename(p))
        assert run_cli(capsys, "convert", p, "--to", "diffusers", "-o", single)[0] == 0
        name = os.path.basename(p)
        assert (tmp_path / "out" / name).read_bytes() == single.read_bytes()


def test_batch_convert_jobs_dry_run_and_refusals(coll, tmp_path, capsys):
    root, paths = coll
    sd1 = os.path.dirname(paths["sd1"])
    # kohya SD files hold pipeline components: PEFT takes them as peft_diffusion (one folder per component)
    code, out, err = run_cli(capsys, "convert", sd1, "--to", "peft_diffusion", "-o", tmp_path / "dry", "--dry-run")
    assert code == 0 and not os.path.exists(tmp_path / "dry")
    assert str(tmp_path / "dry" / "style_copy") in out and "nothing was written" in err
    code, out, err = run_cli(capsys, "convert", sd1, "--to", "peft_diffusion", "-o", tmp_path / "par", "--jobs", "2",
                             "--format", "json")
    assert code == 0, err
    docs = json.loads(out)
    assert [d["ok"] for d in docs] == [True] * 3 and all(d["report"]["to"] == "peft_diffusion" for d in docs)
    for d in docs:
        assert read_adapter(d["output"]).ranks == read_adapter(d["input"]).ranks
    twin = tmp_path / "twin"
    twin.mkdir()
    sd1_kohya(str(twin / "style.safetensors"))
    code, _, err = run_cli(capsys, "convert", paths["sd1"], twin / "style.safetensors", "--to", "kohya",
                           "-o", tmp_path / "clash")
    assert code == 2 and "would both be written" in err and not os.path.exists(tmp_path / "clash")
    code, _, err = run_cli(capsys, "resize", twin, paths["sdxl"], "--rank", "1", "-o", twin, "--overwrite")
    assert code == 2 and "is also an input" in err


def test_batch_validate_inspect_resize(coll, tmp_path, capsys):
    root, paths = coll
    code, out, err = run_cli(capsys, "validate", root)
    assert code == 1 and "1 of 8 input(s) failed" in err
    assert sum(line.split()[1] == "ok" for line in err.splitlines() if line.startswith(str(root))) == 7
    code, out, err = run_cli(capsys, "inspect", paths["sd1"], paths["peft"], "--format", "json", "--summary")
    assert code == 0
    reps = json.loads(out)
    assert [r["report"]["format"] for r in reps] == ["kohya", "peft"]
    code, out, err = run_cli(capsys, "resize", paths["sd1"], paths["peft"], "--rank", "2", "-o", tmp_path / "r")
    assert code == 0, err
    assert read_adapter(str(tmp_path / "r" / "style.safetensors")).ranks == [2, 2]
    assert read_adapter(str(tmp_path / "r" / "chat")).format == "peft"
    code, _, err = run_cli(capsys, "resize", paths["sd1"], paths["peft"], "--rank", "2", "-o", tmp_path / "p",
                           "--plot", tmp_path / "x.png")
    assert code == 2 and "--plot takes one input" in err
    # one input keeps the single-input behaviour (an output file, not a folder)
    code, _, _ = run_cli(capsys, "resize", paths["sd1"], "--rank", "2", "-o", tmp_path / "one.safetensors")
    assert code == 0
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "r" / "style.safetensors").read_bytes()
