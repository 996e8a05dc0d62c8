"""The framework tax: asyncflow's step time against a plain loop doing the same work.

    python benchmarks/overhead.py [--steps 60] [--repeats 5] [--extra k=v ...]
                                  [--write benchmarks/RESULTS.md]

Same model (tiny default), batch (32 prompts x 8), sampling, algorithm (GRPO, zero-advantage rows
skipped) and learning rate in every schedule; every run starts from the same prepared model:
  plain      benchmarks/plain_grpo.py: one process, one torch thread, no queue, no threads
  plain-2t   the same loop with two torch threads (it has both cores to itself)
  colocated  asyncflow, 1 rank: every stage in turn on one process (same core budget as plain)
  split-0    asyncflow, 1 rollout + 1 train rank, eta = 0 (synchronous, streaming)
  split-1    asyncflow, 1 rollout + 1 train rank, eta = 1 (the default)
Each repeat runs every schedule once, in an order rotated per repeat, so load on a shared machine
hits them alike; ratios are taken within a repeat. Per run: the median step time over the steps
after a warm-up (held-out evaluation runs only at the first and last step, which are excluded),
and the median number of rows trained per step (rows with a non-zero advantage), which sets the
train cost and follows how well the model does, so runs are compared at the same stage. For the
plain loop also the share of its step that forward, backward and the optimizer take: the floor of
any schedule with one train rank. For the one-core runs (plain, colocated) also their step time over
their own compute time (`compute_probe.py`), whose ratio compares them at equal machine speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 5
SCHEDULES = {
    "plain": ("plain", 1, []),
    "plain-2t": ("plain", 2, []),
    "colocated": ("asyncflow", 1, ["placement=colocated"]),
    "split-0": ("asyncflow", 2, ["pipeline.max_staleness=0"]),
    "split-1": ("asyncflow", 2, ["pipeline.max_staleness=1"]),
}
GOALS = {"colocated": 1.10, "split-1": 0.60}  # at most this many plain-loop steps per step


def run_one(root: Path, name: str, schedule: str, steps: int, extra: list[str]) -> dict:
    kind, n, overrides = SCHEDULES[schedule]
    env = {**os.environ, "OMP_NUM_THREADS": str(n if kind == "plain" else 1),
           "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    probe_file = root / f"{name}.compute.json"
    # one process on one core: time its compute too (see compute_probe.py); not the split
    probe = [str(REPO / "benchmarks" / "compute_probe.py"), str(probe_file)] if n == 1 else []
    if kind == "plain":
        out_file = root / f"{name}.json"
        cmd = [sys.executable, *probe, str(REPO / "benchmarks" / "plain_grpo.py"), "--steps",
               str(steps), "--threads", str(n), "--out", str(out_file), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
               "--standalone", *probe, "-m", "asyncflow.train", f"run.root={root}",
               f"run.name={name}", f"pipeline.num_steps={steps}",
               f"pipeline.eval_every={steps + 1}", "pipeline.eval_size=64", "checkpoint.every=0",
               *overrides, *extra]
    env["PROBE_SKIP"] = str(WARMUP)
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    if kind == "plain":
        rec = json.loads(out_file.read_text())
        times, trained, train_s = rec["step_time_s"], rec["trained_rows"], rec["train_s"]
    else:
        lines = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
        lines = [x for x in lines if x["step"] < steps]
        times = [x["perf/step_time_s"] for x in lines]
        trained = [256 - x["train/skipped_rows"] for x in lines]
    body = slice(WARMUP, steps - 1)  # the last step holds the final checkpoint and evaluation
    out = {"step_s": statistics.median(times[body]), "trained": statistics.median(trained[body])}
    if kind == "plain":  # forward/backward/optimizer: what one train rank must do alone per step
        out["train_share"] = statistics.median(train_s[body]) / out["step_s"]
    if probe and probe_file.exists():  # absent when the run had no step after the warm-up
        p = json.loads(probe_file.read_text())
        out["compute_s"] = sum(p["compute_s"].values()) / p["steps"]
        out["per_compute"] = p["wall_s"] / sum(p["compute_s"].values())
    return out


def fmt(xs: list[float], spec: str = ".3f") -> str:
    return f"{statistics.median(xs):{spec}} ({min(xs):{spec}}-{max(xs):{spec}})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--extra", nargs="*", default=[],
                    help="Hydra overrides for every schedule, the plain loop included")
    ap.add_argument("--write", default=None, help="append the results section to this file")
    args = ap.parse_args()
    names = args.schedules.split(",")
    res: dict[str, list[dict]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for key in order:
                r = run_one(Path(tmp), f"{key}-{rep}", key, args.steps, args.extra)
                res[key].append(r)
                print(f"[rep {rep}] {key}: step {r['step_s']:.3f} s, {r['trained']:.0f} rows "
                      "trained per step" + (f", compute {r['compute_s']:.3f} s a step"
                                            if "compute_s" in r else ""), flush=True)
    base = "plain" if "plain" in res else names[0]
    lines = [
        "## Framework tax (benchmarks/overhead.py)\n",
        f"`python benchmarks/overhead.py {' '.join(sys.argv[1:])}` on {platform.node()} "
        f"(2-core CPU VM), {time.strftime('%Y-%m-%d %H:%M')}; {args.steps} steps per run, steps "
        f"{WARMUP}..{args.steps - 2} counted; median (min-max) over {args.repeats} repeats; "
        f"ratios within a repeat.\n",
        f"| schedule | step s | rows trained per step | step time / {base} | step / compute "
        f"| at equal speed / {base} | goal |",
        "|---|---|---|---|---|---|---|"]
    for key in names:
        rs = res[key]
        ratio = [r["step_s"] / b["step_s"] for r, b in zip(rs, res[base], strict=True)]
        goal = f"<= {GOALS[key]:.2f}" if key in GOALS else "-"
        per, equal = "-", "-"
        if all("per_compute" in r for r in rs + res[base]):
            per = fmt([r["per_compute"] for r in rs])
            equal = fmt([r["per_compute"] / b["per_compute"]
                         for r, b in zip(rs, res[base], strict=True)], ".2f")
        lines.append(f"| {key} | {fmt([r['step_s'] for r in rs])} | "
                     f"{fmt([r['trained'] for r in rs], '.0f')} | {fmt(ratio, '.2f')} | {per} | "
                     f"{equal} | {goal} |")
    if "plain" in res:
        share = fmt([r["train_share"] for r in res["plain"]], ".2f")
        lines.append(f"\nThe plain loop's forward, backward and optimizer step take {share} of its "
                     "step: a split schedule, whose one train rank does that work alone, cannot "
                     "go below it.")
    lines.append("\nstep / compute: a one-core run's wall time over the time its shared compute "
                 "took (decode steps, forward, backward, optimizer; `compute_probe.py`), steps "
                 f"{WARMUP}.. to the last optimizer step. Its ratio between two schedules is their "
                 "step-time ratio at equal machine speed (this VM's speed moves between runs) if "
                 "their compute runs equally fast: a slower compute in one of them is not counted. "
                 "Not taken for the split schedules, whose two ranks also slow each other down.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
