"""Per-step metrics from every rank, merged on rank 0 and written to the sinks in step order.

The schedule adds what each stage's `run_step` returned (`add`) and then calls
`stage_done(stage, step)`. Once every stage of this rank is done with a step, its partial record (sums
and weights, so merging is exact) goes to rank 0 as JSON bytes over gloo point-to-point on a
dedicated group (tag 1: length, tag 2: payload; never pickle). Rank 0 writes a step's line when
every rank has reported it, or when the ranks have all finished.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from asyncflow.log import get_logger
from asyncflow.metrics import MetricSink
from asyncflow.metrics.trace import Tracer
from asyncflow.pipeline.stage import Metrics, final_values, merge_entries

logger = get_logger(__name__)

_LEN_TAG, _DATA_TAG = 1, 2


ROLLOUT_WORK = ("rollout", "reward", "advantage", "eval")
TRAIN_WORK = ("train", "reference")


def _finalise(entries: dict[str, list], mesh_sizes: dict[str, int]) -> dict[str, float]:
    out = final_values(entries)
    period = out.get("perf/step_time_s")
    if period:
        if "rollout/generated_tokens" in out:
            out["perf/tokens_per_s"] = out["rollout/generated_tokens"] / period
        # idle fraction of a mesh: 1 - (busy seconds of its stages) / (period x its ranks)
        if mesh_sizes.get("colocated"):
            work = {"all": (ROLLOUT_WORK + TRAIN_WORK, mesh_sizes["colocated"])}
        else:
            work = {"rollout": (ROLLOUT_WORK, mesh_sizes.get("rollout", 0)),
                    "train": (TRAIN_WORK, mesh_sizes.get("train", 0))}
        for mesh, (stages, n) in work.items():
            if n:
                busy = sum(out.get(f"time/{s}_s", 0.0) for s in stages)
                out[f"idle/{mesh}"] = max(0.0, 1.0 - busy / (period * n))
    return dict(sorted(out.items()))


class StepRecorder:
    """One per rank. Thread-safe; stages on different threads record concurrently."""

    def __init__(self, stages: list[str], group: dist.ProcessGroup | None,
                 sinks: list[MetricSink] | None = None, tracer: Tracer | None = None,
                 mesh_sizes: dict[str, int] | None = None, start_step: int = 0):
        self.start_step = start_step
        """First step of this (possibly resumed) run; records of earlier steps are dropped."""
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.tracer = tracer or Tracer(self.rank, enabled=False)
        self.mesh_sizes = mesh_sizes or {}
        """rank 0: {"rollout": n, "train": n} or {"colocated": n}, for idle fractions."""
        self.world = dist.get_world_size(group) if group is not None else 1
        self.group = group
        self.stages = set(stages)
        self.sinks = sinks or []
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._local: dict[int, dict[str, list]] = defaultdict(dict)
        self._done: dict[int, set[str]] = defaultdict(set)
        # rank 0 only: merged records, which ranks reported each step, next step to write
        self._merged: dict[int, dict[str, list]] = defaultdict(dict)
        self._reported: dict[int, set[int]] = defaultdict(set)
        self._finished_ranks: set[int] = set()
        self._next_write = start_step
        self._receiver: threading.Thread | None = None
        if self.rank == 0 and self.world > 1:
            self._receiver = threading.Thread(target=self._receive_loop, name="metrics-recv",
                                              daemon=True)
            self._receiver.start()

    # -- recording (any rank, any thread)
    def add(self, metrics: Metrics) -> None:
        """A stage's returned measurements (values by step, trace spans)."""
        with self._lock:
            for step, part in metrics.entries.items():
                if step >= self.start_step:
                    merge_entries(self._local[step], part)
        self.tracer.add(metrics.spans)

    def stage_done(self, stage: str, step: int) -> None:
        if step < self.start_step:
            return
        with self._lock:
            self._done[step].add(stage)
            if not self.stages <= self._done[step]:
                return
            part = self._local.pop(step, {})
            del self._done[step]
        self._ship(step, part)

    def _ship(self, step: int, part: dict[str, list]) -> None:
        if self.rank == 0:
            self._accept(0, {"step": step, "part": part})
            return
        payload = torch.frombuffer(bytearray(json.dumps({"step": step, "part": part}).encode()),
                                   dtype=torch.uint8)
        with self._send_lock:
            dist.send(torch.tensor([payload.numel()]), 0, group=self.group, tag=_LEN_TAG)
            dist.send(payload, 0, group=self.group, tag=_DATA_TAG)

    # -- rank 0
    def _receive_loop(self) -> None:
        while len(self._finished_ranks) < self.world - 1:
            n = torch.zeros(1, dtype=torch.int64)
            src = dist.recv(n, None, group=self.group, tag=_LEN_TAG)
            buf = torch.empty(int(n.item()), dtype=torch.uint8)
            dist.recv(buf, src, group=self.group, tag=_DATA_TAG)
            self._accept(src, json.loads(bytes(buf.numpy()).decode()))

    def _accept(self, src: int, msg: dict[str, Any]) -> None:
        with self._lock:
            if msg.get("finished"):
                self._finished_ranks.add(src)
            else:
                merge_entries(self._merged[msg["step"]], msg["part"])
                self._reported[msg["step"]].add(src)
            self._write_ready(final=False)

    def _write_ready(self, final: bool) -> None:
        while True:
            step = self._next_write
            complete = len(self._reported.get(step, ())) == self.world
            if not complete and not (final and step in self._merged):
                if final and self._merged and step < max(self._merged):
                    self._next_write += 1  # a step no rank recorded anything for
                    continue
                return
            record = _finalise(self._merged.pop(step, {}), self.mesh_sizes)
            self._reported.pop(step, None)
            for sink in self.sinks:
                sink.write(step, record)
            self._next_write += 1

    def finish(self) -> None:
        """Flush every pending step; on rank 0 wait for the others, then write what is left."""
        with self._lock:
            pending = sorted(self._local)
            parts = [(s, self._local.pop(s)) for s in pending]
            self._done.clear()
        for step, part in parts:
            self._ship(step, part)
        if self.rank != 0:
            payload = torch.frombuffer(bytearray(b'{"finished": true}'), dtype=torch.uint8)
            with self._send_lock:
                dist.send(torch.tensor([payload.numel()]), 0, group=self.group, tag=_LEN_TAG)
                dist.send(payload, 0, group=self.group, tag=_DATA_TAG)
            return
        if self._receiver is not None:
            self._receiver.join()
        with self._lock:
            self._write_ready(final=True)
        for sink in self.sinks:
            sink.close()
