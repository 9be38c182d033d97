"""loratools quick start: build a small Llama-style model and a PEFT LoRA locally, merge them with
the `loratools` CLI, and check the merged model against PEFT. No downloads.

    python examples/quickstart.py [--workdir DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import torch


def build(workdir: str) -> tuple:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()
    base_dir, adapter_dir = os.path.join(workdir, "base"), os.path.join(workdir, "adapter")
    base.save_pretrained(base_dir, max_shard_size="1MB")  # sharded, like real checkpoints
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False)  # random LoRA weights, so the merge visibly changes things
    tuned = get_peft_model(base, lora).eval()
    tuned.save_pretrained(adapter_dir)
    return tuned, base_dir, adapter_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="where to build the example (default: a temp folder)")
    args = ap.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="loratools-quickstart-")
    os.makedirs(workdir, exist_ok=True)
    tuned, base_dir, adapter_dir = build(workdir)
    merged_dir = os.path.join(workdir, "merged")
    shutil.rmtree(merged_dir, ignore_errors=True)

    cmd = ["loratools", "merge", base_dir, adapter_dir, "-o", merged_dir]
    if shutil.which("loratools") is None:
        cmd = [sys.executable, "-m", "loratools"] + cmd[1:]
    print("$", " ".join(cmd[:1] + ["merge", "base", "adapter", "-o", "merged"]))
    subprocess.run(cmd, check=True)

    from transformers import LlamaForCausalLM

    merged = LlamaForCausalLM.from_pretrained(merged_dir).eval()
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, peft_logits = merged(ids).logits, tuned(input_ids=ids).logits
    err = ((ours - peft_logits).norm() / peft_logits.norm()).item()
    shards = sorted(f for f in os.listdir(merged_dir) if f.endswith(".safetensors"))
    print(f"merged model in {merged_dir}: {len(shards)} shards, same layout as the base")
    print(f"logits of the merged model vs PEFT with the adapter attached: relative difference {err:.2e}")
    if err > 1e-5:
        sys.exit("the merged model does not match PEFT")
    print("OK")


if __name__ == "__main__":
    main()
