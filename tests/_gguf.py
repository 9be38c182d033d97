"""A tiny Llama as a GGUF model, written the way llama.cpp's convert_hf_to_gguf.py writes it (its own
renames via the gguf package's map and its q/k permutation, independent of loratools), and logits
of GGUF files from llama.cpp itself (llama-cpp-python)."""
from __future__ import annotations

import numpy as np
import torch

from _tiny import tiny_llama

gguf = __import__("pytest").importorskip("gguf", reason="the gguf extra is not installed")


def small_llama(seed: int = 0):
    """The tiny Llama of the GGUF tests: grouped-query attention (4 heads, 2 for k/v), so q and k permute apart."""
    return tiny_llama(seed, vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2)


def llama_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path: str, qtype: str = "F32") -> dict:
    """Write a transformers Llama model as a llama.cpp GGUF; 2-D weights in `qtype` (F32/F16/Q8_0 …),
    norms in F32 as llama.cpp does. Returns {gguf name: torch tensor in llama.cpp layout (fp32)}."""
    cfg = model.config
    n_head, n_kv, n_layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(cfg.hidden_size // n_head)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(0 if qtype == "F32" else 1)
    vocab = cfg.vocab_size  # a plain SentencePiece-style vocabulary; tests feed token ids directly
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    layout = {}
    for name, t in model.state_dict().items():
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        new = tmap.get_name(base)
        assert new is not None, name
        data = t.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            data = llama_permute(data, n_head, n_head)
        elif name.endswith("k_proj.weight"):
            data = llama_permute(data, n_head, n_kv)
        gname = new + ".weight"
        layout[gname] = torch.from_numpy(data.copy())
        if data.ndim == 1 or qtype == "F32":
            w.add_tensor(gname, data.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(gname, data.astype(np.float16))
        else:
            qt = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(gname, gguf.quants.quantize(data, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return layout


def llama_cpp_logits(model_path: str, tokens, lora_path: str | None = None) -> torch.Tensor:
    """Logits for every position, from llama.cpp (CPU, one thread, no mmap)."""
    from llama_cpp import Llama

    kwargs = dict(model_path=model_path, n_ctx=64, logits_all=True, n_threads=1, verbose=False,
                  use_mmap=False, n_batch=64)
    if lora_path:
        kwargs["lora_path"] = lora_path
    llm = Llama(**kwargs)
    llm.eval(list(tokens))
    out = torch.tensor(np.array(llm.scores[: len(tokens)]), dtype=torch.float32)
    llm.close()
    return out
