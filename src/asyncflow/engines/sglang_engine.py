"""The SGLang rollout engine: SGLang's offline `sglang.Engine` behind `RolloutEngine` (GPU only).

Written against sglang 0.5.23 (the `sglang` extra pins it) from that wheel's source (paths below
are inside its `sglang/srt/`). Not run yet: the machine it was written on had neither a GPU nor
sglang. `pytest -m gpu` runs it in the engine conformance suite where sglang imports. sglang is
imported when an engine is built, never when this module is.

| RolloutEngine     | sglang 0.5.23 (`Engine`, its `tokenizer_manager`)                        |
|-------------------|--------------------------------------------------------------------------|
| generate / stream | `Engine.async_generate(input_ids=, sampling_params=,                     |
|                   | return_logprob=True, rid=)`, one per request; SGLang batches them        |
| load_weights      | held here: an SGLang update writes the live weights, it has no staging   |
| commit_weights(v) | `pause_generation(mode="retract")`, `begin_weight_update`,               |
|                   | `update_weights_from_tensor(weight_version=str(v), flush_cache=True)`,   |
|                   | `end_weight_update`, `continue_generation`                               |
| pause / resume    | `pause_generation(mode="retract")` / `continue_generation`               |
| abort             | `abort_request(rid)`                                                     |
| shutdown          | `Engine.shutdown()`                                                      |
| release_memory    | `release_memory_occupation` / `resume_memory_occupation` (memory_saver)  |

Commits. An update that is not paused takes the tokenizer manager's `model_update_lock` as a
writer, which waits for every running request to finish (managers/tokenizer_control_mixin.py); a
pause first makes it apply at once. "retract" pauses keep each request's generated tokens and drop
its KV cache, so after `continue_generation` the running requests are re-prefilled under the new
weights (what the torch engine's `kv_on_commit="recompute"` does) and the cache flush that
`flush_cache=True` asks for succeeds (scheduler.flush_cache ignores the waiting queue while
paused). An "in_place" pause keeps stale keys and values and makes that flush fail, failing the
update (scheduler_components/weight_updater.py), so it is not offered. Updates must sit between
`begin_weight_update` and `end_weight_update` in 0.5.23 (the same file refuses them otherwise).

Versions. The engine starts with `weight_version=str(policy_version)` and each commit passes the
new one; the scheduler records, for every live request, the output length at each change
(utils/weight_versions.py), and a finished request's `meta_info["weight_versions"]` lists spans
`{"version", "start", "end"}` over its output tokens: they become `policy_version_start/end` and
`version_changes`.

Log-probs. sglang 0.5.23 `layers/sampler.py`, `Sampler.forward`: when every
request of a batch is greedy it returns `log_softmax(logits)`; otherwise it divides the logits in
place by each request's temperature, takes the softmax and returns `log(probs)` of it, while top-k,
top-p and min-p renormalise a copy inside the sampling kernels: log softmax(logits / T) before
truncation, which is this protocol's definition (`Completion.logprobs`). A greedy request
(temperature 0) becomes temperature 1 with top_k 1 in `sampling/sampling_params.py`
(`SamplingParams.__post_init__`), so its log-probs are at T = 1, also ours. Speculative decoding
uses the same rule (`layers/logprob_processor.py`, `compute_spec_logprobs`). So nothing is
corrected here, with two exceptions SGLang has: the environment variable
SGLANG_RETURN_ORIGINAL_LOGPROB=1 makes it return log_softmax(logits) at T = 1 for every request,
which cannot be corrected afterwards (log softmax(z / T) needs the log-sum-exp of z / T, which is
not returned): the engine refuses to start with it set; and `rl_on_policy_target` takes the
log-softmax of bf16(logits / T) (rounded before the softmax): this adapter never sets it.

Seeds. SGLang honours a request's `sampling_seed` only with `enable_deterministic_inference`
(`deterministic=True` here; `sampling/sampling_batch_info.py`), and then gives unseeded requests
the seed 42, so that a GRPO group's copies of one prompt would all sample the same tokens: every
request gets a seed, drawn from this engine's generator when it brings none, as in the torch
engine. Deterministic inference also selects SGLang's pytorch sampling backend
(`arg_groups/overrides.py`), which takes seeds with top-k/top-p.

Threads. `Engine`'s synchronous methods run `loop.run_until_complete` on its event loop, which
cannot run twice: a commit from the weight thread would fail while `generate` waits. The loop
runs forever on a thread of its own instead, and every call is a coroutine of the tokenizer
manager (the ones the synchronous methods wrap) submitted with `run_coroutine_threadsafe`.
Request ids sent to SGLang are this engine's own (`<prefix><n>.`): its scheduler aborts every
request whose id *starts with* the aborted one (`Scheduler.abort_request`).

Not done: `init_weights_update_group` / `update_weights_from_distributed` (SGLang's scheduler
joining an NCCL group with the train rank, skipping this process): weights reach this engine over
asyncflow's own sync group (NCCL when both meshes are on CUDA) and go to SGLang's scheduler process
by CUDA IPC (`update_weights_from_tensor`). `release_memory` / `resume_memory` exist but no
pipeline stage calls them yet. Tensor parallelism (`tp_size`) is passed through, untested.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from asyncflow.engines.base import (
    Completion,
    EngineHealth,
    FinishReason,
    GenerationRequest,
    RolloutEngineConfig,
    SamplingParams,
    check_prompt,
    check_unique_ids,
    in_request_order,
    refused,
    request_seed,
)
from asyncflow.log import get_logger
from asyncflow.models import ModelConfig, build_model

logger = get_logger(__name__)

SGLANG_VERSION = "0.5.23"
"""The sglang release this adapter was written against."""
_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class SGLangEngineConfig(RolloutEngineConfig):
    """SGLang's offline engine (GPU only; `pip install asyncflow[sglang]`)."""

    kind: str = "sglang"
    """Engine kind; "sglang" for this one."""
    device: str = "cuda"
    """GPU of the engine (its first tensor-parallel rank): "cuda" (the rank's own) or
    "cuda:N"."""
    dtype: str = "bfloat16"
    """Weights and activations: bfloat16, float16 or float32."""
    tp_size: int = 1
    """Tensor-parallel GPUs per engine (consecutive from `device`)."""
    mem_fraction_static: float = 0.5
    """Share of GPU memory SGLang takes for weights and KV cache; colocated with a trainer on the
    same GPU, leave it room."""
    max_batch_size: int = 0
    """Most requests decoded together (SGLang's max_running_requests); 0 lets SGLang size it
    from memory."""
    max_seq_len: int = 0
    """Prompt + completion length (SGLang's context_length), capped by the model's context
    window; 0 means the model's window."""
    deterministic: bool = False
    """SGLang's enable_deterministic_inference: batch-invariant kernels, and per-request seeds
    honoured (same seed, prompt and weights give the same tokens whatever else runs)."""
    cuda_graphs: bool = True
    """Replay decode steps from CUDA graphs (False: quicker start, slower decoding)."""
    memory_saver: bool = False
    """SGLang's enable_memory_saver, needed by `release_memory` / `resume_memory`."""
    seed: int = 0
    """SGLang's random_seed, and the seed of the per-request seeds drawn here."""
    log_level: str = "error"
    """Log level of SGLang's own processes."""

    def __post_init__(self):
        if not self.device.startswith("cuda"):
            raise ValueError(f"engine.device={self.device!r}: the sglang engine runs on CUDA; "
                             "use 'cuda' or 'cuda:N' (engine=torch runs on CPU)")
        if self.dtype not in _DTYPES:
            raise ValueError(f"engine.dtype={self.dtype!r}; use one of {list(_DTYPES)}")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"engine.mem_fraction_static={self.mem_fraction_static} must be in "
                             "(0, 1)")
        if self.tp_size < 1:
            raise ValueError(f"engine.tp_size={self.tp_size} must be >= 1")
        for name in ("max_batch_size", "max_seq_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"engine.{name}={getattr(self, name)} must be >= 0 (0: auto)")


# ---- translation (pure functions: unit-tested without sglang) ------------------------------


def server_kwargs(cfg: SGLangEngineConfig, model_path: str | Path, gpu_id: int,
                  context_length: int, policy_version: int) -> dict[str, Any]:
    """Keyword arguments of `sglang.Engine(...)` (its ServerArgs) for this config."""
    kwargs: dict[str, Any] = dict(
        model_path=str(model_path), skip_tokenizer_init=True, dtype=cfg.dtype,
        tp_size=cfg.tp_size, base_gpu_id=gpu_id, mem_fraction_static=cfg.mem_fraction_static,
        context_length=context_length, random_seed=cfg.seed,
        weight_version=str(policy_version),
        enable_deterministic_inference=cfg.deterministic,
        disable_cuda_graph=not cfg.cuda_graphs, enable_memory_saver=cfg.memory_saver,
        log_level=cfg.log_level)
    if cfg.max_batch_size:
        kwargs["max_running_requests"] = cfg.max_batch_size
    return kwargs


def sampling_kwargs(sp: SamplingParams, eos_ids: Sequence[int], seed: int) -> dict[str, Any]:
    """SGLang's `sampling_params` dict for one (checked) request.

    SGLang always stops at the model's eos ids unless `ignore_eos`, which also turns its
    `stop_token_ids` off; our `stop_token_ids` replace the eos ids. A list that leaves out an eos
    id cannot be expressed: ValueError, so the request fails alone."""
    stop = None
    if sp.stop_token_ids is not None and not sp.ignore_eos:
        left_out = sorted(set(eos_ids) - set(sp.stop_token_ids))
        if left_out:
            raise ValueError(f"stop_token_ids={list(sp.stop_token_ids)} leave out the eos ids "
                             f"{left_out}, at which the sglang engine always stops; add them "
                             "or pass stop_token_ids=None")
        stop = [int(t) for t in sp.stop_token_ids]
    return {"max_new_tokens": int(sp.max_new_tokens),
            "temperature": 0.0 if sp.greedy else float(sp.temperature),
            "top_p": float(sp.top_p), "top_k": int(sp.top_k) if sp.top_k > 0 else -1,
            "ignore_eos": bool(sp.ignore_eos), "stop_token_ids": stop,
            "sampling_seed": int(seed)}


def _finish_reason(meta: dict[str, Any]) -> FinishReason:
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else None
    if kind in ("stop", "length", "abort"):
        return kind
    raise ValueError(f"sglang finished request {meta.get('id')!r} with finish_reason "
                     f"{reason!r}; expected type stop, length or abort")


def completion_from_output(request_id: str, prompt_ids: list[int], out: dict[str, Any],
                           submitted_version: int) -> Completion:
    """A finished request's output (`{"output_ids": [...], "meta_info": {...}}`) as a Completion.

    Tokens and log-probs come from `meta_info["output_token_logprobs"]`, one `(logprob, token id,
    text or None)` per generated token, checked against `output_ids`; versions from
    `meta_info["weight_versions"]`. A request that produced nothing may come without spans (an
    abort in the waiting queue): its versions are `submitted_version`."""
    meta = out["meta_info"]
    entries = meta.get("output_token_logprobs") or []
    tokens = [int(t) for _, t, *_ in entries]
    logprobs = [float(lp) for lp, *_ in entries]
    if list(out.get("output_ids", tokens)) != tokens:
        raise ValueError(f"sglang request {meta.get('id')!r}: output_ids {out['output_ids']} "
                         f"differ from the tokens of output_token_logprobs {tokens}")
    spans = meta.get("weight_versions")
    if not spans:
        if tokens:
            raise ValueError(f"sglang request {meta.get('id')!r} has {len(tokens)} tokens and no "
                             f"meta_info['weight_versions']; sglang {SGLANG_VERSION} reports them")
        start = end = submitted_version
        changes: list[tuple[int, int]] = []
    else:
        start, end = int(spans[0]["version"]), int(spans[-1]["version"])
        changes = [(int(s["start"]), int(s["version"])) for s in spans[1:]]
    return Completion(request_id, list(prompt_ids), tokens, logprobs, _finish_reason(meta),
                      start, end, changes)


def import_sglang():
    """The sglang module, or ImportError saying how to get it."""
    try:
        import sglang
    except ImportError as e:
        raise ImportError(
            f"engine=sglang needs sglang {SGLANG_VERSION} and a CUDA GPU: "
            f"pip install asyncflow[sglang] ({e}); engine=torch runs anywhere") from e
    return sglang


# ---- the engine ---------------------------------------------------------------------------


class SGLangRolloutEngine:
    """`RolloutEngine` over `sglang.Engine`, serving the HF checkpoint at `model_path`."""

    def __init__(self, model_path: str | Path, cfg: SGLangEngineConfig, policy_version: int = 0):
        if os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes"):
            raise ValueError("SGLANG_RETURN_ORIGINAL_LOGPROB is set: sglang would return "
                             "log-probs at temperature 1 whatever the sampling temperature; "
                             "unset it")
        sglang = import_sglang()
        from sglang.srt.managers import io_struct
        from sglang.srt.utils import MultiprocessingSerializer

        self._io, self._serializer = io_struct, MultiprocessingSerializer
        self.cfg = cfg
        mc = ModelConfig.from_file(model_path)
        self.vocab_size, self.eos_ids = mc.vocab_size, mc.eos_token_ids
        self.window = min(cfg.max_seq_len or mc.max_position_embeddings,
                          mc.max_position_embeddings)
        meta = build_model(mc, device="meta")
        self._shapes = {n: tuple(t.shape) for n, t in meta.state_dict().items()}
        from asyncflow.weights import weight_specs

        self._required = [name for name, _, _ in weight_specs(meta)]
        device = torch.device(cfg.device)
        gpu = device.index if device.index is not None else torch.cuda.current_device()
        self._engine = sglang.Engine(**server_kwargs(cfg, model_path, gpu, self.window,
                                                     policy_version))
        self._tm = self._engine.tokenizer_manager
        self._loop = self._engine.loop
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="sglang-loop",
                                             daemon=True)
        self._loop_thread.start()
        self._rid_prefix = f"af{secrets.token_hex(4)}-"
        self._next_rid = 0
        self._rng = torch.Generator().manual_seed(cfg.seed)
        self._lock = threading.Lock()  # guards the fields below
        self._inflight: dict[str, str] = {}  # sglang rid -> request id
        self._idle = threading.Condition(self._lock)
        self._control = threading.Lock()  # one pause / commit / resume at a time
        self._staged: dict[str, torch.Tensor] = {}
        self._version = policy_version
        self._paused = False
        self._closed = False
        self._stall_s = 0.0
        logger.info("sglang %s engine on cuda:%d (tp %d, %s), context %d", sglang.__version__,
                    gpu, cfg.tp_size, cfg.dtype, self.window)

    def _call(self, coro):
        """Run a coroutine on the engine's loop thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _checked(self, result, what: str) -> None:
        success, message = result
        if not success:
            raise RuntimeError(f"sglang {what} failed: {message}")

    # ---- protocol: weights, control -------------------------------------------------------

    @property
    def policy_version(self) -> int:
        return self._version

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hold references to the tensors until `commit_weights` (they must not change until
        then); ValueError on an unknown name or a wrong shape."""
        for name, tensor in named_tensors:
            shape = self._shapes.get(name)
            if shape is None:
                raise ValueError(f"weight {name!r} is not a parameter of the model; expected HF "
                                 f"names such as {next(iter(self._shapes))!r}")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"weight {name!r} has shape {list(tensor.shape)}, the model's "
                                 f"is {list(shape)}")
            self._staged[name] = tensor.detach()

    def commit_weights(self, policy_version: int) -> None:
        missing = [n for n in self._required if n not in self._staged]
        if missing:
            raise ValueError(f"commit before every weight was loaded: missing {missing[:4]}"
                             f"{'...' if len(missing) > 4 else ''} ({len(missing)} tensors)")
        io = self._io
        with self._control:
            t0 = time.perf_counter()
            pause_here = not self._paused
            if pause_here:
                self._call(self._tm.pause_generation(io.PauseGenerationReqInput(mode="retract")))
            try:
                self._checked(self._call(self._tm.begin_weight_update(
                    io.BeginWeightUpdateReqInput(), None)), "begin_weight_update")
                try:
                    payload = [self._serializer.serialize(list(self._staged.items()))
                               for _ in range(self.cfg.tp_size)]
                    self._checked(self._call(self._tm.update_weights_from_tensor(
                        io.UpdateWeightsFromTensorReqInput(
                            serialized_named_tensors=payload, flush_cache=True,
                            weight_version=str(policy_version)), None)),
                        "update_weights_from_tensor")
                finally:
                    self._checked(self._call(self._tm.end_weight_update(
                        io.EndWeightUpdateReqInput(), None)), "end_weight_update")
            finally:
                if pause_here:
                    self._call(self._tm.continue_generation(io.ContinueGenerationReqInput()))
            self._staged.clear()
            self._version = policy_version
            self._stall_s += time.perf_counter() - t0

    def pause(self) -> None:
        with self._control:
            if not self._paused:
                self._call(self._tm.pause_generation(
                    self._io.PauseGenerationReqInput(mode="retract")))
                self._paused = True

    def resume(self) -> None:
        with self._control:
            if self._paused:
                self._call(self._tm.continue_generation(self._io.ContinueGenerationReqInput()))
                self._paused = False

    def abort(self, request_ids: Iterable[str]) -> None:
        wanted = set(request_ids)
        with self._lock:
            rids = [rid for rid, request_id in self._inflight.items() if request_id in wanted]
        for rid in rids:
            self._loop.call_soon_threadsafe(self._tm.abort_request, rid)

    def release_memory(self) -> None:
        """Free the weights' and KV cache's GPU memory (e.g. while a colocated trainer steps);
        needs `memory_saver` and no request in flight."""
        with self._lock:
            if self._inflight:
                raise ValueError(f"release_memory with {len(self._inflight)} requests in flight")
        self._call(self._tm.release_memory_occupation(
            self._io.ReleaseMemoryOccupationReqInput(), None))

    def resume_memory(self) -> None:
        self._call(self._tm.resume_memory_occupation(
            self._io.ResumeMemoryOccupationReqInput(), None))

    def health(self) -> EngineHealth:
        with self._lock:
            running = len(self._inflight)
        return EngineHealth(healthy=not self._closed, policy_version=self._version,
                            paused=self._paused, num_running=running, num_waiting=0,
                            commit_stall_s=self._stall_s)

    def shutdown(self) -> None:
        """Abort what is in flight (a running stream yields it as aborted), then stop SGLang."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            ids = list(self._inflight.values())
        self.abort(ids)
        with self._idle:
            self._idle.wait_for(lambda: not self._inflight, timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=30)
        self._engine.shutdown()

    # ---- protocol: generation -------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        check_unique_ids(requests)
        return in_request_order(requests, self.stream(requests))

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[Completion]:
        if self._closed:
            raise ValueError("engine was shut down; build a new one")
        check_unique_ids(requests)
        pending: dict[concurrent.futures.Future, tuple[GenerationRequest, list[int], int]] = {}
        for req in requests:
            try:
                req.sampling.check(self.vocab_size)
                prompt = check_prompt(req.prompt_ids, self.vocab_size, self.window)
                params = sampling_kwargs(req.sampling, self.eos_ids,
                                         request_seed(req.sampling, self._rng))
            except ValueError as e:
                logger.warning("request %s refused: %s", req.request_id, e)
                yield refused(req, str(e), self._version)
                continue
            pending[self._submit(req.request_id, prompt, params)] = (req, prompt, self._version)
        try:
            for fut in concurrent.futures.as_completed(list(pending)):
                req, prompt, version = pending.pop(fut)
                try:
                    out = fut.result()
                except ValueError as e:  # sglang refused this request alone (status 400)
                    logger.warning("request %s refused by sglang: %s", req.request_id, e)
                    yield refused(req, str(e), self._version)
                    continue
                yield completion_from_output(req.request_id, prompt, out, version)
        finally:  # the consumer stopped early: nothing of this stream keeps running
            if pending:
                self.abort(req.request_id for req, _, _ in pending.values())

    def _submit(self, request_id: str, prompt: list[int],
                params: dict[str, Any]) -> concurrent.futures.Future:
        with self._lock:
            rid = f"{self._rid_prefix}{self._next_rid}."
            self._next_rid += 1
            self._inflight[rid] = request_id
        fut = asyncio.run_coroutine_threadsafe(self._engine.async_generate(
            input_ids=prompt, sampling_params=params, return_logprob=True, rid=rid), self._loop)

        def done(_):
            with self._idle:
                del self._inflight[rid]
                self._idle.notify_all()

        fut.add_done_callback(done)
        return fut
