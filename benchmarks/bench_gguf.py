"""GGUF export and merge, timed and with peak memory, against baselines measured in the same run.

Export: against llama.cpp's own converter (convert_lora_to_gguf.py, given with --llama-cpp DIR: a
llama.cpp checkout or the vendor/llama.cpp folder of the llama-cpp-python sdist), both as whole
processes on the same adapter, and against the `gguf` writer writing the same LoRA tensors as they are
(no renaming, row reordering or folding). Then both converters on an adapter with `alpha_pattern`:
each file's ΔW, as llama.cpp applies it, against PEFT's. Merge: llama.cpp has no python merge (its
llama-export-lora is C++), so against a plain copy of the GGUF file and the `gguf` package's
reader-to-writer copy of every tensor (what any GGUF rewrite costs at least). In-process rows run in a
fresh process each; memory is how far its peak RSS rises above its RSS after its imports (Linux:
/proc/self/status); whole-process rows give wall time and peak RSS, start-up included.

    PYTHONPATH=. python benchmarks/bench_gguf.py [--llama-cpp DIR] [--hidden 1024] [--layers 4] [--rank 16]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time

import torch

from benchmarks import _llamacpp
from benchmarks._models import make_llama, make_peft_adapter


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(fn_name, args, queue):
    import gguf  # noqa: F401  (imports before the baseline: every operation pays them)

    import benchmarks.bench_gguf as me
    import loratools.merging  # noqa: F401

    # ru_maxrss survives fork+exec (a spawned child starts at its parent's peak), so reset the
    # kernel's high-water mark (clear_refs 5) and read VmHWM instead
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    t = time.perf_counter()
    getattr(me, fn_name)(*args)
    sec = time.perf_counter() - t
    queue.put((sec, (_status_kib("VmHWM") - before) / 1024, before / 1024))


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure(fn_name, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn_name, args, q))
    p.start()
    while True:  # a child that dies puts nothing: stop instead of waiting forever
        try:
            out = q.get(timeout=1)
            break
        except queue.Empty:
            if not p.is_alive():
                raise SystemExit(f"error: {fn_name} failed in its process (exit code {p.exitcode})") from None
    p.join()
    return out


def write_base_gguf(folder, path, qtype):
    """The HF checkpoint as a llama.cpp GGUF (names and q/k rows as llama.cpp's converter writes them)."""
    import gguf

    from loratools.archs.gguf_names import GgufArch, rope_rows
    from loratools.checkpoint import Checkpoint
    from loratools.gguf_io import from_torch

    cfg = json.load(open(os.path.join(folder, "config.json")))
    arch = GgufArch.from_config(cfg)
    ckpt = Checkpoint(folder)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(arch.n_layers)
    w.add_head_count(arch.n_head)
    w.add_head_count_kv(arch.n_head_kv)
    w.add_embedding_length(cfg["hidden_size"])
    for name in ckpt.infos:
        t = ckpt.read(name).float()
        g = arch.to_gguf(name[: -len(".weight")])
        heads = arch.heads_of(g)
        if heads:
            t = rope_rows(t, heads)
        array, raw = from_torch(t, qtype if t.dim() == 2 else "F32")
        w.add_tensor(g, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export_ours(adapter, base, out):
    from loratools.formats import read_adapter, write_adapter

    write_adapter(read_adapter(adapter), out, format="gguf", base=base, overwrite=True)


def export_plain(adapter, base, out):
    """Baseline: the gguf writer writing the adapter's tensors as they are."""
    import gguf
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    w = gguf.GGUFWriter(out, "llama")
    w.add_type("adapter")
    for name, t in tensors.items():
        w.add_tensor(name, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def merge_ours(base, adapter, out):
    from loratools import merge

    merge(base, [adapter], out, overwrite=True)


def copy_file(base, adapter, out):
    shutil.copyfile(base, out)


def copy_gguf(base, adapter, out):
    """Baseline: the gguf package's reader-to-writer copy (metadata and every tensor)."""
    from loratools.gguf_io import copy_metadata, new_writer, open_reader

    r = open_reader(base)
    w = new_writer(out, "llama")
    copy_metadata(r, w)
    for t in r.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        w.write_tensor_data(t.data)
    w.close()


def export_vs_llamacpp(script, root, base, adapter, rank):
    env_cmd = dict(cwd=ROOT)  # where `python -m loratools` finds this checkout
    ours = os.path.join(root, "ours.gguf")
    theirs = os.path.join(root, "llamacpp.gguf")
    for label, cmd in (("export process: loratools convert --to gguf", _llamacpp.ours_export_cmd(adapter, base, ours)),
                       ("export process: convert_lora_to_gguf.py",
                        _llamacpp.llamacpp_export_cmd(script, adapter, base, theirs))):
        sec, peak = _llamacpp.run_process(cmd, **env_cmd)
        print(f"{label:44s} {sec:8.3f} {peak:9.1f}   (whole process: wall s, peak RSS MiB)")
    # per-module alphas: PEFT scales q_proj by 128/r and down_proj by 8/r, the rest by the global 2r/r
    patterned = make_peft_adapter(os.path.join(root, "lora_ap"), base, rank)
    cfg_path = os.path.join(patterned, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["alpha_pattern"] = {"q_proj": 128, "down_proj": 8}
    json.dump(cfg, open(cfg_path, "w"))
    files = {"loratools": os.path.join(root, "ours_ap.gguf"), "convert_lora_to_gguf.py": os.path.join(root, "lc_ap.gguf")}
    _llamacpp.run_process(_llamacpp.ours_export_cmd(patterned, base, files["loratools"]), **env_cmd)
    _llamacpp.run_process(_llamacpp.llamacpp_export_cmd(script, patterned, base, files["convert_lora_to_gguf.py"]))
    print(f"-- adapter with alpha_pattern {cfg['alpha_pattern']} (lora_alpha {cfg['lora_alpha']}, r {rank}):")
    _llamacpp.scale_report(base, patterned, files)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--llama-cpp", metavar="DIR", help="llama.cpp checkout (or the sdist's vendor/llama.cpp)")
    args = ap.parse_args()
    script = _llamacpp.converter(args.llama_cpp)
    root = tempfile.mkdtemp(prefix="bench_gguf_")
    try:
        base = make_llama(os.path.join(root, "hf"), dtype=torch.float16, hidden=args.hidden,
                          intermediate=args.intermediate, layers=args.layers, vocab=args.vocab, heads=16, kv_heads=4)
        adapter = make_peft_adapter(os.path.join(root, "lora"), base, args.rank)
        print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; adapter rank {args.rank}")
        print(f"{'operation':44s} {'seconds':>8s} {'peak MiB':>9s}")

        def row(label, fn, *a):
            sec, rss, floor = measure(fn, *a)
            print(f"{label:44s} {sec:8.3f} {rss:9.1f}   (RSS after imports {floor:.0f} MiB)")

        row("export: loratools convert --to gguf", "export_ours", adapter, base, os.path.join(root, "a.gguf"))
        row("export: gguf writer, tensors as they are", "export_plain", adapter, base, os.path.join(root, "p.gguf"))
        if script:
            export_vs_llamacpp(script, root, base, adapter, args.rank)
        for qtype in ("F16", "Q8_0"):
            path = os.path.join(root, f"base-{qtype}.gguf")
            write_base_gguf(base, path, qtype)
            size = os.path.getsize(path) / 2**20
            print(f"-- base {qtype}: {size:.0f} MiB, largest tensor {args.vocab * args.hidden * 2 / 2**20:.0f} MiB F16")
            row(f"merge {qtype}: loratools merge", "merge_ours", path, adapter, os.path.join(root, "m.gguf"))
            row(f"merge {qtype}: plain file copy", "copy_file", path, adapter, os.path.join(root, "c.gguf"))
            row(f"merge {qtype}: gguf reader->writer copy", "copy_gguf", path, adapter, os.path.join(root, "g.gguf"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
