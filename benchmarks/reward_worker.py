"""Cost of isolating rewards: worker start-up and per-batch overhead vs calling in-process.

    python benchmarks/reward_worker.py [--rows 256] [--repeats 20]

The parent imports torch and runs a few idle threads first, like a rank process does.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch  # noqa: F401  (imported like a rank process does: the forkserver then preloads it)

from asyncflow.pipeline.reward_worker import RewardItem, RewardWorker
from asyncflow.tasks import AdditionConfig, AdditionTask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    stop = threading.Event()
    for _ in range(3):
        threading.Thread(target=stop.wait, daemon=True).start()
    task = AdditionTask(AdditionConfig())
    problems = [task.train_problem(i) for i in range(args.rows)]
    items = [RewardItem(i, p.answer if i % 3 else "0000", p.answer, True)
             for i, p in enumerate(problems)]

    t0 = time.perf_counter()
    worker = RewardWorker(task, timeout_s=10.0)
    worker.score(items[:1])
    first_start_s = time.perf_counter() - t0
    restarts = []
    for _ in range(5):
        t0 = time.perf_counter()
        worker._stop()  # what a timeout does; the next call starts a new worker
        worker.score(items[:1])
        restarts.append(time.perf_counter() - t0)
    batch, local = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outcomes = worker.score(items)
        batch.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        values = [task.reward(it.completion, it.answer, it.finished) for it in items]
        local.append(time.perf_counter() - t0)
        assert [o.value for o in outcomes] == values
    worker.close()
    stop.set()
    ms = 1e3
    print(f"first start and one row (forkserver + preload + worker): {first_start_s * ms:.0f} ms")
    print(f"restart (kill, start, one row), median of 5: {statistics.median(restarts) * ms:.1f} ms")
    print(f"{args.rows} rows, median of {args.repeats}: worker {statistics.median(batch) * ms:.2f} "
          f"ms, in-process {statistics.median(local) * ms:.3f} ms, overhead per row "
          f"{(statistics.median(batch) - statistics.median(local)) / args.rows * 1e6:.1f} us")


if __name__ == "__main__":
    main()
