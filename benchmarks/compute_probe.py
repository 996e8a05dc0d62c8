"""Run the plain loop or one asyncflow rank with its model compute timed, for `overhead.py`.

    python benchmarks/compute_probe.py OUT.json benchmarks/plain_grpo.py [args]
    torchrun ... benchmarks/compute_probe.py OUT.json -m asyncflow.train [overrides]

Wraps the four pieces of work that the plain loop and asyncflow share line for line: the torch
engine's decode step, the trainer's forward (`SharedPromptBatch.logits`), `Tensor.backward` and
`AdamW.step`. From the end of optimizer step PROBE_SKIP (environment, default 5, at least 1) to the
end of the last one it sums their wall time and writes {"steps", "wall_s", "compute_s": {name:
seconds}} to OUT (per step: divide by steps); work after the last optimizer step (a final
evaluation) counts in neither.

Why: this VM's speed moves 1.5-2x within seconds to minutes, and a run's step time moves with it,
so two runs a minute apart do not compare. The ratio of a run's wall time to its own compute time
barely moves (the plain loop: 1.284-1.304 over 13 runs whose steps took 51-73 ms, 2026-12-08), so
that ratio, compared between two one-core schedules, is their step-time ratio at equal machine
speed, provided their compute itself runs equally fast: a slowdown of the compute (say, from the
framework's memory traffic between compute phases) is divided out, not counted. Not for the split
schedules: two ranks on two cores also slow each other's compute, a real cost of the split.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import time


def install(out: str, skip: int) -> None:
    import torch

    from asyncflow.engines.sequences import SharedPromptBatch
    from asyncflow.engines.torch_engine import TorchRolloutEngine

    targets = {"decode": (TorchRolloutEngine, "_step"), "forward": (SharedPromptBatch, "logits"),
               "backward": (torch.Tensor, "backward"), "optimizer": (torch.optim.AdamW, "step")}
    spent = dict.fromkeys(targets, 0)
    window = {"steps": -max(skip, 1), "start": 0, "end": 0}
    at_end = dict(spent)  # `spent` as the last optimizer step ended

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                now = time.perf_counter_ns()
                spent[name] += now - t0
                if name == "optimizer":
                    window["steps"] += 1
                    window["end"] = now
                    if window["steps"] == 0:  # the window opens: forget the warm-up
                        window["start"] = now
                        for k in spent:
                            spent[k] = 0
                    at_end.update(spent)
        return wrapper

    for name, (cls, attr) in targets.items():
        setattr(cls, attr, timed(name, getattr(cls, attr)))

    def write() -> None:
        if window["steps"] > 0:
            with open(out, "w") as f:
                json.dump({"steps": window["steps"],
                           "wall_s": (window["end"] - window["start"]) / 1e9,
                           "compute_s": {k: v / 1e9 for k, v in at_end.items()}}, f)

    atexit.register(write)


if __name__ == "__main__":
    out, *program = sys.argv[1:]
    install(out, int(os.environ.get("PROBE_SKIP", "5")))
    if program[0] == "-m":
        sys.argv = [program[1], *program[2:]]
        runpy.run_module(program[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = program
        runpy.run_path(program[0], run_name="__main__")
