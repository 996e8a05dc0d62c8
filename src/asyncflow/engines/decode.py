"""One decode step (one new token per row) as a function over tensors, eager or compiled.

`decode_logprobs` runs the model for T = 1 over rows 0..B-1 of the slot KV cache, writes each
row's new key/value at its own position and returns log_softmax(logits / T) in fp32: everything
that depends on the model, so that `torch.compile` fuses it (RMSNorm, RoPE, SwiGLU, masks, the
softmaxes and the log-probs become a few C++ loops around the matmuls). The engine samples from
the returned log-probs (`sampling.sample_from_logprobs`), so eager and compiled share the sampler
and the log_softmax over the vocabulary is computed once.

`build_decode_step(compile=True)` compiles with the batch dim (B) and the key dim (S) dynamic:
one graph serves every step, every batch size >= 2 (the engine never passes B = 1, which would
specialise and compile a second graph) and every length; weights swapped by pointer
(`StagedWeights.swap`) are graph inputs, so a commit needs no recompilation.

`GraphedDecodeStep` (CUDA) replays the step, eager or compiled, from CUDA graphs: a small model's
decode step is hundreds of short kernels, and launching them one by one from Python keeps the GPU
busy ~10% of the time (SmolLM2-135M, batch 256, H200; benchmarks/RESULTS.md). One graph per
bucket of (B, S), all captured when the engine is built (~2 steps' time each; a capture made
mid-run could collide with another thread's CUDA work); the engine rounds B up to a power of two
and S up to a multiple of 64 (coarser past 512 keys: at most ~1/8 padding), so a 256-slot,
2048-position engine has 8 x 16 graphs. A graph reads the tensors it was captured
with: inputs are copied into fixed buffers, the output is written into one fixed buffer (so the
graphs share one memory pool whatever order they replay in), and a weight commit must copy into
the live parameters instead of swapping pointers (`StagedWeights(in_place=True)`).

Shape legend: B decode rows, S key positions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from asyncflow.engines.kv_cache import DecodeKV
from asyncflow.models.transformer import CausalLM


def decode_logprobs(model: CausalLM, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor],
                    rows_B: torch.Tensor, last_B1: torch.Tensor, pos_B: torch.Tensor,
                    ar_S: torch.Tensor, temperature_B: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits / T) [B, V] fp32 for the token after `last_B1` (at position pos_B);
    ar_S = arange(S) with S = max(pos_B) + 1: keys past a row's own position are masked."""
    # Additive fp32 mask, shared by all layers (0 = attend, -inf = hidden).
    mask_B11S = torch.where(ar_S <= pos_B[:, None], 0.0, float("-inf"))[:, None, None]
    cache = DecodeKV(k_layers, v_layers, rows_B, pos_B, ar_S.shape[0])
    logits_BV = model(last_B1, position_ids=pos_B[:, None], kv_cache=cache,
                      attn_mask_B1TS=mask_B11S)[:, 0]
    return torch.log_softmax(logits_BV.float() / temperature_B[:, None], dim=-1)


def build_decode_step(compile: bool) -> Callable[..., torch.Tensor]:
    """`decode_logprobs`, or it compiled with inductor (dynamic B and S) when `compile`."""
    if not compile:
        return decode_logprobs
    compiled = torch.compile(decode_logprobs, fullgraph=True)

    def step(model, k_layers, v_layers, rows_B, last_B1, pos_B, ar_S, temperature_B):
        for t in (rows_B, last_B1, pos_B, ar_S, temperature_B):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return compiled(model, k_layers, v_layers, rows_B, last_B1, pos_B, ar_S, temperature_B)

    return step


class GraphedDecodeStep:
    """`step` (a decode step as above) replayed from CUDA graphs, one per (B, S) bucket, all
    captured when it is built."""

    MIN_KEY_STEP = 64
    """S is rounded up to a multiple of max(this, an eighth of the next power of two)."""

    def __init__(self, step: Callable[..., torch.Tensor], model: CausalLM,
                 k_layers: list[torch.Tensor], v_layers: list[torch.Tensor], max_rows: int,
                 max_len: int, vocab_size: int, device: torch.device):
        self._step = step
        self._max_rows, self._max_len = max_rows, max_len
        self._rows = torch.arange(max_rows, device=device)
        self._ar = torch.arange(max_len, device=device)
        self._last = torch.zeros(max_rows, 1, dtype=torch.long, device=device)
        self._pos = torch.zeros(max_rows, dtype=torch.long, device=device)
        self._temp = torch.ones(max_rows, device=device)
        self._out = torch.empty(max_rows, vocab_size, device=device)
        self._pool = None  # one memory pool for every graph, made at the first capture
        # Every bucket now, before other threads (weight loads, collectives) use the device: a
        # capture fails when another thread works on the legacy stream meanwhile.
        rows = sorted({self.rows_bucket(b) for b in range(min(2, max_rows), max_rows + 1)})
        keys = sorted({self.keys_bucket(s) for s in range(1, max_len + 1)})
        self._graphs: dict[tuple[int, int], Any] = {}
        with torch.inference_mode():
            for B in rows:
                for S in keys:
                    self._graphs[(B, S)] = self._capture(model, k_layers, v_layers, B, S)

    def rows_bucket(self, B: int) -> int:
        """Rows of the graph that serves B rows: the next power of two, capped."""
        return min(1 << (B - 1).bit_length(), self._max_rows)

    def keys_bucket(self, S: int) -> int:
        """Key positions of the graph that serves S (attention over at most ~1/8 more keys)."""
        step = max(self.MIN_KEY_STEP, (1 << (S - 1).bit_length()) // 8)
        return min(-(-S // step) * step, self._max_len)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def __call__(self, model, k_layers, v_layers, rows_B, last_B1, pos_B, ar_S,
                 temperature_B) -> torch.Tensor:
        """Same contract as `decode_logprobs`, for a bucketed (B, S) and the model and cache the
        graphs were captured with; rows_B and ar_S must be aranges. The result is a view of a
        buffer that the next call overwrites."""
        B, S = rows_B.shape[0], ar_S.shape[0]
        graph = self._graphs.get((B, S))
        if graph is None:
            raise ValueError(f"(B, S) = ({B}, {S}) is not a bucket; round with rows_bucket "
                             f"and keys_bucket")
        self._last[:B].copy_(last_B1)
        self._pos[:B].copy_(pos_B)
        self._temp[:B].copy_(temperature_B)
        graph.replay()
        return self._out[:B]

    def _args(self, model, k_layers, v_layers, B: int, S: int) -> tuple:
        """The step's arguments for bucket (B, S): views of the fixed buffers."""
        return (model, k_layers, v_layers, self._rows[:B], self._last[:B], self._pos[:B],
                self._ar[:S], self._temp[:B])

    def _capture(self, model, k_layers, v_layers, B: int, S: int) -> torch.cuda.CUDAGraph:
        args = self._args(model, k_layers, v_layers, B, S)
        # Warm-up off the capture (lazy cuBLAS/compile work must not be captured). It runs the
        # step for real on the idle cache (the buffers hold position 0): junk in free slots,
        # which a prefill overwrites.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._out[:B].copy_(self._step(*args))
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._out[:B].copy_(self._step(*args))
        return graph
