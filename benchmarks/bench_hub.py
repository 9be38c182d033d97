"""Bytes and wall time to fetch an adapter and a base model from the Hub: loratools' resolution
(`allow_patterns`: only what a command needs) next to a plain `snapshot_download` of the repository
(what `hf download REPO` or a naive `snapshot_download(repo_id)` does), measured in the same run.

Runs against the local fake Hub of the test suite (tests/hub_server.py, plain HTTP on 127.0.0.1),
so the numbers are about how much is transferred, not about a real network. The repositories look
like what people upload: a trainer's output folder (adapter + optimizer state + an intermediate
checkpoint + training args) and a base model that ships safetensors next to a pytorch_model.bin copy
and an ONNX export. Usage:

    python benchmarks/bench_hub.py [--base-mb 256] [--rank 16]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE, os.path.join(os.path.dirname(HERE), "tests")]


def folder_files(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            out[os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/")] = open(os.path.join(root, n), "rb").read()
    return out


def measure(hub, fn):
    """(seconds, bytes the server sent) of fn() into a fresh cache."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["HF_HUB_CACHE"] = cache
        hub.fetched.clear()
        t0 = time.perf_counter()
        fn(cache)
        elapsed = time.perf_counter() - t0
    sent = 0
    for item in hub.fetched:  # "namespace/name/path/in/repo"
        ns, name, path = item.split("/", 2)
        sent += len(hub.files(f"{ns}/{name}")[path])
    return elapsed, sent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-mb", type=int, default=256, help="approximate size of the base model's safetensors")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()

    import torch
    from _models import make_llama, make_peft_adapter
    from hub_server import FakeHub

    hub = FakeHub().start()
    os.environ.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    from huggingface_hub import constants, snapshot_download  # after HF_ENDPOINT is set

    from loratools import share as lhub

    layers = max(1, round(args.base_mb / 64))  # ~64 MB of bf16 per layer at hidden 1024
    work = tempfile.mkdtemp(prefix="bench_hub.")
    base = make_llama(os.path.join(work, "base"), dtype=torch.bfloat16, hidden=1024, intermediate=4096,
                      layers=layers, vocab=16000, heads=16, kv_heads=4)
    adapter = make_peft_adapter(os.path.join(work, "adapter"), base, rank=args.rank)
    base_files, adapter_files = folder_files(base), folder_files(adapter)
    weights = sum(len(v) for k, v in base_files.items() if k.endswith(".safetensors"))
    ad_bytes = len(adapter_files["adapter_model.safetensors"])
    rand = lambda n: os.urandom(n)  # noqa: E731  incompressible, like real weights
    trainer = dict(adapter_files, **{"optimizer.pt": rand(2 * ad_bytes), "scheduler.pt": rand(1000),
                                     "training_args.bin": rand(5000), "rng_state.pth": rand(15000),
                                     "checkpoint-500/adapter_model.safetensors": rand(ad_bytes),
                                     "checkpoint-500/adapter_config.json": adapter_files["adapter_config.json"],
                                     "checkpoint-500/optimizer.pt": rand(2 * ad_bytes)})
    model = dict(base_files, **{"pytorch_model.bin": rand(weights), "onnx/model.onnx": rand(weights)})
    hub.commit("bench/adapter", trainer)
    hub.commit("bench/model", model)

    rows = []
    for label, repo, kind in [("adapter (trainer output)", "bench/adapter", "adapter"),
                              ("base model (+ .bin, onnx)", "bench/model", "model")]:
        ours = measure(hub, lambda cache, repo=repo, kind=kind: lhub.local_path(repo, kind=kind))
        peer = measure(hub, lambda cache, repo=repo: snapshot_download(repo, cache_dir=cache, endpoint=hub.url))
        rows.append((label, ours, peer))
    hub.stop()
    print(f"huggingface_hub {sys.modules['huggingface_hub'].__version__}, endpoint {constants.ENDPOINT} (local)")
    print(f"{'repository':28s} {'loratools MB':>12s} {'full MB':>9s} {'bytes ratio':>11s} "
          f"{'loratools s':>11s} {'full s':>7s} {'time ratio':>10s}")
    for label, (t1, b1), (t2, b2) in rows:
        print(f"{label:28s} {b1 / 2**20:12.1f} {b2 / 2**20:9.1f} {b2 / max(b1, 1):10.2f}x "
              f"{t1:11.2f} {t2:7.2f} {t2 / max(t1, 1e-9):9.2f}x")


if __name__ == "__main__":
    main()
