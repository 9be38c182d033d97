"""Tiny models and PEFT adapters built at test time (random weights, fixed seeds, no downloads)."""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*loratools._C is not built.*")


def llama_config(**kw):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, dtype=torch.float32, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**kw)).to(dtype)
    with torch.no_grad():  # transformers' init leaves norms at 1; randomise so every tensor matters
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def save_base(model, folder: str, shard: str | None = None) -> str:
    """save_pretrained as safetensors; `shard` like "20KB" produces several shards and an index."""
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def peft_adapter(base_model, folder: str, seed: int = 1, **lora_kwargs):
    """Wrap a deep copy of `base_model` with a random-weight LoRA, save it, return the PeftModel."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    kwargs.update(lora_kwargs)
    peft_model = get_peft_model(copy.deepcopy(base_model), LoraConfig(**kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:  # DoRA: move m away from ||W|| so it matters
                p.mul_(1 + 0.1 * torch.rand_like(p))
            elif "modules_to_save" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


class TinyConvNet(nn.Module):
    """A small conv model with PEFT-targetable Conv2d and Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def tiny_project(tmp_path_factory, name: str, adapter: str = "a"):
    """A fresh temp folder holding a tiny Llama saved as "base" and a PEFT adapter on it (the CLI tests' common
    start). Returns (folder, model) so a test can add more adapters or tune the model."""
    root = tmp_path_factory.mktemp(name)
    model = tiny_llama()
    save_base(model, str(root / "base"))
    peft_adapter(model, str(root / adapter))
    return root, model


def save_state_dict_folder(module: nn.Module, folder: str) -> str:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    return folder


def conv_model_and_adapter(root) -> None:
    """`root/base`: a TinyConvNet state-dict folder; `root/a`: a PEFT LoRA on its convs and head."""
    torch.manual_seed(0)
    net = TinyConvNet()
    save_state_dict_folder(net, str(root / "base"))
    peft_adapter(net, str(root / "a"), target_modules=["conv1", "conv2", "head"], r=3, lora_alpha=6)


def load_folder(folder: str) -> dict:
    """All tensors of a (sharded) safetensors folder, read with the safetensors package (an oracle)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |x| (for 'within one rounding step' comparisons)."""
    x = x.float().abs()
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    return torch.maximum(torch.exp2(torch.floor(torch.log2(x.clamp_min(tiny)))) * eps, torch.tensor(tiny * eps))


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, name: str = ""):
    a, e = actual.double(), expected.double()
    err = (a - e).norm() / e.norm().clamp_min(1e-30)
    assert err <= rel, f"{name}: relative error {err:.3g} > {rel}"


def foreign_adapters(root) -> None:
    """Adapters that do not fit `tiny_llama()`: one for a wider Llama (`wrong_shape`) and one for
    GPT-2 (`gpt2`, whose module names the Llama base lacks)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    peft_adapter(tiny_llama(hidden_size=48, intermediate_size=40), str(root / "wrong_shape"))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=80, n_positions=32))
    peft_adapter(gpt2, str(root / "gpt2"), target_modules=["c_attn"], fan_in_fan_out=True)


def run_cli(capsys, *args):
    """(exit code, stdout, stderr) of `loratools ARGS` run in-process."""
    from loratools.cli.main import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err
