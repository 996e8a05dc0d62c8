"""Stopping a run on request, and naming the wait that timed out.

SIGTERM or SIGINT on any rank sets `StopControl.requested`. The train mesh agrees on it at the
next step boundary (a MAX all-reduce, so every train rank stops after the same step), writes a
checkpoint, announces the step in torch.distributed's rendezvous store and raises
`StopRequested`. Ranks outside the train mesh wait, bounded by run.timeout_s, for that
announcement (one of them may host the queue the checkpoint snapshots), then stop too. The
store, not a file in the run directory, carries it: nothing is left behind for a resumed run
to misread.
"""

from __future__ import annotations

import signal
import threading
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from asyncflow.engines.fsdp_engine import all_reduce
from asyncflow.log import get_logger

logger = get_logger(__name__)

_KEY = "asyncflow/stopped_at_step"


class StopRequested(Exception):
    """SIGTERM or SIGINT: the train mesh wrote a checkpoint at the step boundary; the run ends
    (exit code 143) and `resume=auto` continues it."""


class StopControl:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.requested = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.requested.set())

    def agreed(self, group) -> bool:
        """Train mesh, at a step boundary: whether any of its ranks was asked to stop."""
        stopping = torch.tensor([float(self.requested.is_set())])
        return bool(all_reduce(stopping, group, dist.ReduceOp.MAX).item())

    def announce(self, step: int) -> None:
        """The first train rank, once the stop checkpoint is written."""
        dist.distributed_c10d._get_default_store().set(_KEY, str(step))

    def wait_announced(self) -> int | None:
        """After a stop request outside the train mesh: the checkpointed step, or None if none
        was announced within the timeout."""
        store = dist.distributed_c10d._get_default_store()
        try:
            store.wait([_KEY], timedelta(seconds=self.timeout_s))
        except (RuntimeError, dist.DistError):  # the store's timeout, or its host is gone
            return None
        return int(store.get(_KEY).decode())


def timeout_hint(e: BaseException | None) -> str | None:
    """For a torch.distributed wait that timed out (gloo says only "Timed out waiting Nms"):
    which of our waits it was, and what to change."""
    if e is None or "Timed out" not in str(e):
        return None
    torch_dir = str(Path(torch.__file__).parent)
    ours = [f for f in traceback.extract_tb(e.__traceback__)  # the caller of torch.distributed
            if not f.filename.startswith(torch_dir)]
    where = (f"{ours[-1].name} ({Path(ours[-1].filename).name}:{ours[-1].lineno})" if ours
             else "a collective")
    return (f"a torch.distributed wait in {where} timed out after run.timeout_s: a peer rank "
            "died, hung, or is still busy; if one step can take longer than that here, raise "
            "run.timeout_s (e.g. run.timeout_s=600)")
