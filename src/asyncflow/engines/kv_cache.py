"""A preallocated KV cache with one row ("slot") per sequence in flight.

Per layer, keys and values live in [slots, K, max_len, D] tensors allocated once. The model's
attention calls `update(layer_idx, k, v)` on one of two views:

- `SlotKVCache.prefill(slots_N)`: rows `slots_N` get positions 0..T-1 written (right-padded
  prompts; the pad positions hold junk that later decode steps overwrite), and attention sees only
  the new keys.
- `ExtendKV(k, v, slots_N, pos_NT, S)` (a prefill after cached keys): row n gets its new keys
  written at positions pos_NT[n] and attention sees that row's keys 0..S-1 (a gathered copy).
- `DecodeKV(k, v, rows_B, pos_B, S)` (one decode step): rows 0..B-1 get one key written at their
  own position `pos_B`, and attention sees the views [:B, :, :S] (no copy). Rows of idle slots
  compute junk into their own row, which the next prefill of that slot overwrites. A plain object
  over tensors, so that `torch.compile` traces it inside the decode step.

Shape legend: N new sequences, B decode rows, K key/value heads, T new positions, S key
positions, D head dim.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """The per-slot buffers; as the model's `KVCache`, the prefill view."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.rows_all = torch.arange(num_slots, device=device)
        self._slots_N: torch.Tensor | None = None

    @property
    def num_bytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.k)

    def prefill(self, slots_N: torch.Tensor) -> SlotKVCache:
        self._slots_N = slots_N
        return self

    def update(self, layer_idx: int, k_NKTD: torch.Tensor,
               v_NKTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k_NKTD.shape[2]
        self.k[layer_idx][self._slots_N, :, :T] = k_NKTD
        self.v[layer_idx][self._slots_N, :, :T] = v_NKTD
        return k_NKTD, v_NKTD


class ExtendKV:
    """The model's `KVCache` for T new positions per row after keys already in the cache: each
    row's keys go to its own positions `pos_NT` (padding positions must point past the row's
    last real key, where decoding overwrites them before they are seen)."""

    def __init__(self, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor],
                 slots_N: torch.Tensor, pos_NT: torch.Tensor, S: int):
        self.k, self.v, self.slots_N, self.pos_NT, self.S = k_layers, v_layers, slots_N, pos_NT, S

    def update(self, layer_idx: int, k_NKTD: torch.Tensor,
               v_NKTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self.k[layer_idx], self.v[layer_idx]
        rows_N1 = self.slots_N[:, None]
        k_cache[rows_N1, :, self.pos_NT] = k_NKTD.transpose(1, 2)  # [N, T, K, D] at (row, pos)
        v_cache[rows_N1, :, self.pos_NT] = v_NKTD.transpose(1, 2)
        return k_cache[self.slots_N, :, : self.S], v_cache[self.slots_N, :, : self.S]


class DecodeKV:
    """The model's `KVCache` for one decode step over the buffers of a `SlotKVCache`."""

    def __init__(self, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor],
                 rows_B: torch.Tensor, pos_B: torch.Tensor, S: int):
        self.k, self.v, self.rows_B, self.pos_B, self.S = k_layers, v_layers, rows_B, pos_B, S

    def update(self, layer_idx: int, k_BK1D: torch.Tensor,
               v_BK1D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self.k[layer_idx], self.v[layer_idx]
        B = self.rows_B.shape[0]
        k_cache[self.rows_B, :, self.pos_B] = k_BK1D[:, :, 0]  # [B, K, D] at each row's position
        v_cache[self.rows_B, :, self.pos_B] = v_BK1D[:, :, 0]
        return k_cache[:B, :, : self.S], v_cache[:B, :, : self.S]
