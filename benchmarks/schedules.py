"""Pipeline schedules side by side on one workload: is asynchronous streaming faster, and by how much?

    python benchmarks/schedules.py [--steps 40] [--repeats 3] [--workloads balanced,rollout-heavy]
                                   [--write benchmarks/RESULTS.md] [--gantt-dir benchmarks/img]

Schedules (all on the same 2 ranks and the same tiny-default workload):
  a colocated   every rank generates, then trains (FSDP over both), eta = 0
  b sequential  1 rollout + 1 train rank, train waits for the whole step, eta = 0
  c streaming   as b, but training starts on micro-batches as they become ready
  d eta=1       streaming, rollout may run one policy version ahead (delayed weight update)
  e eta=2       streaming, two versions ahead
Per schedule: step time (median of steps after warm-up), generated tokens/s, idle fraction per
mesh, exposed weight-sync time. The ideal speed-up of overlapping two meshes over sequential is
(G + T) / max(G, T), G and T the per-step busy seconds of rollout and train measured in (b).
Each repeat runs the five schedules back to back; ratios are taken within a repeat.
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
SCHEDULES = {
    "a": ("colocated", ["placement=colocated"]),
    "b": ("sequential", ["pipeline.streaming=false", "pipeline.max_staleness=0"]),
    "c": ("streaming", ["pipeline.max_staleness=0"]),
    "d": ("eta=1", ["pipeline.max_staleness=1"]),
    "e": ("eta=2", ["pipeline.max_staleness=2"]),
}
WORKLOADS = {
    # generation and training take about the same busy time per step here
    "balanced": [],
    # fewer engine slots: generation ~2x longer than training
    "rollout-heavy": ["engine.max_batch_size=16"],
}
WARMUP = 5


def run_one(root: Path, name: str, overrides: list[str], steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "asyncflow.train", f"run.root={root}", f"run.name={name}",
           f"pipeline.num_steps={steps}", f"pipeline.eval_every={steps + 1}",
           "pipeline.eval_size=64", *overrides]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    lines = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
    body = [x for x in lines if x["step"] < steps][WARMUP:]

    def med(key, default=0.0):
        vals = [x[key] for x in body if x.get(key) is not None]
        return statistics.median(vals) if vals else default

    rollout_busy = med("time/rollout_s") + med("time/reward_s")
    train_busy = med("time/train_s") + med("time/advantage_s")
    return {"step_s": med("perf/step_time_s"), "tok_s": med("perf/tokens_per_s"),
            "idle_rollout": med("idle/rollout", None), "idle_train": med("idle/train", None),
            "idle_all": med("idle/all", None), "exposed_s": med("weights/exposed_s"),
            "G": rollout_busy, "T": train_busy, "trace": root / name / "trace.json"}


def fmt(xs: list[float], spec: str = ".3f") -> str:
    if not xs or xs[0] is None:
        return "-"
    m = statistics.median(xs)
    return f"{m:{spec}} ({min(xs):{spec}}-{max(xs):{spec}})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", default="balanced,rollout-heavy")
    ap.add_argument("--write", default=None, help="append the results section to this file")
    ap.add_argument("--gantt-dir", default=None, help="write Gantt PNGs of (b) and (d) here")
    args = ap.parse_args()
    if args.gantt_dir:
        try:
            import matplotlib  # noqa: F401 - scripts/gantt.py draws with it
        except ImportError:  # fail now, not after the first workload's runs
            raise SystemExit("--gantt-dir needs matplotlib: .venv/bin/pip install -e '.[bench]'") from None
    report = ["## Schedules (benchmarks/schedules.py)\n",
              f"`python benchmarks/schedules.py {' '.join(sys.argv[1:])}` on "
              f"{platform.node() or 'dev VM'} (2-core CPU VM, 1 thread per rank), "
              f"{time.strftime('%Y-%m-%d %H:%M')}; {args.steps} steps per run, the first "
              f"{WARMUP} excluded; median (min-max) over {args.repeats} repeats.\n"]
    for workload in args.workloads.split(","):
        res: dict[str, list[dict]] = {k: [] for k in SCHEDULES}
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.repeats):
                for key, (label, overrides) in SCHEDULES.items():
                    r = run_one(Path(tmp), f"{workload}-{key}-{rep}",
                                WORKLOADS[workload] + overrides, args.steps)
                    res[key].append(r)
                    print(f"[{workload} rep {rep}] {key} {label}: step {r['step_s']:.3f}s "
                          f"tok/s {r['tok_s']:.0f} G {r['G']:.3f} T {r['T']:.3f}", flush=True)
            if args.gantt_dir:
                out = Path(args.gantt_dir)
                out.mkdir(parents=True, exist_ok=True)
                for key in ("b", "d"):
                    subprocess.run([sys.executable, str(REPO / "scripts" / "gantt.py"),
                                    str(res[key][-1]["trace"]),
                                    str(out / f"gantt-{workload}-{key}.png"),
                                    "--from-step", str(args.steps // 2),
                                    "--to-step", str(args.steps // 2 + 3),
                                    "--title", f"{workload}: ({key}) {SCHEDULES[key][0]}"],
                                   check=True)
        report.append(f"\n### workload `{workload}` {WORKLOADS[workload] or '(defaults)'}\n")
        report.append("| schedule | step s | generated tok/s | idle rollout | idle train | "
                      "exposed sync s |\n|---|---|---|---|---|---|")
        for key, (label, _) in SCHEDULES.items():
            rs = res[key]
            idle_r = [r["idle_all"] if key == "a" else r["idle_rollout"] for r in rs]
            idle_t = [r["idle_all"] if key == "a" else r["idle_train"] for r in rs]
            report.append(f"| ({key}) {label} | {fmt([r['step_s'] for r in rs])} | "
                          f"{fmt([r['tok_s'] for r in rs], '.0f')} | {fmt(idle_r, '.2f')} | "
                          f"{fmt(idle_t, '.2f')} | {fmt([r['exposed_s'] for r in rs], '.4f')} |")
        def ratio(x: str, y: str, res=res) -> list[float]:
            return [res[y][i]["step_s"] / res[x][i]["step_s"] for i in range(args.repeats)]
        ideal = [(r["G"] + r["T"]) / max(r["G"], r["T"]) for r in res["b"]]
        d_b = ratio("d", "b")
        report.append(
            f"\nper-step busy time in (b): rollout G = {fmt([r['G'] for r in res['b']])} s, "
            f"train T = {fmt([r['T'] for r in res['b']])} s; ideal overlap speed-up "
            f"(G+T)/max(G,T) = {fmt(ideal, '.2f')}\n\n"
            f"speed-ups (step-time ratios within a repeat): (c)/(b) = {fmt(ratio('c', 'b'), '.2f')}, "
            f"(d)/(b) = {fmt(d_b, '.2f')}, (e)/(b) = {fmt(ratio('e', 'b'), '.2f')}, "
            f"(d)/(a) = {fmt(ratio('d', 'a'), '.2f')}; (d) reaches "
            f"{fmt([x / i for x, i in zip(d_b, ideal, strict=True)], '.0%')} of the ideal.\n")
    text = "\n".join(report)
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
