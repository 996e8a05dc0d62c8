"""Checkpoints and resume: exact with eta = 0, bounded staleness with eta = 1, corrupted
checkpoints skipped, every prompt of the schedule trained exactly once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .conftest import REPO, torchrun

SMALL = ["pipeline.prompts_per_step=8", "pipeline.eval_every=4", "pipeline.eval_size=64"]
SYNC = "pipeline.max_staleness=0"  # the default is 1; bit-exact resume is promised at eta = 0
# timing-dependent metrics; everything else must be equal bit for bit
TIMING = ("time/", "perf/", "idle/", "weights/", "rollout/gen_time_s", "rollout/gate_wait_s",
          "train/time_s")


def _metrics(run: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [d["step"] for d in lines]
    assert len(steps) == len(set(steps)), f"metric lines repeated: {steps}"
    return {d["step"]: d for d in lines}


def _trained_uids(run: Path) -> list[int]:
    uids = []
    for f in sorted((run / "accounting").glob("train_rank*.jsonl")):
        uids += [u for line in f.read_text().splitlines() for u in json.loads(line)["uids"]]
    return uids


def _assert_each_prompt_trained_once(run: Path, num_steps: int, prompts: int = 8, n: int = 8,
                                     skip_steps: int = 0):
    uids = _trained_uids(run)
    # problem uid = train stream index; step s trains problems [s*P, (s+1)*P), n rows each
    assert sorted(uids) == sorted(u for u in range(skip_steps * prompts, num_steps * prompts)
                                  for _ in range(n))


def _ok(out):
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.parametrize("placement", [[], ["placement=colocated"]], ids=["split", "colocated"])
def test_resume_at_step_k_reproduces_the_uninterrupted_run_bitwise(tmp_path, placement):
    base = ["pipeline.num_steps=8", "checkpoint.every=4", f"run.root={tmp_path}", *SMALL, SYNC,
            *placement]
    _ok(torchrun(2, [*base, "run.name=full"], timeout_s=300))
    # the same command again through the launcher: nothing left to run, said in one line at
    # once (it used to wait run.timeout_s for weights no step would send, then fail)
    again = subprocess.run([sys.executable, "-m", "asyncflow.launch", "--nproc-per-node=2",
                            *base, "run.name=full"], cwd=REPO, capture_output=True, text=True,
                           timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [x for x in again.stderr.splitlines() if x.startswith("asyncflow: ")]
    assert again.returncode == 2 and len(errors) == 1, again.stderr[-3000:]
    assert "is already finished" in errors[0], again.stderr[-3000:]
    ckpt = tmp_path / "full" / "checkpoints" / "step_4"
    _ok(torchrun(2, [*base, "run.name=resumed", f"resume={ckpt}"], timeout_s=300))

    full, resumed = _metrics(tmp_path / "full"), _metrics(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6, 7, 8]
    for step, record in resumed.items():
        keys = [k for k in record if not k.startswith(TIMING)]
        assert "reward/mean" in keys or step == 8
        assert {k: record[k] for k in keys} == {k: full[step].get(k) for k in keys}, step
    assert "loss/mean" in resumed[5] and "eval/accuracy" in resumed[4]
    a = load_file(tmp_path / "full" / "export" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # the export is a Hugging Face model directory: transformers loads it, every weight used
    transformers = pytest.importorskip("transformers")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "full" / "export", output_loading_info=True)
    assert not any(info.values()), info
    assert hf.model.embed_tokens.weight.equal(a["model.embed_tokens.weight"])
    assert (tmp_path / "full" / "export" / "tokenizer.json").is_file()
    # the resumed run's accounting starts at step 4; together with the first half: each once
    first = [json.loads(x) for x in (tmp_path / "full/accounting/train_rank0.jsonl")
             .read_text().splitlines()]
    second = [json.loads(x) for x in (tmp_path / "resumed/accounting/train_rank0.jsonl")
              .read_text().splitlines()]
    assert [d["step"] for d in second] == [4, 5, 6, 7]
    assert [d for d in first if d["step"] >= 4] == second


def test_resume_with_two_rollout_and_two_train_ranks_and_kl_is_bitwise_too(tmp_path):
    # DCP shards over 2 train ranks, the reference stage resumes, rows split across 2 engines
    base = ["placement=split_2x2", "algorithm.kl_coef=0.01", "pipeline.num_steps=6",
            "checkpoint.every=3", f"run.root={tmp_path}", *SMALL, SYNC]
    _ok(torchrun(4, [*base, "run.name=full"], timeout_s=300))
    ckpt = tmp_path / "full" / "checkpoints" / "step_3"
    assert len(list((ckpt / "train").glob("*.distcp"))) == 2
    _ok(torchrun(4, [*base, "run.name=resumed", f"resume={ckpt}"], timeout_s=300))
    full, resumed = _metrics(tmp_path / "full"), _metrics(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4, 5, 6]
    for step, record in resumed.items():
        keys = [k for k in record if not k.startswith(TIMING)]
        assert {k: record[k] for k in keys} == {k: full[step].get(k) for k in keys}, step
    assert "loss/kl" in resumed[4]
    a = load_file(tmp_path / "full" / "export" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "export" / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)
    _assert_each_prompt_trained_once(tmp_path / "resumed", 6, skip_steps=3)


def test_resume_with_staleness_1_keeps_the_bound_and_skips_a_corrupted_checkpoint(tmp_path):
    args = ["pipeline.num_steps=8", "pipeline.max_staleness=1", "checkpoint.every=3",
            "checkpoint.keep=2", f"run.root={tmp_path}", "run.name=async", *SMALL]
    _ok(torchrun(2, args, timeout_s=300))
    ckpts = tmp_path / "async" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_6", "step_8"]  # keep=2
    # flip one byte of the newest checkpoint's model shard: resume=auto must fall back to step 6
    shard = next((ckpts / "step_8" / "train").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = torchrun(2, args, timeout_s=300)  # resume=auto is the default
    _ok(out)
    log = (tmp_path / "async" / "logs" / "rank0.log").read_text()
    assert "skipping corrupted checkpoint" in log and "step_8" in log
    assert "resuming from" in log and "step_6" in log
    metrics = _metrics(tmp_path / "async")
    assert sorted(metrics) == list(range(9))
    for step in range(6, 8):
        assert metrics[step]["staleness/max"] <= 1
        assert "staleness/violations" not in metrics[step]
    _assert_each_prompt_trained_once(tmp_path / "async", 8)


def test_resume_false_refuses_an_existing_run_directory(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.yaml").write_text("{}")
    out = subprocess.run([sys.executable, "-m", "asyncflow.train", f"run.root={tmp_path}",
                          "run.name=taken", "resume=false"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "already holds a run and resume=false" in lines[0], out.stderr


def _worker_pid(parent: int, rank: int) -> int | None:
    """The torchrun worker process of `rank` (found through /proc: its RANK variable)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = (Path("/proc") / pid / "environ").read_bytes().split(b"\0")
            stat = (Path("/proc") / pid / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if f"RANK={rank}".encode() in env and _descends(ppid, parent):
            return int(pid)
    return None


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = (Path("/proc") / str(pid) / "stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def test_sigkilled_rank_mid_run_restarts_and_trains_every_prompt_exactly_once(tmp_path):
    steps = 16
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "--max-restarts=1", "-m", "asyncflow.train", f"pipeline.num_steps={steps}",
           "checkpoint.every=3", f"run.root={tmp_path}", "run.name=killed", *SMALL]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    killed = None
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            pid = _worker_pid(proc.pid, 1)  # the train rank, in the middle of a later step
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=300)
    assert killed is not None, out[-3000:]
    assert proc.returncode == 0, out[-4000:]
    log = (tmp_path / "killed" / "logs" / "rank0.log").read_text()
    assert "resuming from" in log, log[-2000:]
    _assert_each_prompt_trained_once(tmp_path / "killed", steps)
    final = _metrics(tmp_path / "killed")
    assert steps in final and "eval/accuracy" in final[steps]


def test_sigterm_checkpoints_at_the_step_boundary_and_the_run_resumes(tmp_path):
    args = ["pipeline.num_steps=40", "checkpoint.every=0", "checkpoint.export_hf=true",
            f"run.root={tmp_path}", "run.name=stopped", *SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "asyncflow.train", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # what a scheduler does to the job
    out, _ = proc.communicate(timeout=120)
    ckpts = list((tmp_path / "stopped" / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1, out[-3000:]  # checkpoint.every=0: only the stop wrote one
    stopped_at = int(ckpts[0].name.removeprefix("step_"))
    assert 4 <= stopped_at < 40
    log = (tmp_path / "stopped" / "logs" / "rank1.log").read_text()
    assert f"stop requested: checkpoint step_{stopped_at} written" in log, out[-3000:]
    hf = ckpts[0] / "hf"  # checkpoint.export_hf: an HF copy of the policy inside the checkpoint
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in hf.iterdir()}
    _ok(torchrun(2, args, timeout_s=300))  # resume=auto
    _assert_each_prompt_trained_once(tmp_path / "stopped", 40)
