"""Time to accuracy of the default run: held-out accuracy per step and per second of step time.

    python benchmarks/convergence.py [--seeds 0,1,2] [--model-seeds fixed|same] [--etas 1]
                                     [--steps N] [--extra k=v ...]
                                     [--png benchmarks/img/time_to_accuracy.png] [--write RESULTS.md]

Each (seed, eta) is one torchrun job of the default run (`bash scripts/train.sh`'s config: 1
rollout + 1 train rank, tiny default) with `run.seed` set to the seed. `--model-seeds fixed` (the
default) keeps the default's warm-started model, as a user changing `run.seed` does; `same` also
sets `model.tiny.seed` to the seed, so each seed has its own warm start: a different starting
model, which matters far more than the RL seed (see RESULTS.md). Runs are interleaved seed-major
so load on a shared machine hits every eta alike. Reported per run: starting and final greedy held-out accuracy (512
prompts), its lowest value after the start, and the seconds of step time (sum of
`perf/step_time_s`: start-up excluded, evaluations included where they delayed a step) and steps
to first reach 0.5, 0.7 and 0.9.
A run collapses when its accuracy ends below where it started.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = (0.5, 0.7, 0.9)


def run(root: Path, name: str, seed: int, eta: int, steps: int | None, eval_every: int,
        own_model: bool, extra: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "asyncflow.train", f"run.root={root}", f"run.name={name}", f"run.seed={seed}",
           *([f"model.tiny.seed={seed}"] if own_model else []), f"pipeline.max_staleness={eta}",
           f"pipeline.eval_every={eval_every}", *extra]
    if steps is not None:
        cmd.append(f"pipeline.num_steps={steps}")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    lines = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
    elapsed, curve = 0.0, []
    for x in lines:  # elapsed step time at the start of each step = sum of earlier step periods
        if "eval/accuracy" in x:
            curve.append({"step": x["step"], "s": elapsed, "acc": x["eval/accuracy"]})
        elapsed += x.get("perf/step_time_s") or 0.0
    return curve


def first_reach(curve: list[dict], target: float) -> dict | None:
    return next((p for p in curve if p["acc"] >= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="default: the default run's")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--model-seeds", choices=["fixed", "same"], default="fixed",
                    help="fixed: the default warm start for every seed; same: its own per seed")
    ap.add_argument("--etas", default="1", help="comma-separated; the default run's eta is 1")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    ap.add_argument("--png", default=None)
    ap.add_argument("--write", default=None)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    etas = [int(e) for e in args.etas.split(",")]
    curves: dict[tuple[int, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for eta in etas:
                t0 = time.perf_counter()
                c = curves[eta, seed] = run(Path(tmp), f"s{seed}e{eta}", seed, eta, args.steps,
                                            args.eval_every, args.model_seeds == "same",
                                            args.extra)
                print(f"seed {seed} eta {eta}: acc {c[0]['acc']:.3f} -> {c[-1]['acc']:.3f} "
                      f"({c[-1]['s']:.0f} s of steps, {time.perf_counter() - t0:.0f} s wall)",
                      flush=True)
    rows = ["| eta | seed | start | final | lowest | " + " | ".join(
        f"s (steps) to {t}" for t in TARGETS) + " | collapsed |",
            "|---|---|---|---|---|" + "---|" * len(TARGETS) + "---|"]
    for eta in etas:
        for seed in seeds:
            c = curves[eta, seed]
            reach = [first_reach(c, t) for t in TARGETS]
            rows.append(f"| {eta} | {seed} | {c[0]['acc']:.3f} | {c[-1]['acc']:.3f} | "
                        f"{min(p['acc'] for p in c[1:]):.3f} | " + " | ".join(
                            "-" if p is None else f"{p['s']:.0f} ({p['step']})" for p in reach)
                        + f" | {'yes' if c[-1]['acc'] < c[0]['acc'] else 'no'} |")
        to_90 = [first_reach(curves[eta, s], 0.9) for s in seeds]
        hit = [p["s"] for p in to_90 if p is not None]
        rows.append(f"| {eta} | all | | {statistics.mean(curves[eta, s][-1]['acc'] for s in seeds):.3f}"
                    f" (mean) | | | | {len(hit)} of {len(seeds)} seeds reach 0.9"
                    + (f", slowest in {max(hit):.0f} s" if hit else "") + " | |")
    cmd = " ".join(sys.argv[1:])
    text = "\n".join([
        "## Time to accuracy (benchmarks/convergence.py)\n",
        f"`python benchmarks/convergence.py {cmd}`, 2-core CPU VM, "
        f"{time.strftime('%Y-%m-%d %H:%M')}: the default run ("
        + ("each seed with its own warm start" if args.model_seeds == "same" else
           "the default warm start, model.tiny.seed=0, for every seed")
        + f"), greedy held-out accuracy on 512 "
        f"prompts every {args.eval_every} steps; seconds are step time (sum of "
        "`perf/step_time_s`), start-up excluded, evaluations included where they delayed a "
        "step.\n", *rows, ""])
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + text + "\n")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        colors = {0: "tab:blue", 1: "tab:orange", 2: "tab:green"}
        for eta in etas:
            for i, s in enumerate(seeds):
                c = curves[eta, s]
                kw = dict(color=colors.get(eta, "gray"), alpha=0.8,
                          label=f"eta={eta}" if i == 0 else None)
                ax1.plot([p["step"] for p in c], [p["acc"] for p in c], marker="o", ms=3, **kw)
                ax2.plot([p["s"] for p in c], [p["acc"] for p in c], marker="o", ms=3, **kw)
        ax1.set(xlabel="optimizer step", ylabel="greedy held-out accuracy", title="per step")
        ax2.set(xlabel="seconds of step time", title="per second")
        for ax in (ax1, ax2):
            ax.axhline(0.9, color="gray", lw=0.8, ls="--")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
