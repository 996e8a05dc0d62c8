"""The queue's own cost in one step of the default run: its calls replayed in one process.

    python benchmarks/queue_step.py [--steps 400] [--repeats 5] [--transport local,shm]

The calls the GRPO stages make for one step of the tiny default (32 prompts x 8 rows, 6-token
responses), in their order and with their columns and samplers: prompts put, rollout get + put
(its lease acked by the put; the rows in the order their groups finish, shuffled, so later reads
of the response columns gather rather than slice), reward get + put, advantage get (whole
groups) + put, train get (the step's groups) + ack. The queue layout is the real graph's (`grpo_graph`). The controller is
in-process (as on the host rank); `local` is the colocated run's storage, `shm` the split run's.
The data is made outside the timed calls, so what is timed is the queue alone: its Python per
row, which a colocated run pays on its one thread and a split run on the rollout rank's core.
Each call is timed in CPU time of the calling thread (`time.thread_time`: nothing here waits, and
time stolen by a shared VM's other guests is not counted). Per repeat: the median over the steps
of each call; reported: the median (min-max) over repeats, and the sum over calls (one step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from asyncflow.config import load_config
from asyncflow.pipeline.graph import grpo_graph
from asyncflow.pipeline.stage import queue_layout
from asyncflow.queue import (
    GroupRangeSampler,
    GroupSampler,
    QueueConfig,
    Ragged,
    StepSampler,
    connect,
    serve,
)

CALLS = ["prompts put", "rollout get", "rollout put", "reward get", "reward put",
         "advantage get", "advantage put", "train get", "train ack"]


def replay(transport: str, steps: int, warmup: int = 20) -> dict[str, float]:
    """Median seconds of each call over `steps` steps after `warmup`."""
    cfg = load_config([])
    p = cfg.pipeline
    P, N, R = p.prompts_per_step, p.group_size, cfg.rollout.max_new_tokens
    columns, stages = queue_layout(grpo_graph(SimpleNamespace(cfg=cfg, max_prompt_len=32)))
    qcfg = QueueConfig(columns=columns, stages=stages, group_size=N,
                       capacity_rows=(p.max_staleness + 2) * P * N, rows_per_step=P * N,
                       transport=transport, timeout_s=30.0)
    server = serve(qcfg)
    q = connect(qcfg, 0, controller=server.controller)
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {c: [] for c in CALLS}

    def timed(name, fn, *a, **k):
        t0 = time.thread_time()
        out = fn(*a, **k)
        times[name].append(time.thread_time() - t0)
        return out

    for s in range(warmup + steps):
        # the data of the step, as the stages make it (untimed)
        lens = torch.randint(9, 13, (P,), generator=gen)
        prompts = Ragged.from_lengths(torch.randint(3, 20, (int(lens.sum()),), generator=gen),
                                      lens).take(torch.arange(P).repeat_interleave(N))
        responses = Ragged.from_lengths(torch.randint(3, 20, (P * N * R,), generator=gen),
                                        torch.full((P * N,), R))
        logprobs = Ragged.from_lengths(-torch.rand(P * N * R, generator=gen),
                                       torch.full((P * N,), R))
        timed("prompts put", q.put, {"prompt_ids": prompts, "uid": torch.arange(P * N) // N},
              step=s, group_ids=[s * P + i // N for i in range(P * N)],
              num_tokens=prompts.lengths.tolist())
        b = timed("rollout get", q.get, "rollout", P * N, sampler=StepSampler(s),
                  columns=["prompt_ids"])
        # rows go onward as their groups finish: the step's groups in a shuffled order
        done = (torch.randperm(P, generator=gen)[:, None] * N + torch.arange(N)).flatten()
        rows = [b.row_ids[i] for i in done.tolist()]
        timed("rollout put", q.put, {"response_ids": responses, "behaviour_logprobs": logprobs,
                                     "finished": torch.ones(P * N, dtype=torch.long)},
              rows=rows, policy_versions=[s] * len(b), num_tokens=[16] * len(b), ack=b)
        b = timed("reward get", q.get, "reward", P * N, sampler=StepSampler(s),
                  columns=["response_ids", "finished", "uid"])
        timed("reward put", q.put, {"reward": torch.rand(len(b), generator=gen)},
              rows=b.row_ids, ack=b)
        b = timed("advantage get", q.get, "advantage", P * N, sampler=GroupSampler(),
                  columns=["reward"])
        timed("advantage put", q.put, {"advantage": torch.randn(len(b), generator=gen)},
              rows=b.row_ids, ack=b)
        b = timed("train get", q.get, "train", P * N, sampler=GroupRangeSampler(s * P, s * P + P),
                  columns=["prompt_ids", "uid", "response_ids", "behaviour_logprobs",
                           "advantage"])
        assert len(b) == P * N, "the train stage gets the whole step"
        timed("train ack", q.ack, b)
    q.close()
    server.close()
    return {c: statistics.median(v[warmup:]) for c, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--transport", default="local,shm")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for transport in args.transport.split(","):
        runs = [replay(transport, args.steps) for _ in range(args.repeats)]
        print(f"\ntransport={transport}: ms per call, median (min-max) over {args.repeats} "
              f"repeats of {args.steps} steps")
        for c in CALLS + ["one step"]:
            xs = [1e3 * (sum(r.values()) if c == "one step" else r[c]) for r in runs]
            print(f"| {c} | {statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f}) |")


if __name__ == "__main__":
    main()
