"""What merging a QLoRA adapter into the dequantized 4-bit base changes, against merging it into
the original full-precision base: logits of a small Llama on random tokens (CPU, a minute).

Three models: `qlora` = the dequantized NF4 base with the adapter applied unmerged (what the adapter
was trained against); `into-4bit` = `loratools merge nf4-base adapter` (bf16 and fp32 outputs);
`into-original` = `loratools merge original-base adapter`. Run: python benchmarks/bench_qlora_merge.py
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "tests")]
from _tiny import peft_adapter, save_base, tiny_llama  # noqa: E402

from loratools import merge  # noqa: E402
from loratools.bases import open_base  # noqa: E402


def logits(folder_or_model, tokens):
    model = folder_or_model
    if isinstance(model, str):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits.float()


def compare(name, got, want):
    diff = (got - want).abs()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean()
    print(f"| {name} | {diff.max():.4f} | {diff.mean():.5f} | {top1 * 100:.1f}% |")


def main():
    root = tempfile.mkdtemp()
    model = tiny_llama(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=512)
    save_base(model, f"{root}/base")
    peft_adapter(model, f"{root}/lora", r=16, lora_alpha=32,
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    AutoModelForCausalLM.from_pretrained(f"{root}/base", quantization_config=cfg, device_map="cpu") \
        .save_pretrained(f"{root}/nf4")
    nf4 = open_base(f"{root}/nf4")
    deq = AutoModelForCausalLM.from_pretrained(f"{root}/base", dtype=torch.float32)
    with torch.no_grad():
        for k, p in deq.named_parameters():
            p.copy_(nf4.read(k).float())
    tokens = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    qlora = logits(PeftModel.from_pretrained(deq, f"{root}/lora").eval(), tokens)
    merge(f"{root}/nf4", [f"{root}/lora"], f"{root}/m4-fp32", dtype="fp32")
    merge(f"{root}/nf4", [f"{root}/lora"], f"{root}/m4-bf16")
    merge(f"{root}/base", [f"{root}/lora"], f"{root}/orig", dtype="fp32")
    print("| merged model, against the QLoRA model as trained | max abs logit diff | mean | top-1 agreement |")
    print("|---|---|---|---|")
    compare("into the dequantized 4-bit base, fp32", logits(f"{root}/m4-fp32", tokens), qlora)
    compare("into the dequantized 4-bit base, bf16", logits(f"{root}/m4-bf16", tokens), qlora)
    compare("into the original fp32 base", logits(f"{root}/orig", tokens), qlora)
    print(f"(logit std {qlora.std():.3f})")


if __name__ == "__main__":
    main()
