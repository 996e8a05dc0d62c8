"""A preallocated KV cache with one row ("slot") per sequence in flight.

Per layer, keys and values live in [slots, K, max_len, D] tensors allocated once. The model's
attention calls `update(layer_idx, k, v)`; what it writes and returns depends on the mode the
engine set before the forward:

- prefill(slots_N, T): rows `slots_N` get positions 0..T-1 written (right-padded prompts; the pad
  positions hold junk that later decode steps overwrite), and attention sees only the new keys.
- decode(num_rows, pos_B, S): rows 0..num_rows-1 get one key written at their own position
  `pos_B`, and attention sees the views [:num_rows, :, :S] (no copy). Rows of idle slots compute
  junk into their own row, which the next prefill of that slot overwrites.

Shape legend: N new sequences, B decode rows, K key/value heads, T new positions, S key
positions, D head dim.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Implements the model's `KVCache` protocol over preallocated per-slot buffers."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.rows_all = torch.arange(num_slots, device=device)
        self._mode = ""
        self._slots_N: torch.Tensor | None = None
        self._num_rows = 0
        self._pos_B: torch.Tensor | None = None
        self._S = 0

    @property
    def num_bytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.k)

    def prefill(self, slots_N: torch.Tensor) -> SlotKVCache:
        self._mode, self._slots_N = "prefill", slots_N
        return self

    def decode(self, num_rows: int, pos_B: torch.Tensor, S: int) -> SlotKVCache:
        self._mode, self._num_rows, self._pos_B, self._S = "decode", num_rows, pos_B, S
        return self

    def update(self, layer_idx: int, k_BKTD: torch.Tensor,
               v_BKTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self.k[layer_idx], self.v[layer_idx]
        if self._mode == "prefill":
            T = k_BKTD.shape[2]
            k_cache[self._slots_N, :, :T] = k_BKTD
            v_cache[self._slots_N, :, :T] = v_BKTD
            return k_BKTD, v_BKTD
        assert self._mode == "decode" and k_BKTD.shape[2] == 1, (self._mode, k_BKTD.shape)
        rows_B = self.rows_all[: self._num_rows]
        k_cache[rows_B, :, self._pos_B] = k_BKTD[:, :, 0]  # [B, K, D] at each row's position
        v_cache[rows_B, :, self._pos_B] = v_BKTD[:, :, 0]
        return k_cache[: self._num_rows, :, : self._S], v_cache[: self._num_rows, :, : self._S]
