"""Runs this rank's stages over the steps, and owns the metrics recorder.

```
 split:      main thread:  begin() each stage -> for step: main stages in order -> final steps
             one thread per other stage:  for step: run_step(step)
 colocated:  main thread:  begin() each stage -> for step: every stage in declaration order
```

Every `run_step` result goes to the recorder, then `stage_done(stage, step)`. The first error of
any thread (or a stop request seen outside the train mesh) is kept, the queue links are aborted
and the version gate cancelled, so every other thread's wait fails at once; the main thread
then raises that first error. Shutdown order on success: main loop done -> threads joined ->
stages closed in declaration order -> recorder.finish() (rank 0 waits for every rank's last
metrics); the context then tears down the queue and the process group.
"""

from __future__ import annotations

import threading

from asyncflow.config import to_yaml
from asyncflow.log import get_logger
from asyncflow.metrics import build_sinks
from asyncflow.pipeline.context import RunContext
from asyncflow.pipeline.control import StopRequested, timeout_hint
from asyncflow.pipeline.recorder import StepRecorder
from asyncflow.pipeline.stage import Metrics, Stage, StageDecl, on_rank

logger = get_logger(__name__)


class Schedule:
    def __init__(self, ctx: RunContext, graph: list[StageDecl]):
        self.ctx = ctx
        m = ctx.meshes
        self.decls = [d for d in graph if on_rank(d, m.rank, m.rollout_ranks, m.train_ranks,
                                                   m.colocated)]
        names = [d.name for d in self.decls] + [r for d in self.decls for r in d.reports]
        self.recorder = _recorder(ctx, names)
        ctx.report = self.report
        self.error: BaseException | None = None
        self._error_lock = threading.Lock()
        self.stages: list[Stage] = []
        for d in self.decls:  # declaration order on every rank: collectives line up
            self.stages.append(d.build(ctx))

    def report(self, stage: str, step: int, metrics: Metrics) -> None:
        self.recorder.add(metrics)
        self.recorder.stage_done(stage, step)

    def _step(self, stage: Stage, step: int) -> None:
        self.report(stage.name, step, stage.run_step(step))

    def fail(self, e: BaseException) -> None:
        """Keep the first error and wake every wait of this rank."""
        with self._error_lock:
            if self.error is None:
                self.error = e
        self.ctx.abort()

    def run(self) -> None:
        ctx = self.ctx
        for stage in self.stages:
            stage.begin()
        steps = range(ctx.start, ctx.shape.num_steps)
        if ctx.meshes.colocated:
            main = list(zip(self.decls, self.stages, strict=True))
            threads = []
        else:
            main = [(d, s) for d, s in zip(self.decls, self.stages, strict=True) if d.main]
            threads = [self._thread(s, steps) for d, s in zip(self.decls, self.stages,
                                                               strict=True) if not d.main]
            if not ctx.meshes.is_train:
                self._watch_stop()
        try:
            for step in steps:
                for _, stage in main:
                    self._step(stage, step)
            for d, stage in main:
                if d.through_end:
                    self._step(stage, ctx.shape.num_steps)
        except BaseException as e:
            self.fail(e)
        for t in threads:  # on an error, threads still in a collective are left behind
            while t.is_alive() and self.error is None:
                t.join(0.1)
        if self.error is not None:
            raise self.error

    def _thread(self, stage: Stage, steps: range) -> threading.Thread:
        def body():
            try:
                for step in steps:
                    self._step(stage, step)
            except BaseException as e:
                if self.ctx.aborted:  # another thread failed first and closed the queue
                    logger.info("stage thread %r stopped by the queue's abort", stage.name)
                else:
                    logger.exception("stage thread %r failed; exiting this rank", stage.name)
                    if hint := timeout_hint(e):
                        logger.error(hint)
                self.fail(e)

        t = threading.Thread(target=body, name=stage.name, daemon=True)
        t.start()
        return t

    def _watch_stop(self) -> None:
        """Outside the train mesh: after a stop request, wait (bounded) for the train mesh's
        checkpoint, then stop this rank."""
        def body():
            self.ctx.stop.requested.wait()
            step = self.ctx.stop.wait_announced()
            if step is None:
                logger.error("stop requested, but no checkpoint within run.timeout_s=%g s",
                             self.ctx.cfg.run.timeout_s)
                self.fail(TimeoutError("stop requested, but the train mesh wrote no checkpoint"))
            else:
                logger.info("stop requested: the train mesh checkpointed step %d; exiting", step)
                self.fail(StopRequested(step))

        threading.Thread(target=body, name="stop", daemon=True).start()

    def close(self) -> None:
        for stage in self.stages:
            stage.close()
        self.recorder.finish()


def _recorder(ctx: RunContext, names: list[str]) -> StepRecorder:
    cfg, m = ctx.cfg, ctx.meshes
    sinks = (build_sinks(cfg.metrics, ctx.run_dir, ctx.name, cfg.pipeline.num_steps,
                         {"config": to_yaml(cfg)}, ctx.start) if m.rank == 0 else [])
    sizes = ({"colocated": m.world_size} if m.colocated else
             {"rollout": len(m.rollout_ranks), "train": len(m.train_ranks)})
    return StepRecorder(names, m.metrics_group, sinks, ctx.tracer, sizes, ctx.start)
