"""Hugging Face Hub: references everywhere, push, pull, merge --push and the one-line errors.

Everything goes through the real `huggingface_hub` client against the local fake Hub in
tests/hub_server.py (fixture `fake_hub` in conftest.py); nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from _tiny import peft_adapter, run_cli as run, tiny_llama, tiny_project
from loratools import refs, share
from loratools.errors import HubError, UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root, model = tiny_project(tmp_path_factory, "hub")
    peft_adapter(model, str(root / "b"), seed=7, target_modules=["up_proj"])
    peft_adapter(model, str(root / "c"), seed=9)
    return root


def folder_bytes(folder, names=None):
    names = names or sorted(os.listdir(folder))
    return {n: open(os.path.join(folder, n), "rb").read() for n in names}


def seed_folder(fake_hub, repo_id, folder, prefix="", extra=None, branch="main"):
    files = {prefix + n: b for n, b in folder_bytes(folder).items() if n != "README.md"}
    return fake_hub.commit(repo_id, dict(files, **(extra or {})), branch=branch)


ADAPTER = ["adapter_config.json", "adapter_model.safetensors"]


# ---- references ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,repo,rev,sub", [
    ("user/repo", "user/repo", None, ""),
    ("user/repo@v1", "user/repo", "v1", ""),
    ("user/repo/sub/dir", "user/repo", None, "sub/dir"),
    ("user/repo@v1/sub", "user/repo", "v1", "sub"),
    ("user/repo/sub@v1", "user/repo", "v1", "sub"),
    ("hf://user/repo@refs/pr/3/sub", "user/repo", "refs/pr/3", "sub"),
    ("hf://user/repo@feature%2Fx", "user/repo", "feature/x", ""),
    ("hf://user/my.repo-2/lora.safetensors", "user/my.repo-2", None, "lora.safetensors"),
])
def test_parse_ref(text, repo, rev, sub):
    ref = refs.parse_ref(text)
    assert (ref.repo_id, ref.revision, ref.subfolder) == (repo, rev, sub)
    assert refs.parse_ref(refs.PREFIX + str(ref)) == ref  # str() round-trips, quoting odd revisions


def test_local_paths_are_not_refs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("models/x")
    for text in ["models/x", "models/missing", "./user/repo", "/abs/user/repo", "single", "a/b@c@d", "a/../b"]:
        assert refs.parse_ref(text) is None, text
        assert share.local_path(text) == text
    with pytest.raises(UsageError):
        refs.parse_ref("hf://just-a-name")


# ---- push and pull ---------------------------------------------------------------------------------
def test_push_then_pull_round_trips_bit_for_bit(fake_hub, local, tmp_path, capsys, monkeypatch):
    from huggingface_hub import ModelCard
    from peft import PeftModel

    monkeypatch.setenv("HF_TOKEN", "hf_alice")
    code, _, err = run(capsys, "push", local / "a", "alice/lora", "--base-model", "alice/tiny-llama",
                       "--commit-message", "first")
    assert code == 0, err
    assert [p for m, p in fake_hub.requests if p.endswith("/commit/main")] == ["/api/models/alice/lora/commit/main"]
    stored = fake_hub.files("alice/lora")
    assert sorted(stored) == [".gitattributes", "README.md"] + ADAPTER
    card = ModelCard(stored["README.md"].decode())
    assert card.data.base_model == "alice/tiny-llama" and card.data.library_name == "peft"
    assert {"lora", "base_model:adapter:alice/tiny-llama"} <= set(card.data.tags)

    code, out, err = run(capsys, "pull", "alice/lora", "-o", tmp_path / "pulled")
    assert code == 0, err
    assert folder_bytes(tmp_path / "pulled") == folder_bytes(local / "a", ADAPTER)
    assert "peft adapter, 4 module(s), rank 4" in err
    # the oracle: PEFT loads what came back and computes what the original adapter computes
    base = tiny_llama()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    want = PeftModel.from_pretrained(tiny_llama(), str(local / "a")).eval()(ids).logits
    got = PeftModel.from_pretrained(base, str(tmp_path / "pulled")).eval()(ids).logits
    assert torch.equal(got, want)

    # no -o: the files stay in the HF_HOME cache, and only the adapter's files were fetched
    fake_hub.requests.clear()
    code, out, _ = run(capsys, "pull", "alice/lora", "--format", "json")
    info = json.loads(out)
    assert info["path"].startswith(str(fake_hub.home)) and info["format"] == "peft" and info["ranks"] == [4]
    assert info["commit"] == fake_hub.repos["alice/lora"].refs["main"]


def test_revisions_subfolders_and_pull_requests(fake_hub, local, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_alice")
    assert run(capsys, "push", local / "a", "alice/lora")[0] == 0
    first = fake_hub.repos["alice/lora"].refs["main"]
    assert run(capsys, "push", local / "b", "alice/lora", "--revision", "dev")[0] == 0
    assert run(capsys, "push", local / "c", "alice/lora", "--create-pr")[0] == 0
    assert fake_hub.repos["alice/lora"].refs["main"] == first  # the PR did not touch main
    seed_folder(fake_hub, "alice/lora", local / "b", prefix="nested/b/", branch="dev")
    for ref, want in [("alice/lora", "a"), ("alice/lora@dev", "b"), (f"alice/lora@{first}", "a"),
                      ("hf://alice/lora@refs/pr/1", "c"), ("alice/lora@dev/nested/b", "b"),
                      ("alice/lora/nested/b@dev", "b")]:
        out = tmp_path / want / str(abs(hash(ref)))
        code, _, err = run(capsys, "pull", ref, "-o", out)
        assert code == 0, (ref, err)
        assert folder_bytes(out) == folder_bytes(local / want, ADAPTER), ref
    code, _, err = run(capsys, "pull", "alice/lora", "--revision", "dev", "-o", tmp_path / "opt")
    assert code == 0 and folder_bytes(tmp_path / "opt") == folder_bytes(local / "b", ADAPTER)
    # an adapter given as a Hub reference can be pushed elsewhere too
    assert run(capsys, "push", "alice/lora@dev/nested/b", "alice/copy")[0] == 0
    assert {k: v for k, v in fake_hub.files("alice/copy").items() if k in ADAPTER} == folder_bytes(local / "b", ADAPTER)


def test_hub_references_everywhere_and_only_needed_files(fake_hub, local, tmp_path, capsys):
    """merge takes Hub references for the base and the adapters; only config + weights are fetched."""
    junk = {"pytorch_model.bin": b"pickle" * 100, "onnx/model.onnx": b"onnx", "original/consolidated.safetensors": b"x"}
    seed_folder(fake_hub, "alice/tiny-llama", local / "base", extra=junk)
    seed_folder(fake_hub, "alice/loras", local / "a", prefix="adapters/a/",
                extra={"adapters/a/training_args.bin": b"t", "adapters/a/checkpoint-10/adapter_model.safetensors": b"c",
                       "adapters/a/optimizer.pt": b"o" * 1000})
    seed_folder(fake_hub, "alice/loras", local / "b")
    code, _, err = run(capsys, "merge", "alice/tiny-llama", "alice/loras/adapters/a", "hf://alice/loras",
                       "-w", "0.5", "-w", "1", "-o", tmp_path / "from_hub", "-q")
    assert code == 0, err
    assert sorted(fake_hub.downloads()) == [
        "alice/loras/adapter_config.json", "alice/loras/adapter_model.safetensors",
        "alice/loras/adapters/a/adapter_config.json", "alice/loras/adapters/a/adapter_model.safetensors",
        "alice/tiny-llama/config.json", "alice/tiny-llama/generation_config.json", "alice/tiny-llama/model.safetensors"]
    assert run(capsys, "merge", local / "base", local / "a", local / "b", "-w", "0.5", "-w", "1",
               "-o", tmp_path / "from_disk", "-q")[0] == 0
    assert folder_bytes(tmp_path / "from_hub") == folder_bytes(tmp_path / "from_disk")
    # and the result is what PEFT computes (oracle), for the first adapter alone
    from peft import PeftModel

    assert run(capsys, "merge", "hf://alice/tiny-llama@main", "alice/loras@main/adapters/a", "-o", tmp_path / "one",
               "-q")[0] == 0
    want = PeftModel.from_pretrained(tiny_llama(), str(local / "a")).merge_and_unload().state_dict()
    got = load_file(tmp_path / "one" / "model.safetensors")
    assert all(torch.allclose(got[k], want[k], atol=1e-6, rtol=0) for k in got)


def test_single_file_repositories(fake_hub):
    fake_hub.commit("alice/style", {"style.safetensors": b"s" * 64, "README.md": b"hi", "sub/other.safetensors": b"o"})
    path = share.local_path("alice/style")
    assert path.endswith("style.safetensors") and open(path, "rb").read() == b"s" * 64
    assert share.local_path("alice/style/sub/other.safetensors").endswith("sub/other.safetensors")
    fake_hub.commit("alice/many", {"e1.safetensors": b"1", "e2.safetensors": b"2"})
    with pytest.raises(HubError, match="several .safetensors files; name one, e.g. alice/many/e1.safetensors"):
        share.local_path("alice/many")
    with pytest.raises(HubError, match="no LoRA adapter found"):
        share.local_path("alice/style/nothing-here")


def test_dry_run_uploads_nothing(fake_hub, local, capsys):
    code, out, err = run(capsys, "push", local / "a", "alice/dry", "--dry-run", "--format", "json")
    assert code == 0, err
    info = json.loads(out)
    assert [f["path"] for f in info["files"]] == ADAPTER + ["README.md"]
    assert "library_name: peft" in info["model_card"] and info["dry_run"] is True
    assert fake_hub.requests == [] and "alice/dry" not in fake_hub.repos


def test_private_push_and_non_finite_adapter(fake_hub, local, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_alice")
    assert run(capsys, "push", local / "a", "alice/secret", "--private")[0] == 0
    assert fake_hub.repos["alice/secret"].private
    assert run(capsys, "pull", "alice/secret", "-o", tmp_path / "s")[0] == 0
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "other_home"))  # someone else, without the cached copy
    code, _, err = run(capsys, "pull", "alice/secret", "-o", tmp_path / "s2")
    assert code == 1 and "repository not found" in err and "HF_TOKEN" in err
    # an adapter with an Inf is refused before anything is sent
    import shutil

    shutil.copytree(local / "a", tmp_path / "bad")
    sd = load_file(tmp_path / "bad" / "adapter_model.safetensors")
    next(v for k, v in sorted(sd.items()) if "lora_B" in k)[0, 0] = float("inf")
    save_file(sd, tmp_path / "bad" / "adapter_model.safetensors")
    fake_hub.requests.clear()
    code, _, err = run(capsys, "push", tmp_path / "bad", "alice/bad")
    assert code == 1 and "NaN or Inf" in err and fake_hub.requests == []


def test_merge_push(fake_hub, local, tmp_path, capsys, monkeypatch):
    from huggingface_hub import ModelCard

    seed_folder(fake_hub, "alice/tiny-llama", local / "base")
    monkeypatch.setenv("HF_TOKEN", "hf_alice")
    code, _, err = run(capsys, "merge", "alice/tiny-llama", local / "a", "-w", "0.5", "-o", tmp_path / "m",
                       "--push", "alice/merged", "-q")
    assert code == 0, err
    stored = fake_hub.files("alice/merged")
    assert {k: v for k, v in stored.items() if k not in (".gitattributes", "README.md")} == folder_bytes(tmp_path / "m")
    card = ModelCard(stored["README.md"].decode())
    assert card.data.base_model == "alice/tiny-llama" and card.data.library_name == "transformers"
    assert "merge" in card.data.tags and "a (weight 0.5)" in card.text and str(tmp_path) not in card.text


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,args,token,message", [
    ("missing", ["pull", "alice/missing"], None, "alice/missing: repository not found on http://127.0.0.1"),
    ("gated", ["pull", "alice/gated"], None, "the repository is gated"),
    ("gated_other_user", ["pull", "alice/gated"], "hf_bob", "the repository is gated"),
    ("bad_token", ["pull", "alice/lora"], "hf_wrong_secret", "rejected the credentials (401)"),
    ("bad_revision", ["pull", "alice/lora@nope"], None, "alice/lora@nope: revision not found"),
    ("no_file", ["pull", "alice/lora/nope.safetensors"], None, "no file nope.safetensors in the repository"),
    ("push_no_token", ["push", "{a}", "alice/new"], None, "authentication required (401); set HF_TOKEN"),
    ("push_other_namespace", ["push", "{a}", "bob/new"], "hf_alice", "permission denied (403)"),
    ("bad_repo_id", ["push", "{a}", "not a repo"], "hf_alice", "is not a repository id"),
    ("merge_missing_base", ["merge", "alice/none", "{a}", "-o", "{tmp}/o"], None, "alice/none: repository not found"),
])
def test_errors_are_one_line(fake_hub, local, tmp_path, capsys, monkeypatch, case, args, token, message):
    fake_hub.add_user("bob", "hf_bob")
    seed_folder(fake_hub, "alice/lora", local / "a")
    fake_hub.add_repo("alice/gated", gated=True)
    seed_folder(fake_hub, "alice/gated", local / "a")
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    code, out, err = run(capsys, *[a.format(a=local / "a", tmp=tmp_path) for a in args])
    assert code in (1, 2) and out == ""
    assert err.startswith("loratools: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err and not (token and token in err)
    assert not os.path.exists(tmp_path / "o")


def test_network_failure(fake_hub, local, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    code, _, err = run(capsys, "pull", "alice/lora")
    assert code == 1 and err.count("\n") == 1 and "cannot reach the Hub at http://127.0.0.1:9" in err


def test_offline_mode_uses_the_cache(fake_hub, local, tmp_path, capsys, monkeypatch):
    seed_folder(fake_hub, "alice/tiny-llama", local / "base")
    seed_folder(fake_hub, "alice/lora", local / "a")
    assert run(capsys, "merge", "alice/tiny-llama", "alice/lora", "-o", tmp_path / "online", "-q")[0] == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub.requests.clear()
    assert run(capsys, "merge", "alice/tiny-llama", "alice/lora", "-o", tmp_path / "offline", "-q")[0] == 0
    assert run(capsys, "pull", "alice/lora", "-o", tmp_path / "p")[0] == 0
    assert fake_hub.requests == []
    assert folder_bytes(tmp_path / "offline") == folder_bytes(tmp_path / "online")
    code, _, err = run(capsys, "pull", "alice/lora@other")
    assert code == 1 and "HF_HUB_OFFLINE is set and it is not in the cache" in err and err.count("\n") == 1
    code, _, err = run(capsys, "push", local / "a", "alice/x")
    assert code == 1 and "cannot push while HF_HUB_OFFLINE is set" in err


def test_cli_process_reads_the_environment(fake_hub, local, tmp_path):
    """The real entry point, with the variables set before huggingface_hub is imported."""
    seed_folder(fake_hub, "alice/lora", local / "a")
    fake_hub.repos["alice/lora"].private = True  # needs the token from HF_TOKEN
    env = dict(fake_hub.env, PYTHONPATH=ROOT, HF_TOKEN="hf_alice")
    cmd = [sys.executable, "-m", "loratools"]
    r = subprocess.run(cmd + ["pull", "alice/lora", "-o", str(tmp_path / "p")], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert folder_bytes(tmp_path / "p") == folder_bytes(local / "a", ADAPTER)
    fake_hub.stop()  # offline: from the cache alone, even with the server gone
    r = subprocess.run(cmd + ["pull", "alice/lora", "--format", "json"], capture_output=True, text=True,
                       env=dict(env, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"].startswith(str(fake_hub.home))


def test_diffusion_adapters_push_and_pull(fake_hub, tmp_path, capsys, monkeypatch):
    """A PEFT pipeline folder (unet/, text_encoder/), a kohya file and a diffusers file, each round trip."""
    import _formats_models as M
    from loratools.formats import read_adapter, write_adapter

    M.peft_pipeline_lora(str(tmp_path / "sd_peft"))
    adapter = read_adapter(str(tmp_path / "sd_peft"))
    write_adapter(adapter, str(tmp_path / "style.safetensors"), format="kohya")
    write_adapter(adapter, str(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"), format="diffusers")
    monkeypatch.setenv("HF_TOKEN", "hf_alice")
    assert run(capsys, "push", tmp_path / "sd_peft", "alice/sd-peft")[0] == 0
    assert run(capsys, "push", tmp_path / "style.safetensors", "alice/sd-kohya")[0] == 0
    fake_hub.commit("alice/sd-diffusers", {"pytorch_lora_weights.safetensors":
                                           open(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors", "rb").read(),
                                           "image.png": b"png" * 1000, "other/pytorch_lora_weights.safetensors": b"x"})
    nested = [f"{c}/{n}" for c in ("text_encoder", "unet") for n in ADAPTER]
    for ref, fmt, want in [("alice/sd-peft", "peft_diffusion", {n: tmp_path / "sd_peft" / n for n in nested}),
                           ("alice/sd-kohya", "kohya", {"style.safetensors": tmp_path / "style.safetensors"}),
                           ("alice/sd-kohya/style.safetensors", "kohya",
                            {"style.safetensors": tmp_path / "style.safetensors"}),
                           ("alice/sd-diffusers", "diffusers", {"pytorch_lora_weights.safetensors":
                                                                tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"})]:
        fake_hub.fetched.clear()
        out = tmp_path / "pulled" / ref.replace("/", "_")
        monkeypatch.setenv("HF_HOME", str(out) + "_cache")  # a cold cache each time: count what is fetched
        code, stdout, err = run(capsys, "pull", ref, "-o", out, "--format", "json")
        assert code == 0, err
        assert json.loads(stdout)["format"] == fmt, ref
        assert sorted(json.loads(stdout)["files"]) == sorted(want)
        assert {n: open(out / n, "rb").read() for n in want} == {n: open(p, "rb").read() for n, p in want.items()}
        assert sorted(f.split("/", 2)[2] for f in fake_hub.downloads()) == sorted(want), ref
    # a diffusers pipeline as --base (kohya names resolved against it): only its LoRA components are fetched
    M.save_pipeline(str(tmp_path / "pipe"))
    pipe = {f"{c}/{n}": open(tmp_path / "pipe" / c / n, "rb").read()
            for c in ("unet", "text_encoder") for n in os.listdir(tmp_path / "pipe" / c)}
    junk = {"model_index.json": b"{}", "vae/config.json": b"{}", "vae/diffusion_pytorch_model.safetensors": b"v",
            "unet/diffusion_pytorch_model.fp16.safetensors": b"h", "tokenizer/vocab.json": b"{}"}
    fake_hub.commit("alice/sd", dict(pipe, **junk))
    fake_hub.fetched.clear()
    code, _, err = run(capsys, "convert", "alice/sd-kohya", "--to", "diffusers", "--base", "alice/sd",
                       "-o", tmp_path / "from_hub.safetensors")
    assert code == 0, err
    assert sorted(f.split("/", 2)[2] for f in fake_hub.downloads() if f.startswith("alice/sd/")) == sorted(
        ["model_index.json"] + list(pipe))
    assert run(capsys, "convert", tmp_path / "style.safetensors", "--to", "diffusers", "--base", tmp_path / "pipe",
               "-o", tmp_path / "from_disk.safetensors")[0] == 0
    assert open(tmp_path / "from_hub.safetensors", "rb").read() == open(tmp_path / "from_disk.safetensors", "rb").read()
