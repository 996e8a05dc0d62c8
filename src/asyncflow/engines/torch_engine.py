"""The built-in rollout engine: our own model, a slot KV cache and continuous batching.

```
 requests --check--> waiting (FIFO) --prefill into free slots--> running slots --decode T=1--+
     |  invalid                                                     ^        | finished     |
     +--> Completion(error)                                         +--------+--------------+
                                                                             v
                                                                stream() yields Completion
```

One thread runs `stream`/`generate`. Each loop iteration ("step") admits waiting requests into
free slots (one batched prefill per chunk, once `min_admit` slots are free; a prompt that several
requests of the chunk share, as the n samples of a GRPO group do, is prefilled once and its keys
and values copied to the other slots: ~1.5x faster generation of the tiny default's 256 rows x 6
tokens on one CPU thread), then runs one decode
step over slots 0..hi-1 (`decode.decode_logprobs`, compiled with `compile=True`; on CUDA replayed
from CUDA graphs, with the rows and key length rounded up to a captured bucket) and samples one
token per slot. A slot freed by a finished request is
refilled at a following step; once nothing waits, the highest running slots move into the holes
(`_compact`) so that decoding computes no idle rows.

Weights: `load_weights` copies tensors into a staging copy of the parameters while decoding goes
on (any thread); `commit_weights` swaps staging and live tensors (pointer swap, no copy) between
steps: immediately when no step is running, else at the end of the running step, and returns once
the new weights are live. With `kv_on_commit="recompute"` running sequences then rebuild their KV
cache under the new weights (each distinct prompt prefilled once and copied, then every row's
generated tokens in one more prefill), so tokens after the commit are exactly what the new
weights give for the same prefix; "keep" reuses the old keys/values (cheaper, approximate).
`pause` stops new steps until `resume`; commits still apply while paused. Shutdown order:
`shutdown()` aborts every request and lifts a pause; the running stream yields them as aborted
and returns; later `generate`/`stream` calls raise.

Shape legend: B decode rows (slots 0..hi-1), N sequences in one prefill, T prefill positions,
S key positions, V vocabulary, L max sequence length of the cache.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from asyncflow.engines.base import (
    Completion,
    EngineHealth,
    FinishReason,
    GenerationRequest,
    RolloutEngineConfig,
    check_prompt,
    check_unique_ids,
    in_request_order,
    refused,
    request_seed,
)
from asyncflow.engines.decode import GraphedDecodeStep, build_decode_step
from asyncflow.engines.kv_cache import ExtendKV, SlotKVCache
from asyncflow.engines.sampling import SamplingBatch, sample_from_logprobs
from asyncflow.engines.staging import StagedWeights
from asyncflow.log import get_logger
from asyncflow.models.transformer import CPU_MIN_KEYS, CausalLM

logger = get_logger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TorchEngineConfig(RolloutEngineConfig):
    """The built-in PyTorch engine (CPU or CUDA)."""

    kind: str = "torch"
    """Engine kind; "torch" for this one."""
    max_batch_size: int = 64
    """Slots: sequences decoded together; more requests wait for a free slot."""
    max_seq_len: int = 2048
    """KV cache length per slot (prompt + completion), capped by the model's context window.
    Cache memory: 2 * layers * slots * kv_heads * max_seq_len * head_dim * dtype bytes."""
    max_prefill_tokens: int = 8192
    """Most (padded) tokens in one prefill forward; more new requests are prefilled in chunks."""
    min_admit: int = 0
    """Prefill waiting requests only once this many slots are free (or all of them fit, or
    nothing is decoding): fewer, larger prefills. 0 means max_batch_size // 8."""
    device: str = "cpu"
    """Where the model and cache live: "cpu", "cuda", "cuda:1", ..."""
    dtype: str = "float32"
    """Model and cache dtype: float32, bfloat16 or float16. Log-probs are always fp32."""
    kv_on_commit: str = "recompute"
    """After a weight commit, rebuild running sequences' KV cache with the new weights
    ("recompute", exact) or keep the old keys/values ("keep", no extra forward)."""
    seed: int = 0
    """Seeds the per-request seeds of requests that bring none."""
    compile: bool = False
    """Compile the decode step (model forward for one token per row + log-probs) with
    torch.compile/inductor: same tokens, log-probs within ~1e-5; fuses the elementwise work
    (generation ~1.14x faster for the tiny model, ~1.06x for SmolLM2-135M on one CPU thread,
    see benchmarks/RESULTS.md) for 25-75 s of compilation at the first decode step (less with a
    warm inductor cache). For long runs; off by default so that tests and scripts start at once."""
    cuda_graphs: bool = True
    """On CUDA, replay the decode step (eager or compiled) from CUDA graphs, one per bucket of
    rows and key length, captured when the engine is built (`decode.GraphedDecodeStep`): no
    per-kernel launch cost. Off: launch each kernel (to debug or profile per operator).
    Ignored on CPU."""

    def __post_init__(self):
        for name in ("max_batch_size", "max_seq_len", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.min_admit < 0:
            raise ValueError(f"min_admit={self.min_admit} must be >= 0 (0: max_batch_size // 8)")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; use one of {list(_DTYPES)}")
        if self.kv_on_commit not in ("recompute", "keep"):
            raise ValueError(f"kv_on_commit={self.kv_on_commit!r}; use 'recompute' or 'keep'")


@dataclass
class _Seq:
    """A request that passed the checks, from submission to completion."""

    req: GenerationRequest
    prompt_ids: list[int]
    seed: int
    stop_ids: list[int]
    slot: int = -1
    version_start: int = -1
    version_changes: list[tuple[int, int]] = field(default_factory=list)


def _padded(rows: list[list[int]], width: int, fill: int) -> torch.Tensor:
    """int64 [len(rows), width] on CPU: each row's ids, then `fill` (one tensor from one nested
    list: a copy per row costs more than the rest of a prefill of the tiny model)."""
    return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=torch.long)


class TorchRolloutEngine:
    """`RolloutEngine` over an asyncflow `CausalLM`. Takes ownership of the model."""

    def __init__(self, model: CausalLM, cfg: TorchEngineConfig, policy_version: int = 0):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.model = model.to(device=self.device, dtype=_DTYPES[cfg.dtype]).eval().requires_grad_(False)
        mc = model.config
        self.vocab_size = mc.vocab_size
        self.window = min(cfg.max_seq_len, mc.max_position_embeddings)
        self.eos_ids = mc.eos_token_ids
        n, dev = cfg.max_batch_size, self.device
        self.cache = SlotKVCache(mc.num_hidden_layers, n, mc.num_key_value_heads, self.window,
                                 mc.head_dim, _DTYPES[cfg.dtype], dev)
        # Per-slot state; a slot's sequence so far is seq[:pos + 1]; pos = keys in the cache.
        self._pos = torch.zeros(n, dtype=torch.long, device=dev)
        self._n_gen = torch.zeros(n, dtype=torch.long, device=dev)
        self._active = torch.zeros(n, dtype=torch.bool, device=dev)
        self._max_new = torch.ones(n, dtype=torch.long, device=dev)
        self._seq = torch.zeros(n, self.window, dtype=torch.long, device=dev)
        self._out_logp = torch.zeros(n, self.window, dtype=torch.float32, device=dev)
        self._stop = torch.full((n, 1), -1, dtype=torch.long, device=dev)
        self._temp = torch.ones(n, device=dev)
        self._greedy = torch.ones(n, dtype=torch.bool, device=dev)
        self._top_k = torch.full((n,), self.vocab_size, dtype=torch.long, device=dev)
        self._top_p = torch.ones(n, device=dev)
        self._seed = torch.zeros(n, dtype=torch.long, device=dev)
        self._ar_L = torch.arange(self.window, device=dev)
        self._decode_step = build_decode_step(cfg.compile)
        self._graphs: GraphedDecodeStep | None = None
        if self.device.type == "cuda" and cfg.cuda_graphs:
            self._graphs = GraphedDecodeStep(self._decode_step, self.model, self.cache.k,
                                             self.cache.v, n, self.window, self.vocab_size, dev)
            self._decode_step = self._graphs
        # Graphs hold the live parameters' addresses: a commit copies into them.
        self.weights = StagedWeights(self.model, in_place=self._graphs is not None)
        self._slots: list[_Seq | None] = [None] * n
        self._hi = 0  # decode rows: slots 0..hi-1 (the highest running slot + 1)
        self._sampling: SamplingBatch | None = None  # for rows 0..hi-1; None after slot changes
        self._waiting: deque[_Seq] = deque()
        self._rng = torch.Generator().manual_seed(cfg.seed)
        # Cross-thread state, guarded by _lock.
        self._lock = threading.Lock()
        self._gen_lock = threading.Lock()
        self._resumed = threading.Event()
        self._resumed.set()
        self._in_step = False
        self._version = policy_version
        self._pending: tuple[int, threading.Event] | None = None
        self._kv_stale = False
        self._aborted: set[str] = set()
        self._healthy = True
        self._stall_s = 0.0
        logger.info("torch engine: %d slots x %d positions, KV cache %.1f MiB on %s (%s%s%s)",
                    n, self.window, self.cache.num_bytes / 2**20, dev, cfg.dtype,
                    ", compiled" if cfg.compile else "", ", CUDA graphs" if self._graphs else "")

    # ---- protocol: weights, control -------------------------------------------------------

    @property
    def policy_version(self) -> int:
        return self._version

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.weights.load(named_tensors)

    def commit_weights(self, policy_version: int) -> None:
        self.weights.check_complete()
        with self._lock:
            if not self._in_step:
                self._swap(policy_version)
                return
            assert self._pending is None, "commit_weights is called from one thread at a time"
            done = threading.Event()
            self._pending = (policy_version, done)
        done.wait()

    def pause(self) -> None:
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    def abort(self, request_ids: Iterable[str]) -> None:
        with self._lock:
            self._aborted.update(request_ids)

    def health(self) -> EngineHealth:
        return EngineHealth(healthy=self._healthy, policy_version=self._version,
                            paused=not self._resumed.is_set(),
                            num_running=sum(s is not None for s in self._slots),
                            num_waiting=len(self._waiting), commit_stall_s=self._stall_s)

    def shutdown(self) -> None:
        self.abort([s.req.request_id for s in [*self._slots, *self._waiting] if s is not None])
        self._resumed.set()
        self._healthy = False

    def _swap(self, version: int) -> None:
        """Make staged weights live; caller holds _lock and no step is running."""
        t0 = time.perf_counter()
        self.weights.swap()
        for s in self._slots:
            if s is not None:
                s.version_changes.append((int(self._n_gen[s.slot]), version))
        self._kv_stale = self.cfg.kv_on_commit == "recompute" and self._hi > 0
        logger.debug("policy version %d -> %d", self._version, version)
        self._version = version
        self._stall_s += time.perf_counter() - t0

    # ---- protocol: generation -------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        check_unique_ids(requests)
        return in_request_order(requests, self.stream(requests))

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[Completion]:
        if not self._healthy:
            raise ValueError("engine was shut down; build a new one")
        check_unique_ids(requests)
        with self._gen_lock:
            for req in requests:
                try:
                    self._waiting.append(self._check(req))
                except ValueError as e:
                    yield self._error(req, str(e))
            try:
                while self._waiting or self._hi > 0:
                    yield from self._step()
            finally:  # the consumer stopped early or a step failed: drop what is left
                self._waiting.clear()
                for s in self._slots:
                    if s is not None:
                        self._finish(s, "abort")

    def _check(self, req: GenerationRequest) -> _Seq:
        sp = req.sampling
        sp.check(self.vocab_size)
        prompt = check_prompt(req.prompt_ids, self.vocab_size, self.window)
        stop = [] if sp.ignore_eos else list(
            self.eos_ids if sp.stop_token_ids is None else sp.stop_token_ids)
        return _Seq(req, prompt, request_seed(sp, self._rng), stop)

    def _error(self, req: GenerationRequest, msg: str) -> Completion:
        logger.warning("request %s refused: %s", req.request_id, msg)
        return refused(req, msg, self._version)

    # ---- the loop ------------------------------------------------------------------------

    def _step(self) -> list[Completion]:
        """One iteration: aborts, admission (prefill), one decode forward."""
        self._resumed.wait()
        with self._lock:
            self._in_step = True
            aborted, self._aborted = self._aborted, set()
        finished: list[Completion] = []
        try:
            with torch.inference_mode():
                if aborted:
                    finished += self._abort(aborted)
                if self._kv_stale:
                    self._recompute_kv()
                finished += self._admit()
                if self._hi > 0:
                    finished += self._decode()
                if not self._waiting:
                    self._compact()
        finally:
            with self._lock:
                self._in_step = False
                if self._pending is not None:
                    (version, done), self._pending = self._pending, None
                    self._swap(version)
                    done.set()
        return finished

    def _abort(self, ids: set[str]) -> list[Completion]:
        out = []
        for s in [s for s in self._waiting if s.req.request_id in ids]:
            self._waiting.remove(s)
            out.append(Completion(s.req.request_id, s.prompt_ids, [], [], "abort",
                                  self._version, self._version))
        for s in self._slots:
            if s is not None and s.req.request_id in ids:
                out.append(self._finish(s, "abort"))
        return out

    def _prefill(self, slots: list[int], seqs: list[list[int]]) -> torch.Tensor:
        """Write the KV cache of `seqs` into `slots`; return last-position logits [N, V]."""
        dev, N, T = self.device, len(seqs), max(len(s) for s in seqs)
        ids_NT = _padded(seqs, T, 0).to(dev)
        lens_N = torch.tensor([len(s) for s in seqs], device=dev)
        ar_T = torch.arange(T, device=dev)
        mask_NTT = (ar_T[None, :, None] >= ar_T[None, None, :]) & (ar_T < lens_N[:, None])[:, None]
        slots_N = torch.tensor(slots, device=dev)
        hidden_NTE = self.model.hidden(ids_NT, ar_T.expand(N, T), kv_cache=self.cache.prefill(slots_N),
                                       attn_mask_B1TS=mask_NTT[:, None])
        last_NE = hidden_NTE[torch.arange(N, device=dev), lens_N - 1]
        return self.model.lm_head(last_NE)

    def _prefill_shared(self, chunk: list[_Seq]) -> torch.Tensor:
        """Prefill each distinct prompt of `chunk` once and copy its keys/values into the slots of
        the requests that repeat it (the n samples of a GRPO group share one prompt: one prefill
        instead of n); last-position logits [N, V] for every request of the chunk."""
        first: dict[tuple[int, ...], _Seq] = {}
        for s in chunk:
            first.setdefault(tuple(s.prompt_ids), s)
        if len(first) == len(chunk):
            return self._prefill([s.slot for s in chunk], [s.prompt_ids for s in chunk])
        uniq = list(first.values())
        logits_UV = self._prefill([s.slot for s in uniq], [s.prompt_ids for s in uniq])
        index = {id(s): u for u, s in enumerate(uniq)}
        src = [first[tuple(s.prompt_ids)] for s in chunk]
        copies = [(a.slot, s.slot) for a, s in zip(src, chunk, strict=True) if a is not s]
        src_M = torch.tensor([a for a, _ in copies], device=self.device)
        dst_M = torch.tensor([b for _, b in copies], device=self.device)
        P = max(len(s.prompt_ids) for s in chunk)
        for cache in (*self.cache.k, *self.cache.v):
            cache[dst_M, :, :P] = cache[src_M, :, :P]
        rows_N = torch.tensor([index[id(a)] for a in src], device=self.device)
        return logits_UV[rows_N]

    def _chunks(self, items: list, lens: list[int]) -> Iterator[list]:
        """Split items into prefill chunks of at most max_prefill_tokens padded tokens."""
        chunk: list = []
        longest = 0
        for item, n in zip(items, lens, strict=True):
            if chunk and max(longest, n) * (len(chunk) + 1) > self.cfg.max_prefill_tokens:
                yield chunk
                chunk, longest = [], 0
            chunk.append(item)
            longest = max(longest, n)
        if chunk:
            yield chunk

    def _recompute_kv(self) -> None:
        """Rebuild running sequences' keys/values under the live weights: each distinct prompt
        once, copied to the slots that share it (as at admission), then each row's generated
        tokens after its prompt. A GRPO group's n rows cost one prompt prefill instead of n full
        ones (2.4-2.9x less recompute time for the tiny default's 32 x 8 rows on one CPU thread)."""
        t0 = time.perf_counter()
        running = [s for s in self._slots if s is not None]
        for chunk in self._chunks(running, [len(s.prompt_ids) for s in running]):
            self._prefill_shared(chunk)
        pos = self._pos.tolist()
        grown = [s for s in running if pos[s.slot] > len(s.prompt_ids)]
        for chunk in self._chunks(grown, [pos[s.slot] - len(s.prompt_ids) for s in grown]):
            self._extend(chunk)
        self._kv_stale = False
        self._stall_s += time.perf_counter() - t0

    def _extend(self, chunk: list[_Seq]) -> None:
        """Write the keys/values of each row's generated tokens (positions len(prompt)..pos-1),
        attending to the keys before them: the prompt's are already in the cache."""
        dev = self.device
        slots_N = torch.tensor([s.slot for s in chunk], device=dev)
        start_N = torch.tensor([len(s.prompt_ids) for s in chunk], device=dev)
        pos_N = self._pos[slots_N]
        T, S = int((pos_N - start_N).max()), int(pos_N.max())
        # padding positions point past each row's last key (clamped into the cache: a row's
        # keys end before window - 1), where the next decode step writes before reading
        pos_NT = (start_N[:, None] + self._ar_L[:T]).clamp(max=self.window - 1)
        mask_N1TS = (self._ar_L[:S] <= pos_NT[:, :, None])[:, None]
        self.model.hidden(self._seq[slots_N[:, None], pos_NT], pos_NT,
                          kv_cache=ExtendKV(self.cache.k, self.cache.v, slots_N, pos_NT, S),
                          attn_mask_B1TS=mask_N1TS)

    def _admit(self) -> list[Completion]:
        free = [i for i, s in enumerate(self._slots) if s is None]
        min_admit = min(self.cfg.min_admit or max(1, self.cfg.max_batch_size // 8),
                        len(self._waiting))
        if self._hi > 0 and len(free) < min_admit:
            return []
        new: list[_Seq] = []
        while free and self._waiting:
            s = self._waiting.popleft()
            s.slot, s.version_start = free.pop(0), self._version
            new.append(s)
        if not new:
            return []
        self._fill_slots(new)
        self._hi = max(self._hi, max(s.slot for s in new) + 1)
        self._sampling = None
        finished = []
        for chunk in self._chunks(new, [len(s.prompt_ids) for s in new]):
            logits_NV = self._prefill_shared(chunk)
            slots_N = torch.tensor([s.slot for s in chunk], device=self.device)
            logp_NV = torch.log_softmax(logits_NV.float() / self._temp[slots_N, None], dim=-1)
            finished += self._sample_and_record(logp_NV, slots_N)
        return finished

    def _compact(self) -> None:
        """Move the highest running slots into the holes below them, so that decoding (over
        slots 0..hi-1) computes no idle rows once nothing waits to fill them."""
        holes = [i for i in range(self._hi) if self._slots[i] is None]
        moves: list[tuple[int, int]] = []
        top = self._hi - 1
        for dst in holes:
            while top > dst and self._slots[top] is None:
                top -= 1
            if top <= dst:
                break
            moves.append((top, dst))
            top -= 1
        if not moves:
            return
        src_M = torch.tensor([m[0] for m in moves], device=self.device)
        dst_M = torch.tensor([m[1] for m in moves], device=self.device)
        P = int(self._pos[src_M].max()) + 1
        for cache in (*self.cache.k, *self.cache.v):
            cache[dst_M, :, :P] = cache[src_M, :, :P]
        for t in (self._pos, self._n_gen, self._active, self._max_new, self._seq, self._out_logp,
                  self._stop, self._temp, self._greedy, self._top_k, self._top_p, self._seed):
            t[dst_M] = t[src_M]
        for src, dst in moves:
            seq = self._slots[src]
            seq.slot, self._slots[dst], self._slots[src] = dst, seq, None
            self._active[src], self._pos[src], self._n_gen[src] = False, 0, 0
        while self._hi > 0 and self._slots[self._hi - 1] is None:
            self._hi -= 1
        self._sampling = None

    def _fill_slots(self, new: list[_Seq]) -> None:
        """Per-slot state of newly admitted sequences: one indexed write per field (on CUDA, one
        copy each instead of one per request and field)."""
        for s in new:
            self._slots[s.slot] = s
        T = max(len(s.prompt_ids) for s in new)
        W = max(self._stop.shape[1], max(len(s.stop_ids) for s in new))
        if W > self._stop.shape[1]:
            grown = torch.full((self._stop.shape[0], W), -1, dtype=torch.long, device=self.device)
            grown[:, : self._stop.shape[1]] = self._stop
            self._stop = grown
        prompts_NT = _padded([s.prompt_ids for s in new], T, 0)
        stop_NW = _padded([s.stop_ids for s in new], W, -1)
        sp = [s.req.sampling for s in new]
        ints_NF = torch.tensor([[len(s.prompt_ids), int(p.max_new_tokens),
                                 int(p.top_k) if p.top_k > 0 else self.vocab_size, int(s.seed)]
                                for s, p in zip(new, sp, strict=True)], dtype=torch.long)
        floats_NF = torch.tensor([[1.0 if p.greedy else float(p.temperature), float(p.top_p)]
                                  for p in sp], dtype=torch.float32)
        dev = self.device
        idx_N = torch.tensor([s.slot for s in new]).to(dev)
        ints_NF, floats_NF = ints_NF.to(dev), floats_NF.to(dev)
        self._seq[idx_N, :T] = prompts_NT.to(dev)
        self._stop[idx_N] = stop_NW.to(dev)
        self._pos[idx_N] = ints_NF[:, 0]
        self._max_new[idx_N] = ints_NF[:, 1]
        self._top_k[idx_N] = ints_NF[:, 2]
        self._seed[idx_N] = ints_NF[:, 3]
        self._temp[idx_N] = floats_NF[:, 0]
        self._top_p[idx_N] = floats_NF[:, 1]
        self._greedy[idx_N] = torch.tensor([bool(p.greedy) for p in sp], dtype=torch.bool).to(dev)
        self._n_gen[idx_N] = 0
        self._active[idx_N] = True

    def _sampling_batch(self, rows) -> SamplingBatch:
        greedy_B = self._greedy[rows]
        truncated_B = ~greedy_B & ((self._top_k[rows] < self.vocab_size) | (self._top_p[rows] < 1))
        return SamplingBatch(self._temp[rows], greedy_B, self._top_k[rows], self._top_p[rows],
                             self._seed[rows], bool((~greedy_B).any()), bool(truncated_B.any()),
                             truncated_B)

    def _sample_and_record(self, logp_BV: torch.Tensor, rows) -> list[Completion]:
        """Sample one token for `rows` (slot indices or a slice) from their log-probs
        log_softmax(logits / temperature), store it, finish the done."""
        if isinstance(rows, slice):
            if self._sampling is None:
                self._sampling = self._sampling_batch(rows)
            params = self._sampling
        else:
            params = self._sampling_batch(rows)
        n_gen_B = self._n_gen[rows]
        tok_B, logp_B = sample_from_logprobs(logp_BV, params, n_gen_B)
        slots_B = self.cache.rows_all[rows]
        pos_B = self._pos[rows]
        self._seq[slots_B, pos_B] = tok_B
        self._out_logp[slots_B, n_gen_B] = logp_B
        n_gen_B = n_gen_B + self._active[rows]
        self._n_gen[rows] = n_gen_B
        stop_B = (tok_B[:, None] == self._stop[rows]).any(-1)
        done_B = self._active[rows] & (stop_B | (n_gen_B >= self._max_new[rows])
                                       | (pos_B + 1 >= self.window))
        if not bool(done_B.any()):
            return []
        done_idx = done_B.nonzero().squeeze(1)
        return self._finish_many(slots_B[done_idx].tolist(),
                                 ["stop" if st else "length" for st in stop_B[done_idx].tolist()])

    def _decode(self) -> list[Completion]:
        hi = self._hi
        # At least 2 rows (an idle row computes junk into its own slot): B = 1 would make the
        # compiled step specialise and compile a second graph.
        B = min(max(hi, 2), self.cfg.max_batch_size)
        if self._graphs is not None:
            B = self._graphs.rows_bucket(B)
        pos_B = self._pos[:B]
        last_B1 = self._seq[:B].gather(1, pos_B[:, None])
        S = int(pos_B.max()) + 1
        if self._graphs is not None:
            S = self._graphs.keys_bucket(S)  # keys past a row's position are masked
        elif self.device.type == "cpu":  # fewer keys take a slow CPU softmax (transformer.py)
            S = min(max(S, CPU_MIN_KEYS), self.window)
        logp_BV = self._decode_step(self.model, self.cache.k, self.cache.v, self.cache.rows_all[:B],
                                    last_B1, pos_B, self._ar_L[:S], self._temp[:B])
        self._pos[:hi] += self._active[:hi]
        return self._sample_and_record(logp_BV[:hi], slice(0, hi))

    def _finish(self, s: _Seq, reason: FinishReason) -> Completion:
        return self._finish_many([s.slot], [reason])[0]

    def _finish_many(self, slots: list[int], reasons: list[FinishReason]) -> list[Completion]:
        """Free `slots` and return their completions; one read of each per-slot tensor for all of
        them (per-slot reads were a sixth of a generation's time on the tiny model)."""
        idx = torch.tensor(slots, device=self.device)
        n_gen = self._n_gen[idx].tolist()
        width = max(n_gen, default=0)
        starts = [len(self._slots[i].prompt_ids) for i in slots]  # type: ignore[union-attr]
        seq = self._seq[idx, : max(starts, default=0) + width].tolist()
        logp = self._out_logp[idx, :width].tolist()
        self._active[idx], self._pos[idx], self._n_gen[idx] = False, 0, 0
        out = []
        for j, (i, reason, n, start) in enumerate(zip(slots, reasons, n_gen, starts, strict=True)):
            s = self._slots[i]
            assert s is not None
            changes = [(k, v) for k, v in s.version_changes if k < n]
            version_end = changes[-1][1] if changes else s.version_start
            self._slots[i] = None
            out.append(Completion(s.req.request_id, s.prompt_ids, seq[j][start: start + n],
                                  logp[j][:n], reason, s.version_start, version_end, changes))
        while self._hi > 0 and self._slots[self._hi - 1] is None:
            self._hi -= 1
        self._sampling = None
        return out
