"""Convergence parity of bounded staleness: held-out accuracy per step and per second, eta 0/1/2.

    python benchmarks/convergence.py [--steps 200] [--seeds 0,1,2] [--etas 0,1,2]
                                     [--png benchmarks/img/convergence.png] [--write RESULTS.md]

Each (seed, eta) is one torchrun job on 2 ranks (1 rollout + 1 train, tiny default); the seed sets
the run seed and the tiny model's init seed. Runs are interleaved (seed-major) so load on a shared
machine hits every eta alike. Reported: final greedy held-out accuracy per run, the seed-to-seed
spread of eta = 0, and the wall-clock seconds each eta needs to reach the accuracy eta = 0 ends at.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(root: Path, name: str, seed: int, eta: int, steps: int, eval_every: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "asyncflow.train", f"run.root={root}", f"run.name={name}", f"run.seed={seed}",
           f"model.tiny.seed={seed}", f"pipeline.max_staleness={eta}",
           f"pipeline.num_steps={steps}", f"pipeline.eval_every={eval_every}"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    lines = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
    elapsed, curve = 0.0, []
    for x in lines:  # elapsed time at the start of each step = sum of earlier step periods
        if "eval/accuracy" in x:
            curve.append({"step": x["step"], "s": elapsed, "acc": x["eval/accuracy"]})
        elapsed += x.get("perf/step_time_s") or 0.0
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--etas", default="0,1,2")
    ap.add_argument("--png", default=None)
    ap.add_argument("--write", default=None)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    etas = [int(e) for e in args.etas.split(",")]
    curves: dict[int, dict[int, list[dict]]] = {e: {} for e in etas}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for eta in etas:
                t0 = time.perf_counter()
                curves[eta][seed] = run(Path(tmp), f"s{seed}e{eta}", seed, eta, args.steps,
                                        args.eval_every)
                c = curves[eta][seed]
                print(f"seed {seed} eta {eta}: acc {c[0]['acc']:.3f} -> {c[-1]['acc']:.3f} "
                      f"({c[-1]['s']:.0f} s of steps, {time.perf_counter() - t0:.0f} s wall)",
                      flush=True)
    final = {e: [curves[e][s][-1]["acc"] for s in seeds] for e in etas}
    secs = {e: [curves[e][s][-1]["s"] for s in seeds] for e in etas}
    base = final[etas[0]]
    lo, hi = min(base), max(base)

    def time_to(curve: list[dict], target: float) -> float | None:
        return next((p["s"] for p in curve if p["acc"] >= target), None)

    rows = ["| eta | final accuracy per seed | mean | seconds of steps (mean) | not below eta=0's "
            "spread | seconds to reach eta=0's final accuracy (per seed) |", "|---|---|---|---|---|---|"]
    for e in etas:
        reach = [time_to(curves[e][s], curves[etas[0]][s][-1]["acc"]) for s in seeds]
        inside = all(a >= lo - 1e-9 for a in final[e])
        rows.append(f"| {e} | {', '.join(f'{a:.3f}' for a in final[e])} | "
                    f"{statistics.mean(final[e]):.3f} | {statistics.mean(secs[e]):.0f} | "
                    f"{'yes' if inside else 'no'} | "
                    f"{', '.join('-' if r is None else f'{r:.0f}' for r in reach)} |")
    text = "\n".join([
        "## Convergence with staleness (benchmarks/convergence.py)\n",
        f"`python benchmarks/convergence.py {' '.join(sys.argv[1:])}`, 2-core CPU VM, "
        f"{time.strftime('%Y-%m-%d %H:%M')}: tiny default, {args.steps} steps, greedy held-out "
        f"accuracy on 512 prompts every {args.eval_every} steps, seeds {seeds}. eta = 0 spread: "
        f"{lo:.3f}-{hi:.3f}.\n",
        *rows, ""])
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
        for e in etas:
            for i, s in enumerate(seeds):
                c = curves[e][s]
                kw = dict(color=colors.get(e, "gray"), alpha=0.8,
                          label=f"eta={e}" if i == 0 else None)
                ax1.plot([p["step"] for p in c], [p["acc"] for p in c], marker="o", ms=3, **kw)
                ax2.plot([p["s"] for p in c], [p["acc"] for p in c], marker="o", ms=3, **kw)
        ax1.set(xlabel="optimizer step", ylabel="greedy held-out accuracy", title="per step")
        ax2.set(xlabel="seconds (sum of step times)", title="per wall-clock second")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
