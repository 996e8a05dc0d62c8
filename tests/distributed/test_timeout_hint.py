"""A torch.distributed wait that times out is explained: which of our waits, and run.timeout_s."""

from datetime import timedelta

import torch
import torch.distributed as dist

from asyncflow.pipeline.runner import timeout_hint

from ._mp import run_ranks


def _weights_wait(group):
    dist.broadcast(torch.zeros(4), 1, group=group)  # rank 1 never sends: gloo times out


def _rank(rank, world):
    group = dist.new_group([0, 1], timeout=timedelta(seconds=1))
    if rank == 1:
        dist.barrier()  # outlives rank 0's wait on the short-timeout group
        return None
    try:
        _weights_wait(group)
    except Exception as e:  # gloo's own error: "... Timed out waiting 1000ms ..."
        hint = timeout_hint(e)
    dist.barrier()
    return hint


def test_a_gloo_timeout_names_our_wait_and_run_timeout_s():
    hint = run_ranks(_rank, 2)[0]
    assert hint is not None and "_weights_wait (test_timeout_hint.py:" in hint, hint
    assert "raise run.timeout_s" in hint
    assert timeout_hint(ValueError("bad value")) is None
