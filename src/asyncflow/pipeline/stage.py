"""The stage seam: what a stage is, what it returns, and how a pipeline is declared.

A `Stage` does its share of one step per `run_step(step)` and returns the `Metrics` it measured;
the schedule (not the stage) hands them to the recorder. A pipeline is a list of `StageDecl`s:
each names its mesh, the columns it needs and the columns it produces, and builds its stage from
the run context. The queue's columns and per-stage readiness and every rank's stage list are
derived from that list, so a stage added to it (a second reward model, a monitor) needs no edit
of the runner. Values carry how they merge (mean, total, max, set) so that partial records from
several calls, threads and ranks combine exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from asyncflow.queue import ColumnSpec, StageSpec

if TYPE_CHECKING:
    from asyncflow.pipeline.context import RunContext


def merge_entries(into: dict[str, list], part: dict[str, list]) -> None:
    """Entries are [kind, a, b]: mean -> (sum, weight); total -> (sum, _); max; set."""
    for name, (kind, a, b) in part.items():
        if name not in into:
            into[name] = [kind, a, b]
        elif kind in ("mean", "total"):
            into[name][1] += a
            into[name][2] += b
        elif kind == "max":
            into[name][1] = max(into[name][1], a)
        else:
            into[name][1] = a


def final_values(entries: dict[str, list]) -> dict[str, float | None]:
    """{name: value}: a mean divided by its weight (None without any), the others as they are."""
    return {name: (a / b if b else None) if kind == "mean" else a
            for name, (kind, a, b) in entries.items()}


class Metrics:
    """What one stage measured during one `run_step`: values by step (a stage may report for a
    later step, e.g. advantages of groups that arrived early) and trace spans."""

    def __init__(self, stage: str, step: int):
        self.stage, self.step = stage, step
        self.entries: dict[int, dict[str, list]] = {}
        self.spans: list[tuple[str, str, int, int, dict]] = []
        """(name, stage, start_us, end_us, args), wall clock."""

    def _put(self, name: str, kind: str, a: float, b: float, step: int | None) -> None:
        s = self.step if step is None else step
        merge_entries(self.entries.setdefault(s, {}), {name: [kind, float(a), float(b)]})

    def mean(self, name: str, value: float, weight: float = 1.0, step: int | None = None) -> None:
        self._put(name, "mean", value * weight, weight, step)

    def total(self, name: str, value: float, step: int | None = None) -> None:
        self._put(name, "total", value, 0.0, step)

    def max(self, name: str, value: float, step: int | None = None) -> None:
        self._put(name, "max", value, 0.0, step)

    def set(self, name: str, value: float, step: int | None = None) -> None:
        self._put(name, "set", value, 0.0, step)

    def record(self, values: dict[str, float], step: int | None = None) -> None:
        """Values that are already per-step figures (e.g. a train step's grad norm)."""
        for k, v in values.items():
            self.set(k, v, step)

    @contextmanager
    def trace(self, name: str):
        """A trace span only (e.g. a wait, which is not busy time)."""
        start = time.time_ns() // 1000
        try:
            yield
        finally:
            self.spans.append((name, self.stage, start, time.time_ns() // 1000,
                               {"step": self.step}))

    @contextmanager
    def span(self, name: str):
        """Time a piece of work: a trace span, and `time/<stage>_s` summed over the step (the
        busy time that idle fractions are computed from)."""
        t0 = time.perf_counter()
        with self.trace(name):
            yield
        self.total(f"time/{self.stage}_s", time.perf_counter() - t0)

    def values(self, step: int | None = None) -> dict[str, float | None]:
        """This stage's own figures for a step (tests, and a stage reading back what it put)."""
        return final_values(self.entries.get(self.step if step is None else step, {}))

    def merge(self, other: Metrics) -> Metrics:
        for s, part in other.entries.items():
            merge_entries(self.entries.setdefault(s, {}), part)
        self.spans += other.spans
        return self


class Stage(Protocol):
    """One pipeline stage on one rank."""

    name: str

    def run_step(self, step: int) -> Metrics:
        """Do this rank's share of `step`: get the needed columns from the queue, compute, put
        the produced ones. Returns when the share is done."""
        ...

    def begin(self) -> None:
        """Called once on the rank's main thread before the first step (e.g. a resumed trainer
        hands its restored weights to the rollout engines)."""
        ...

    def close(self) -> None:
        """Release processes, threads and files; called once, after the last step."""
        ...


class StageBase:
    """`begin` and `close` for stages that need neither."""

    def begin(self) -> None:
        pass

    def close(self) -> None:
        pass


MESHES = ("host", "rollout", "rollout_first", "train")
"""Where a stage runs: the queue's host rank (rank 0), every rollout rank, the first rollout rank
only (e.g. whole-group advantages, evaluation), every train rank."""


@dataclass
class StageDecl:
    """A stage of the pipeline, declared once."""

    name: str
    mesh: str
    """One of `MESHES`."""
    build: Callable[[RunContext], Stage]
    """Makes this rank's instance (called only on ranks of its mesh, in declaration order)."""
    needs: list[str] = field(default_factory=list)
    """Columns a row must hold before the queue hands it to this stage (empty: the stage makes
    rows, or does not read the queue)."""
    produces: list[ColumnSpec] = field(default_factory=list)
    """Columns it writes."""
    main: bool = False
    """In the split placement, runs on its rank's main thread (the mesh's heavy work) instead of
    a thread of its own. Colocated ranks run every stage on the main thread, in declaration
    order."""
    through_end: bool = False
    """Also runs once at step num_steps, after the last step (e.g. the final evaluation)."""
    split_only: bool = False
    """Only when rollout and train are different ranks (e.g. receiving weights)."""
    reports: list[str] = field(default_factory=list)
    """Work this stage finishes asynchronously and reports under its own name, per step, through
    `RunContext.report` (e.g. a weight send in the background)."""

    def __post_init__(self):
        if self.mesh not in MESHES:
            raise ValueError(f"stage {self.name!r}: mesh={self.mesh!r}; use one of {MESHES}")


def queue_layout(graph: list[StageDecl]) -> tuple[list[ColumnSpec], list[StageSpec]]:
    """The queue's columns (every produced one, once) and its consuming stages, from the graph."""
    columns: dict[str, ColumnSpec] = {}
    for d in graph:
        for c in d.produces:
            if c.name in columns:
                raise ValueError(f"column {c.name!r} is produced by two stages")
            columns[c.name] = c
    for d in graph:
        missing = [c for c in d.needs if c not in columns]
        if missing:
            raise ValueError(f"stage {d.name!r} needs {missing}, which no stage produces")
    return list(columns.values()), [StageSpec(d.name, list(d.needs)) for d in graph if d.needs]


def on_rank(d: StageDecl, rank: int, rollout_ranks: list[int], train_ranks: list[int],
            colocated: bool) -> bool:
    if d.split_only and colocated:
        return False
    return {"host": rank == 0, "rollout": rank in rollout_ranks,
            "rollout_first": rank == rollout_ranks[0], "train": rank in train_ranks}[d.mesh]
