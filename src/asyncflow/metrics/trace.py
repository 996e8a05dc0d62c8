"""Per-stage time spans on every rank, written as a Chrome/Perfetto trace (`trace.json`).

Each rank keeps its spans in memory (a few per micro-batch) and writes `trace/rank<r>.json` at
the end; rank 0 merges the files into `trace.json` (ranks are processes, stages are threads).
Open it in https://ui.perfetto.dev or chrome://tracing; `scripts/gantt.py` draws it as a PNG.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

STAGE_TIDS = {"prompts": 0, "eval": 1, "rollout": 2, "reward": 3, "weights": 4, "advantage": 5,
              "reference": 6, "train": 7}


class Tracer:
    def __init__(self, rank: int, enabled: bool = True):
        self.rank, self.enabled = rank, enabled
        self.events: list[dict] = []
        self._lock = threading.Lock()

    def add(self, spans: list[tuple[str, str, int, int, dict]]) -> None:
        """Spans measured by the stages (`pipeline.stage.Metrics`): (name, stage, start_us,
        end_us, args), wall clock, so spans of ranks on one host line up."""
        if not self.enabled or not spans:
            return
        with self._lock:
            self.events += [{"name": n, "cat": st, "ph": "X", "ts": a, "dur": b - a,
                             "pid": self.rank, "tid": STAGE_TIDS.get(st, len(STAGE_TIDS)),
                             "args": args} for n, st, a, b, args in spans]

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"rank{self.rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.events))
        os.replace(tmp, path)
        return path


def merge_traces(directory: Path, out: Path, rank_roles: dict[int, str]) -> Path:
    """Merge per-rank span files into one Chrome trace with named processes and threads."""
    events: list[dict] = []
    for rank, role in sorted(rank_roles.items()):
        file = directory / f"rank{rank}.json"
        if not file.is_file():
            continue
        spans = json.loads(file.read_text())
        events.append({"name": "process_name", "ph": "M", "pid": rank,
                       "args": {"name": f"rank {rank} ({role})"}})
        names = {v: k for k, v in STAGE_TIDS.items()}
        for tid in sorted({e["tid"] for e in spans}):
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                           "args": {"name": names.get(tid, "other")}})
        events.extend(spans)
    out.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return out
