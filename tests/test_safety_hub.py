"""Hub revisions and subfolders cannot name paths outside the cache (issue 11 §5), on the fake Hub."""
from __future__ import annotations

import os

import pytest

from _tiny import peft_adapter, run_cli, tiny_llama
from loratools import refs
from loratools.errors import UsageError


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubsafety")
    peft_adapter(tiny_llama(), str(root / "a"))
    return root / "a"


def _all_files(top):
    return sorted(os.path.relpath(os.path.join(d, f), top) for d, _, fs in os.walk(top) for f in fs)


@pytest.mark.parametrize("args", [
    ["alice/rev@..%2F..%2F..%2Fx"],
    ["hf://alice/rev@..%2F..%2F..%2Fx"],
    ["alice/rev", "--revision", "../../../x"],
    ["alice/rev", "--revision", "/etc/x"],
    ["alice/rev", "--revision", "main/../../x"],
    ["alice/rev", "--revision", "ma\nin"],
    ["alice/rev@%2E%2E"],
    ["hf://alice/rev/sub/../../x"],
    ["hf://alice/rev/sub\nx"],
])
def test_revision_and_subfolder_traversal_is_refused(fake_hub, adapter, tmp_path, capsys, args):
    files = {n: open(adapter / n, "rb").read() for n in os.listdir(adapter)}
    fake_hub.commit("alice/rev", files)
    outside = tmp_path / "sandbox"
    outside.mkdir()
    before_home = _all_files(fake_hub.home) if fake_hub.home.exists() else []
    code, _, err = run_cli(capsys, "pull", *args, "-o", outside / "D")
    assert code == 2 and err.count("\n") == 1 and "invalid" in err, err
    assert os.listdir(outside) == [] and fake_hub.downloads() == []
    after_home = _all_files(fake_hub.home) if fake_hub.home.exists() else []
    assert after_home == before_home
    assert not any(p.name == "x" for p in tmp_path.rglob("x"))


def test_ordinary_revisions_still_work(fake_hub, adapter, tmp_path, capsys):
    files = {n: open(adapter / n, "rb").read() for n in os.listdir(adapter)}
    fake_hub.commit("alice/rev", files)
    fake_hub.commit("alice/rev", files, branch="feature/x")
    for ref in ("alice/rev@main", "hf://alice/rev@feature%2Fx"):
        out = tmp_path / ref.replace("/", "_").replace(":", "").replace("@", "_").replace("%", "")
        code, _, err = run_cli(capsys, "pull", ref, "-o", out)
        assert code == 0, err
        assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    for good in ("v1.0", "refs/pr/3", "feature/x", "a" * 40):
        assert refs.HubRef("alice/rev", good).revision == good
    for bad in ("..", "a/..", "/x", "x/", "a//b", "a\\b", "a\x00b", "a~1", "a:b"):
        with pytest.raises(UsageError):
            refs.HubRef("alice/rev", bad)


@pytest.mark.parametrize("revision", ["../x", "main/../../x", "/etc", "a\nb", "v1:x"])
def test_push_revision_is_validated_like_pull(adapter, capsys, revision):
    """A branch to push to is checked as a pulled revision is, dry run included (no network)."""
    code, _, err = run_cli(capsys, "push", adapter, "alice/x", "--revision", revision, "--dry-run")
    assert code == 2 and err.count("\n") == 1 and "invalid revision" in err, err
