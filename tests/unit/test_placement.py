"""Which devices, CPUs and process-group backends a run's config selects."""

import os

import pytest
import torch

from asyncflow.launch import placement
from asyncflow.launch.placement import (
    pin_local_rank_cpus,
    sync_backend,
    train_device_type,
    unpin_cpus,
)


@pytest.mark.parametrize("train, engine, backend", [
    ("cuda:0", "cuda", "nccl"),
    ("cuda:1", "cuda:1", "nccl"),
    ("cuda:0", "cpu", "gloo"),  # the engine receives CPU tensors
    ("cpu", "cuda", "gloo"),    # the trainer sends CPU tensors
    ("cpu", "cpu", "gloo"),
])
def test_weights_travel_over_nccl_only_when_both_ends_are_on_cuda(train, engine, backend):
    assert sync_backend(torch.device(train), engine) == backend


def test_the_train_device_follows_the_setting_and_cuda_needs_a_gpu():
    assert train_device_type("cpu") == "cpu"
    assert train_device_type("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert train_device_type("cuda") == "cuda"
    else:
        with pytest.raises(ValueError, match="trainer.device=cuda: no CUDA device"):
            train_device_type("cuda")


@pytest.mark.parametrize("allowed, ranks, want", [
    ([0, 1], 2, [[0], [1]]),
    ([0, 1, 2, 3, 4], 2, [[0, 1], [2, 3, 4]]),   # a share each, every CPU used
    ([2, 5, 7, 9], 2, [[2, 5], [7, 9]]),         # the job's own CPUs (taskset), in order
    ([0, 1, 2, 3], 3, [[0], [1], [2, 3]]),
    ([0, 1], 3, [None] * 3),                      # fewer CPUs than ranks: left alone
    ([0, 1, 2, 3], 1, [None]),                    # one rank: nothing to share out
])
def test_each_local_rank_gets_its_own_share_of_the_allowed_cpus(monkeypatch, allowed, ranks,
                                                                want):
    pinned = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: pinned.append(sorted(cpus)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    got = []
    for r in range(ranks):  # each rank is its own process, starting from the job's CPUs
        monkeypatch.setattr(placement, "_JOB_CPUS", None)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(allowed))
        monkeypatch.setenv("LOCAL_RANK", str(r))
        got.append(pin_local_rank_cpus())
    assert got == want
    assert pinned == [w for w in want if w is not None]


def test_pinning_again_shares_out_the_first_cpus_and_unpin_gives_them_back(monkeypatch):
    now = {0, 1, 2, 3}  # what the fake process may use, as pinning changes it

    def setaffinity(pid, cpus):
        now.clear()
        now.update(cpus)

    monkeypatch.setattr(placement, "_JOB_CPUS", None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(now))
    monkeypatch.setattr(os, "sched_setaffinity", setaffinity)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert [pin_local_rank_cpus() for _ in range(3)] == [[2, 3]] * 3  # a second run(): same share
    unpin_cpus()
    assert now == {0, 1, 2, 3}


def test_no_pinning_outside_torchrun(monkeypatch):
    monkeypatch.setattr(placement, "_JOB_CPUS", None)
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: pytest.fail("pinned"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert pin_local_rank_cpus() is None
