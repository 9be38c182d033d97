"""A corpus of malformed inputs run through every command that takes them.

Each input is built at test time and has a level that says which commands must refuse it:
  unreadable       every command (it cannot be read)
  invalid          every command but `inspect` (readable, but NaN/Inf, no modules, integer factors …)
  suspicious       `validate` only (well-formed but unusual: huge or zero scale)
  suspicious-base  `validate --base` only (an update larger than the base weight)
  base-mismatch    commands that take a base (adapter for another model)
  unresolved       commands that need real module names (a kohya name no known model has): not
                   `inspect`, `resize` nor `validate` without --base (a warning: fails with --strict)
  bad-base         commands given this as the BASE
A run must exit non-zero with exactly one line on stderr, `loratools: error: …` (a known error,
not the catch-all for unexpected exceptions), no traceback,
leave nothing in the output folder (no output, no temporaries) and change no input.
Adding a command means adding its templates to TEMPLATES.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile

import pytest
import torch

from _corpus import Good, adapter_cases, base_cases, tree_hash, unprivileged
from benchmarks._models import make_llama, make_peft_adapter
from loratools.cli.main import COMMANDS, main

# command -> [(argument template, levels of adapter inputs it must refuse)]; {IN} is the malformed input
ALL = {"unreadable", "invalid", "suspicious", "suspicious-base", "base-mismatch", "unresolved"}
WRITES = {"unreadable", "invalid"}
NAMED = WRITES | {"unresolved"}  # commands that need real module names
TEMPLATES = {
    "merge": [("merge {BASE} {IN} -o {OUT}", {"unreadable", "invalid", "base-mismatch", "unresolved"}),
              ("merge {IN} {GOOD} -o {OUT}", {"bad-base"})],
    "validate": [("validate {IN}", WRITES),  # warnings alone do not fail validate
                 ("validate {IN} --strict", {"unreadable", "invalid", "suspicious", "unresolved"}),
                 ("validate {IN} --base {BASE}", ALL - {"suspicious", "suspicious-base"}),
                 ("validate {IN} --base {BASE} --strict", ALL),
                 ("validate {GOOD} --base {IN}", {"bad-base"})],
    "inspect": [("inspect {IN}", {"unreadable"})],
    "blend": [("blend {IN} {GOOD} -o {OUT} --method cat", NAMED)],
    "resize": [("resize {IN} -o {OUT} --rank 2", WRITES)],
    "convert": [("convert {IN} -o {OUT} --to peft", NAMED)],
    "push": [("push {IN} alice/corpus --dry-run", NAMED)],
    "extract": [("extract {IN} {BASE} -o {OUT} --rank 2", {"bad-base"}),  # a broken model as BASE or TUNED
                ("extract {BASE} {IN} -o {OUT} --rank 2", {"bad-base"})],
    "pull": [],  # takes a Hub reference, not a local input: see test_pull_refuses_malformed_adapters
    "ls": [],  # lists a malformed input with its reason instead of refusing: see test_ls_lists_malformed_inputs
    "compat": [("compat {GOOD} --base {IN}", {"bad-base"})],
}
LEVELS = ALL | {"bad-base"}


# ---------------------------------------------------------------- fixtures and checks

@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """A path that does not exist may be read as a Hub reference: never go online for it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture(scope="module")
def root():
    # a world-readable tree so the "unreadable" cases can run as an unprivileged user when we are root
    path = tempfile.mkdtemp(prefix="loratools-corpus-")
    os.chmod(path, 0o755)
    make_llama(os.path.join(path, "base"), dtype=torch.float32, shard_bytes=20_000, hidden=32, intermediate=48,
               layers=2, vocab=96, heads=4, kv_heads=2)
    make_peft_adapter(os.path.join(path, "good"), os.path.join(path, "base"), rank=4, targets=("q_proj", "v_proj"),
                      dtype=torch.float32)
    good = Good(os.path.join(path, "good"))
    os.makedirs(os.path.join(path, "in"))
    for name, (_level, build) in adapter_cases().items():
        made = build(os.path.join(path, "in", name), good)
        if made != os.path.join(path, "in", name):  # single files carry their suffix: note where
            with open(os.path.join(path, "in", name + ".where"), "w") as f:
                f.write(made)
    for name, build in base_cases().items():
        build(os.path.join(path, "in", name), path)
    for name in ("unreadable_weights", "unreadable_config"):  # mode 000 files
        d = shutil.copytree(os.path.join(path, "good"), os.path.join(path, "in", name))
        os.chmod(os.path.join(d, "adapter_model.safetensors" if name == "unreadable_weights" else "adapter_config.json"), 0)
    for m in set(COMMANDS.values()):  # import now: an unprivileged user may not write bytecode later
        importlib.import_module(f"loratools.cli.{m}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def input_path(root, name) -> str:
    inp = os.path.join(root, "in", name)
    if os.path.exists(inp + ".where"):
        with open(inp + ".where") as f:
            return f.read()
    return inp


def run_refused(capsys, root, template, name, as_user=False):
    inp = input_path(root, name)
    out_dir = tempfile.mkdtemp(dir=root, prefix="out-")
    os.chmod(out_dir, 0o777)
    out = os.path.join(out_dir, "result")
    argv = template.format(IN=inp, OUT=out, BASE=os.path.join(root, "base"), GOOD=os.path.join(root, "good")).split()
    watched = [inp, os.path.join(root, "base"), os.path.join(root, "good")]
    before = [tree_hash(p) for p in watched]
    capsys.readouterr()
    with unprivileged(as_user):
        code = main(argv)
    stdout, stderr = capsys.readouterr()
    where = f"`loratools {' '.join(argv)}`"
    assert code != 0, f"{where} succeeded on a malformed input; stdout: {stdout[:300]}"
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratools: error: "), f"{where}: stderr {stderr!r}"
    assert "Traceback" not in stdout + stderr
    assert "LORATOOLS_DEBUG" not in stderr, f"{where}: an unexpected error, not a known one: {stderr!r}"
    assert os.listdir(out_dir) == [], f"{where} left {os.listdir(out_dir)}"
    assert [tree_hash(p) for p in watched] == before, f"{where} changed an input"
    assert not os.path.exists(inp + ".PWNED"), "a pickle was unpickled without weights_only"
    shutil.rmtree(out_dir)
    return stderr


def _params():
    adapter_levels = {name: level for name, (level, _) in adapter_cases().items()}
    adapter_levels.update(unreadable_weights="unreadable", unreadable_config="unreadable")
    params = []
    for command, templates in sorted(TEMPLATES.items()):
        if command not in COMMANDS:  # not in this build (yet): test_every_command_has_templates covers the reverse
            continue
        for template, levels in templates:
            if "bad-base" in levels:
                names = sorted(base_cases())
            else:
                names = sorted(n for n, lv in adapter_levels.items() if lv in levels)
            for name in names:
                params.append(pytest.param(command, template, name, id=f"{template.split()[0]}"
                                           f"{'-base' if '--base' in template else ''}"
                                           f"{'-strict' if '--strict' in template else ''}-{name}"))
    return params


def test_corpus_is_big_enough():
    assert len(adapter_cases()) + len(base_cases()) + 2 >= 30


def test_ls_lists_malformed_inputs(capsys, root):
    """`ls` and `compat` over the whole corpus: every input is a row, the unreadable ones with their
    reason; exit 0, no traceback, nothing changed."""
    folder = os.path.join(root, "in")
    before = tree_hash(folder)
    for argv in (["ls", folder, "--format", "json"], ["compat", folder, "--base", os.path.join(root, "base"),
                                                       "--format", "json"]):
        capsys.readouterr()
        code = main(argv)
        stdout, stderr = capsys.readouterr()
        assert code == (0 if argv[0] == "ls" else 1) and "Traceback" not in stdout + stderr, stderr
        rows = json.loads(stdout)["adapters"]
        assert len(rows) >= len(adapter_cases()) // 2
        assert any(r.get("error") or r.get("problem") for r in rows)
    assert tree_hash(folder) == before


def test_every_command_has_templates():
    """A new command must say how it takes a malformed input (add it to TEMPLATES)."""
    assert set(COMMANDS) <= set(TEMPLATES), f"no corpus templates for {sorted(set(COMMANDS) - set(TEMPLATES))}"


@pytest.mark.parametrize("command,template,name", _params())
def test_malformed_input_is_refused(capsys, root, command, template, name):
    run_refused(capsys, root, template, name, as_user=name.startswith("unreadable_"))


@pytest.mark.parametrize("name", ["nan_in_A", "huge_alpha", "update_larger_than_weight", "other_architecture",
                                  "kohya_nan_up", "kohya_huge_alpha", "diffusers_inf_A", "kohya_unknown_module"])
def test_clean_reading_commands_accept_what_they_should(capsys, root, name):
    """The levels are not vacuous: inspect reads an adapter with NaN; merge takes a suspicious one."""
    capsys.readouterr()
    code = main(["inspect", input_path(root, name), "--summary"])
    out, err = capsys.readouterr()
    assert code == 0, err
    if name in ("nan_in_A", "kohya_nan_up", "diffusers_inf_A"):
        assert "problems    1" in out and "NaN or Inf" in out
    if name.startswith(("kohya", "diffusers")):
        assert f"format      {name.split('_')[0]}" in out
    if name in ("huge_alpha", "update_larger_than_weight"):
        out_dir = tempfile.mkdtemp(dir=root)
        code = main(["merge", os.path.join(root, "base"), input_path(root, name), "-o", out_dir + "/m", "-q"])
        assert code == 0, capsys.readouterr().err
        shutil.rmtree(out_dir)


def test_messages_say_what_is_wrong(capsys, root):
    msg = lambda t, n: run_refused(capsys, root, t, n)  # noqa: E731
    assert "header length" in msg("inspect {IN}", "st_header_length_beyond_file")
    assert "overlap" in msg("inspect {IN}", "st_overlapping_offsets")
    assert "unknown dtype" in msg("inspect {IN}", "st_unknown_dtype")
    assert "do not match shape" in msg("inspect {IN}", "st_bytes_do_not_match_shape")
    assert "rank mismatch" in msg("inspect {IN}", "rank_mismatch")
    assert "NaN or Inf" in msg("merge {BASE} {IN} -o {OUT}", "inf_in_B")
    assert "the config says 8" in msg("inspect {IN}", "config_rank_disagrees")
    assert "match no weight in the base" in msg("merge {BASE} {IN} -o {OUT}", "other_architecture")
    assert "cannot be loaded safely" in msg("inspect {IN}", "bin_malicious_pickle")
    assert "Permission denied" in run_refused(capsys, root, "inspect {IN}", "unreadable_weights", as_user=True)
    assert "no such file" in msg("merge {IN} {GOOD} -o {OUT}", "base_missing")


PULLED = ["st_truncated_data", "st_header_length_beyond_file", "rank_mismatch", "nan_in_A", "config_not_json",
          "no_tensors", "bin_malicious_pickle", "kohya_nan_up", "kohya_rank_mismatch", "diffusers_metadata_bad_alpha"]


def test_pull_refuses_malformed_adapters(root, fake_hub, capsys):
    """A malformed adapter on the Hub: `pull -o OUT` exits non-zero on one line and writes no OUT."""
    assert os.environ["HF_ENDPOINT"] == fake_hub.url  # the fake_hub fixture overrides `offline`
    for name in PULLED:
        src = input_path(root, name)
        if os.path.isdir(src):
            files = {f: open(os.path.join(src, f), "rb").read() for f in os.listdir(src)}
        else:
            files = {os.path.basename(src): open(src, "rb").read()}
        repo = "alice/" + name.replace("_", "-")
        fake_hub.add_repo(repo)
        fake_hub.commit(repo, files)
        out_dir = tempfile.mkdtemp(dir=root, prefix="pull-")
        capsys.readouterr()
        code = main(["pull", repo, "-o", os.path.join(out_dir, "got")])
        err = capsys.readouterr().err
        assert code != 0 and err.count("\n") == 1 and err.startswith("loratools: error: "), (name, err)
        assert "LORATOOLS_DEBUG" not in err and os.listdir(out_dir) == [], (name, err, os.listdir(out_dir))
        assert not os.path.exists(src + ".PWNED")
