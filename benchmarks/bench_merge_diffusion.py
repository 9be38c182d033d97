"""Wall time and peak memory of `loratools merge` into an SD 1.5-size diffusers pipeline folder and the
same model as one single-file (LDM-named) checkpoint, next to diffusers' own
load_lora_weights + fuse_lora + save_pretrained and a plain copy.

An fp16 SD 1.5-shaped UNet (860M parameters) and CLIP-L text encoder with random weights, a rank-32
LoRA on the attention projections of both, and the single file (written with our LDM name map) are
generated once under --workdir. Each contender runs in its own child process so its peak RSS is
measured alone (os.wait4). The merged UNets are compared at the end. Usage:

    python benchmarks/bench_merge_diffusion.py [--workdir DIR] [--rank 32]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_merge import timed_child  # noqa: E402

GENERATE = r"""
import os, sys, torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from loratools import LoraAdapter, LoraModule, safetensors_io, write_adapter
from loratools.archs.ldm import LdmLayout
from loratools.checkpoint import Checkpoint

work, rank = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                  num_hidden_layers=12, projection_dim=768))  # CLIP ViT-L/14 text tower
vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, down_block_types=("DownEncoderBlock2D",),
                    up_block_types=("UpDecoderBlock2D",), layers_per_block=1)
pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet,
                               scheduler=PNDMScheduler(steps_offset=1, skip_prk_steps=True), safety_checker=None,
                               feature_extractor=None, requires_safety_checker=False).to(torch.float16)
pipe.save_pretrained(os.path.join(work, "pipe"))
lora, meta = {}, {}
for comp, model, targets in (("unet", unet, ["to_q", "to_k", "to_v", "to_out.0"]),
                             ("text_encoder", te, ["q_proj", "k_proj", "v_proj", "out_proj"])):
    cfg = LoraConfig(r=rank, lora_alpha=rank / 2, target_modules=targets, init_lora_weights=False)
    model.add_adapter(cfg)
    lora[comp] = {k: (v.float() * 0.05).half() for k, v in get_peft_model_state_dict(model).items()}
    meta[comp] = cfg.to_dict()
StableDiffusionPipeline.save_lora_weights(os.path.join(work, "lora-diffusers"), unet_lora_layers=lora["unet"],
    text_encoder_lora_layers=lora["text_encoder"], unet_lora_adapter_metadata=meta["unet"],
    text_encoder_lora_adapter_metadata=meta["text_encoder"])
adapter = LoraAdapter(format="peft")
for comp, sd in lora.items():
    for k, down in sd.items():
        if k.endswith(".lora_A.weight"):
            mod = k[:-len(".lora_A.weight")]
            adapter.add(LoraModule(f"{comp}.{mod}", down, sd[mod + ".lora_B.weight"], alpha=rank / 2))
write_adapter(adapter, os.path.join(work, "lora-loratools"), format="peft")
# the single file, tensor by tensor, under the LDM names
layout = LdmLayout("sd1", unet.config, {"text_encoder": ("hf", "cond_stage_model.transformer.")})
entries = []
for comp, sub in (("unet", "unet"), ("text_encoder", "text_encoder")):
    ck = Checkpoint(os.path.join(work, "pipe", sub))
    for n in ck.infos:
        slot = layout.slot(f"{comp}.{n}")
        if slot is not None:
            entries.append((slot.key, ck, n))
w = safetensors_io.StreamingWriter(os.path.join(work, "sd15.safetensors"),
                                   [(k, ck.dtype(n), ck.shape(n)) for k, ck, n in entries], {"format": "pt"})
for k, ck, n in entries:
    w.write(k, ck.read(n))
w.close()
"""

DIFFUSERS = r"""
import sys, torch
from diffusers import StableDiffusionPipeline
base, lora, out = sys.argv[1:4]
pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float16, safety_checker=None, tokenizer=None,
                                               feature_extractor=None, image_encoder=None)
pipe.load_lora_weights(lora)
pipe.fuse_lora()
pipe.unload_lora_weights()
pipe.save_pretrained(out)
"""

COMPARE = r"""
import sys, torch
from loratools.archs.ldm import LdmLayout
from loratools.checkpoint import Checkpoint
a, b, single = Checkpoint(sys.argv[1]), Checkpoint(sys.argv[2]), Checkpoint(sys.argv[3])
layout = LdmLayout.from_keys(single.infos)
worst = worst_single = 0.0
for n in a.infos:
    x = a.read(n).float()
    worst = max(worst, (x - b.read(n).float()).abs().max().item())
    worst_single = max(worst_single, (x - single.read(layout.slot("unet." + n).key).float()).abs().max().item())
print(f"{worst:.3g} {worst_single:.3g}")
"""


def size_of(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "loratools-bench-sd"))
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    work, py = args.workdir, sys.executable
    pipe, single = os.path.join(work, "pipe"), os.path.join(work, "sd15.safetensors")
    ours_lora, their_lora = os.path.join(work, "lora-loratools"), os.path.join(work, "lora-diffusers")
    if not os.path.exists(single):
        os.makedirs(work, exist_ok=True)
        print(f"generating an SD 1.5-size pipeline in {work} ...", file=sys.stderr)
        subprocess.run([py, "-c", GENERATE, work, str(args.rank)], check=True, stdout=subprocess.DEVNULL)

    out = {k: os.path.join(work, k) for k in ("copy", "ours", "theirs", "copy.safetensors", "ours.safetensors")}
    for p in out.values():
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))
    copy_dir = [py, "-c", "import shutil,sys; shutil.copytree(sys.argv[1], sys.argv[2])", pipe, out["copy"]]
    timed_child(copy_dir)  # warm the page cache so every contender reads from memory
    shutil.rmtree(out["copy"])
    rows = [("plain copy of the pipeline folder",) + timed_child(copy_dir),
            ("loratools merge (pipeline folder)",) + timed_child(
                [py, "-m", "loratools", "merge", pipe, ours_lora, "-o", out["ours"], "-q"]),
            ("diffusers load_lora_weights+fuse_lora+save",) + timed_child([py, "-c", DIFFUSERS, pipe, their_lora, out["theirs"]]),
            ("plain copy of the single file",) + timed_child(
                [py, "-c", "import shutil,sys; shutil.copyfile(sys.argv[1], sys.argv[2])", single, out["copy.safetensors"]]),
            ("loratools merge (single file)",) + timed_child(
                [py, "-m", "loratools", "merge", single, ours_lora, "-o", out["ours.safetensors"], "-q"])]
    diff = subprocess.run([py, "-c", COMPARE, os.path.join(out["ours"], "unet"), os.path.join(out["theirs"], "unet"),
                           out["ours.safetensors"]], check=True, capture_output=True, text=True).stdout.split()

    print(f"model: SD 1.5-size UNet + CLIP-L text encoder, fp16, {size_of(pipe) / 2**30:.2f} GiB (single file "
          f"{size_of(single) / 2**30:.2f} GiB); LoRA rank {args.rank} on the attention projections; {os.cpu_count()} CPUs")
    print(f"{'contender':44s} {'wall s':>8s} {'peak RSS MiB':>13s}")
    for name, t, rss in rows:
        print(f"{name:44s} {t:8.2f} {rss:13.0f}")
    copy, ours, theirs, copy1, single_row = rows
    print(f"diffusers / loratools (pipeline): {theirs[1] / ours[1]:.1f}x the time, {theirs[2] / ours[2]:.1f}x the peak memory")
    print(f"loratools vs plain copy: pipeline {ours[1] / copy[1]:.2f}x, single file {single_row[1] / copy1[1]:.2f}x the time")
    print(f"max |ours - diffusers| over the merged UNet: {diff[0]} (fp16); single file vs pipeline output: {diff[1]}")


if __name__ == "__main__":
    main()
