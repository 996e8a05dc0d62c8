"""Run the pipeline on this rank: open the run, declare the stages, run them, tear down.

```
 rank 0:            queue controller, prompts thread, metrics writer (+ its mesh's stages)
 rollout ranks:     main: eval (first rollout rank) + rollout   threads: reward, weights,
                                                                advantage (first rollout rank)
                    child processes: a reward worker for the reward stage (+ one for eval)
 train ranks:       main: train (+ weight send)                 threads: reference (with KL)
 colocated:         every rank runs all of its stages one after another on the main thread
```

The pieces: `context.open_run` (distributed set-up, process groups, run directory, resume
choice, model and task), `graph.grpo_graph` (the stages and the columns they exchange, declared
once; the queue is derived from it), `schedule.Schedule` (threads or one loop, first-error
propagation, the recorder) and `control` (stop requests). On an error this rank drops its queue
links without any collective call and the error propagates; on success the stages close, the
recorder finishes, then the queue and the process group are torn down.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from asyncflow.config import Config
from asyncflow.pipeline.context import RunContext, open_run
from asyncflow.pipeline.control import StopRequested, timeout_hint
from asyncflow.pipeline.graph import grpo_graph, with_stages
from asyncflow.pipeline.schedule import Schedule
from asyncflow.pipeline.stage import StageDecl

__all__ = ["StopRequested", "run", "timeout_hint"]


def run(cfg: Config, stages: list[StageDecl] | None = None,
        graph: Callable[[RunContext], list[StageDecl]] = grpo_graph) -> Path:
    """Run the whole pipeline on this rank; returns the run directory. `stages` are added to
    the graph before its train-mesh stages; `graph` replaces the GRPO declaration."""
    ctx = open_run(cfg)
    with ctx.guard():
        decls = with_stages(graph(ctx), stages or [])
        ctx.start_queue(decls)
        schedule = Schedule(ctx, decls)
        schedule.run()
        schedule.close()
        ctx.close()
    return ctx.run_dir
