"""A rank that dies or hangs ends the run with a clear message in bounded time, never a hang."""

import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import REPO
from .test_resume import SMALL, _worker_pid


def _launch(tmp_path, extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "asyncflow.train", "pipeline.num_steps=200", f"run.root={tmp_path}",
           "run.name=fault", "checkpoint.every=0", *SMALL, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _when_running(proc, tmp_path, rank: int) -> int:
    metrics = tmp_path / "fault" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            pid = _worker_pid(proc.pid, rank)
            if pid is not None:
                return pid
        time.sleep(0.02)
    raise AssertionError("the run never got going: " + proc.communicate()[0][-3000:])


@pytest.mark.parametrize("rank, survivor_says", [
    (1, "stage thread 'weights' failed; exiting this rank"),  # train rank: rollout sees it
    (0, "queue controller closed the connection"),  # the controller's host: train sees it
])
def test_a_killed_rank_ends_the_run_promptly_with_a_clear_message(tmp_path, rank, survivor_says):
    proc = _launch(tmp_path, [])
    pid = _when_running(proc, tmp_path, rank)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert elapsed < 30, f"took {elapsed:.0f} s to notice the dead rank"
    survivor = (tmp_path / "fault" / "logs" / f"rank{1 - rank}.log").read_text()
    assert survivor_says in survivor or survivor_says in out, out[-3000:]


def test_a_hung_rank_ends_the_run_after_the_timeout(tmp_path):
    # Long enough that a loaded 2-core machine still gets the run going (with 4 s, one run in a
    # fresh clone died before its third step while another job shared the machine).
    timeout_s = 10
    proc = _launch(tmp_path, [f"run.timeout_s={timeout_s}"])
    pid = _when_running(proc, tmp_path, 1)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)  # alive but stuck: no socket closes, only timeouts can tell
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        os.kill(pid, signal.SIGKILL) if proc.poll() is None else None
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    log = (tmp_path / "fault" / "logs" / "rank0.log").read_text()
    # whichever wait notices first: a queue wait (ours) or a weight broadcast (gloo's timeout)
    assert (f"nothing arrived within run.timeout_s={timeout_s} s" in log
            or f"Timed out waiting {timeout_s * 1000}ms" in log), out[-3000:]
    if "Timed out waiting" in log:  # gloo's words alone do not say what to change
        assert "timed out after run.timeout_s" in log and "raise run.timeout_s" in log, log[-3000:]
    # the survivor gives up after the timeout; torchrun then needs its own grace period to kill
    # the stopped rank (SIGTERM cannot reach it)
    assert elapsed < timeout_s + 60, elapsed
