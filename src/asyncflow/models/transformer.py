"""Llama / Qwen2 decoder in plain PyTorch, with Hugging Face parameter names as module paths.

Module paths equal HF names (`model.layers.0.self_attn.q_proj.weight`, ...), so a state dict maps
to `model.safetensors` one to one. The model can be built on the meta device; `init_weights` or a
checkpoint load then materialises it. Generation code passes a `KVCache` (any object with
`update(layer_idx, k, v) -> (k_all, v_all)`) and an explicit boolean attention mask.

Shape legend: B batch, T query positions, S key positions (cache included), H query heads,
K key/value heads, D head dim, E hidden size, F MLP width, V vocabulary.

On CPU, attention over fewer than `CPU_MIN_KEYS` keys is padded to that many masked keys: PyTorch's
CPU softmax and SDPA kernels (torch 2.13) take a slow path for rows shorter than one AVX-512
vector. Measured on a 2-core Xeon VM: SDPA over [256 rows, 4 heads, 15 x 15] 6.0 ms -> 1.6 ms
forward, 9.5 -> 4.5 ms with backward; softmax over 1024 rows of 12: 277 us, of 16: 20 us.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from asyncflow.models.config import ModelConfig


class KVCache(Protocol):
    def update(
        self, layer_idx: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of one layer; return all keys/values to attend to."""
        ...


class AttentionLayout(Protocol):
    """In place of a mask: a sequence that is not one causal row per batch row (rows sharing a
    prompt, `engines.sequences.SharedPromptBatch`) attends by itself."""

    def attend(self, q_1HND: torch.Tensor, k_1KND: torch.Tensor,
               v_1KND: torch.Tensor) -> torch.Tensor:
        """Attention output [1, H, N, D] of the N tokens of a flat [1, N] sequence."""
        ...


def rope_inv_freq(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] and the cos/sin scale for the config's RoPE variant."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    )
    rs = cfg.rope_scaling or {}
    kind = cfg.rope_type
    if kind in ("default", "dynamic"):
        # dynamic NTK only changes frequencies past max_position_embeddings, which we never accept.
        return inv_freq, 1.0
    factor = float(rs["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    orig_ctx = rs.get("original_max_position_embeddings", cfg.max_position_embeddings)
    if kind == "llama3":
        low, high = rs["low_freq_factor"], rs["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > orig_ctx / low, inv_freq / factor, inv_freq)
        smooth = (orig_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= orig_ctx / high) & (wavelen <= orig_ctx / low)
        return torch.where(medium, smoothed, scaled), 1.0
    assert kind == "yarn", kind

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = rs.get("attention_factor")
    if attn_factor is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attn_factor = mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"])
        else:
            attn_factor = mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return dim * math.log(orig_ctx / (rot * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
    if rs.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - lo) / (hi - lo)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv, float(attn_factor)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


CPU_MIN_KEYS = 16
"""Fewest key positions an attention call gets on CPU (see the module docstring)."""


def attention(q_BHTD, k_BKSD, v_BKSD, mask_B1TS: torch.Tensor | None) -> torch.Tensor:
    """`scaled_dot_product_attention` with grouped KV heads and a boolean (True = attend) or
    additive float mask; on CPU, fewer than `CPU_MIN_KEYS` keys are first padded with masked
    ones (same result, several times faster)."""
    S = k_BKSD.shape[-2]
    if S < CPU_MIN_KEYS and q_BHTD.device.type == "cpu" and mask_B1TS is not None:
        pad = CPU_MIN_KEYS - S
        k_BKSD, v_BKSD = (F.pad(x, (0, 0, 0, pad)) for x in (k_BKSD, v_BKSD))
        hidden = False if mask_B1TS.dtype == torch.bool else float("-inf")
        mask_B1TS = F.pad(mask_B1TS.expand(*mask_B1TS.shape[:-1], S), (0, pad), value=hidden)
    return F.scaled_dot_product_attention(q_BHTD, k_BKSD, v_BKSD, attn_mask=mask_B1TS,
                                          enable_gqa=q_BHTD.shape[1] != k_BKSD.shape[1])


def _decode_attention(q_BH1D, k_BKSD, v_BKSD, mask_B11S):
    """Attention of one query per row, as two batched matmuls over [B, K] with the H / K query
    heads of a group as rows: several times faster on CPU than SDPA's kernels for one query over
    a strided cache. mask: boolean (True = attend) or additive float, broadcast over heads."""
    B, H, _, D = q_BH1D.shape
    K = k_BKSD.shape[1]
    q_BKGD = q_BH1D.reshape(B, K, H // K, D) * (D**-0.5)
    scores_BKGS = torch.matmul(q_BKGD, k_BKSD.transpose(-1, -2)).float()
    if mask_B11S.dtype == torch.bool:
        scores_BKGS = scores_BKGS.masked_fill(~mask_B11S, float("-inf"))
    else:
        scores_BKGS = scores_BKGS + mask_B11S
    probs_BKGS = torch.softmax(scores_BKGS, dim=-1).to(v_BKSD.dtype)
    return torch.matmul(probs_BKGS, v_BKSD).reshape(B, H, 1, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        )
        qkv_bias = cfg.qkv_bias or cfg.attention_bias
        E, HD, KD = cfg.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(E, HD, bias=qkv_bias)
        self.k_proj = nn.Linear(E, KD, bias=qkv_bias)
        self.v_proj = nn.Linear(E, KD, bias=qkv_bias)
        self.o_proj = nn.Linear(HD, E, bias=cfg.attention_bias)

    def forward(self, x_BTE, cos_BTD, sin_BTD, mask_B1TS, kv_cache: KVCache | None):
        B, T, _ = x_BTE.shape
        q_BHTD = self.q_proj(x_BTE).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k_BKTD = self.k_proj(x_BTE).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BKTD = self.v_proj(x_BTE).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos_BTD.unsqueeze(1), sin_BTD.unsqueeze(1)
        q_BHTD = q_BHTD * cos + _rotate_half(q_BHTD) * sin
        k_BKTD = k_BKTD * cos + _rotate_half(k_BKTD) * sin
        if kv_cache is not None:
            k_BKTD, v_BKTD = kv_cache.update(self.layer_idx, k_BKTD, v_BKTD)
        if not isinstance(mask_B1TS, torch.Tensor):  # an AttentionLayout
            out_BHTD = mask_B1TS.attend(q_BHTD, k_BKTD, v_BKTD)
        elif T == 1 and kv_cache is not None:
            out_BHTD = _decode_attention(q_BHTD, k_BKTD, v_BKTD, mask_B1TS)
        else:
            out_BHTD = attention(q_BHTD, k_BKTD, v_BKTD, mask_B1TS)
        return self.o_proj(out_BHTD.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, F_, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(E, F_, bias=bias)
        self.up_proj = nn.Linear(E, F_, bias=bias)
        self.down_proj = nn.Linear(F_, E, bias=bias)

    def forward(self, x_BTE):
        return self.down_proj(F.silu(self.gate_proj(x_BTE)) * self.up_proj(x_BTE))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x_BTE, cos, sin, mask, kv_cache):
        x_BTE = x_BTE + self.self_attn(self.input_layernorm(x_BTE), cos, sin, mask, kv_cache)
        return x_BTE + self.mlp(self.post_attention_layernorm(x_BTE))


class Backbone(nn.Module):
    """Embedding, blocks and final norm: HF's `model.*` submodule."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.rope_scale = 1.0
        self.activation_checkpointing = False
        """Training forwards keep only each block's input and recompute the block in backward
        (less activation memory for long responses, about one more forward of compute)."""
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute non-persistent buffers; call after `to_empty` from the meta device."""
        if self.inv_freq.is_meta:
            return
        # Recomputed rather than cast: RoPE frequencies stay fp32 whatever the weights' dtype.
        self.inv_freq, self.rope_scale = rope_inv_freq(self.cfg, device=self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.init_buffers()
        return self

    def rope(self, position_ids_BT: torch.Tensor, dtype: torch.dtype):
        freqs_BTD2 = position_ids_BT[..., None].float() * self.inv_freq
        emb_BTD = torch.cat((freqs_BTD2, freqs_BTD2), dim=-1)
        return (emb_BTD.cos() * self.rope_scale).to(dtype), (emb_BTD.sin() * self.rope_scale).to(dtype)

    def forward(self, input_ids_BT, position_ids_BT, mask_B1TS, kv_cache=None):
        x_BTE = self.embed_tokens(input_ids_BT)
        cos, sin = self.rope(position_ids_BT, x_BTE.dtype)
        recompute = self.activation_checkpointing and kv_cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:  # non-reentrant: works under FSDP2 and with inputs that need no grad
                x_BTE = checkpoint(layer, x_BTE, cos, sin, mask_B1TS, None, use_reentrant=False)
            else:
                x_BTE = layer(x_BTE, cos, sin, mask_B1TS, kv_cache)
        return self.norm(x_BTE)


def causal_padding_mask(attention_mask_BT: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """Boolean [B, 1, T, T]: causal, padding keys hidden; a query that sees no key sees itself."""
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if attention_mask_BT is None:
        return causal_TT.expand(B, 1, T, T)
    mask_BTT = causal_TT & attention_mask_BT.bool()[:, None, :]
    mask_BTT |= torch.eye(T, dtype=torch.bool, device=device)  # keep pad rows finite
    return mask_BTT[:, None]


class CausalLM(nn.Module):
    """Decoder-only LM. `forward` returns logits [B, T, V] (float32 when computed in fp32)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def to_empty(self, *, device, recurse: bool = True):
        super().to_empty(device=device, recurse=recurse)
        if self.config.tie_word_embeddings:  # to_empty allocates the two names separately
            self.lm_head.weight = self.model.embed_tokens.weight
        return self

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        attn_mask_B1TS: torch.Tensor | AttentionLayout | None = None,
    ) -> torch.Tensor:
        """Logits for every position.

        attention_mask [B, T]: 1 for real tokens, 0 for padding (no cache). position_ids default to
        0..T-1 like HF's forward. With a kv_cache the caller passes attn_mask_B1TS covering the
        cached keys too; an `AttentionLayout` there (with explicit position_ids) replaces the mask.
        """
        return self.lm_head(self.hidden(input_ids_BT, position_ids, attention_mask,
                                        kv_cache=kv_cache, attn_mask_B1TS=attn_mask_B1TS))

    def hidden(self, input_ids_BT, position_ids=None, attention_mask=None, *, kv_cache=None,
               attn_mask_B1TS=None) -> torch.Tensor:
        """Final-norm hidden states [B, T, E]: lets callers apply lm_head chunk by chunk."""
        B, T = input_ids_BT.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids_BT.device).expand(B, T)
        if attn_mask_B1TS is None:
            if kv_cache is not None:
                raise ValueError("forward with a kv_cache needs an explicit attn_mask_B1TS")
            attn_mask_B1TS = causal_padding_mask(attention_mask, B, T, input_ids_BT.device)
        return self.model(input_ids_BT, position_ids, attn_mask_B1TS, kv_cache)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random init (normal(0, std) for matrices and embeddings, ones for norms, zero biases)."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        self.model.init_buffers()


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> CausalLM:
    """Build an uninitialised model (on `meta` it allocates nothing; call `to_empty` later)."""
    with torch.device(device):
        model = CausalLM(cfg)
    return model.to(dtype=dtype)
