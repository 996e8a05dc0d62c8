"""Draw a run's trace.json as a Gantt chart PNG: one row per (rank, stage), one bar per span.

    python scripts/gantt.py runs/<name>/trace.json out.png [--from-step 5 --to-step 10]

Needs matplotlib (`EXTRAS=dev,hf,bench bash scripts/setup.sh`).
"""

from __future__ import annotations

import argparse
import json

COLORS = {"generate": "tab:blue", "eval": "tab:cyan", "score": "tab:purple",
          "weight_recv": "tab:gray", "wait_version": "whitesmoke", "advantage": "tab:olive",
          "ref_logprobs": "tab:brown", "fwd_bwd": "tab:orange", "optim_step": "tab:red",
          "weight_send": "tab:green", "weight_gather": "tab:green"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("out")
    ap.add_argument("--from-step", type=int, default=None)
    ap.add_argument("--to-step", type=int, default=None)
    ap.add_argument("--title", default=None)
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = json.load(open(args.trace))["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("name") == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X"
             and (args.from_step is None or e["args"].get("step", 0) >= args.from_step)
             and (args.to_step is None or e["args"].get("step", 0) <= args.to_step)]
    if not spans:
        raise SystemExit(f"{args.trace}: no spans in that step range")
    t0 = min(e["ts"] for e in spans)
    rows = sorted({(e["pid"], e["tid"]) for e in spans})
    fig, ax = plt.subplots(figsize=(14, 0.45 * len(rows) + 1.5))
    for y, key in enumerate(rows):
        for e in (e for e in spans if (e["pid"], e["tid"]) == key):
            ax.barh(y, e["dur"] / 1e3, left=(e["ts"] - t0) / 1e3, height=0.8,
                    color=COLORS.get(e["name"], "tab:pink"), edgecolor="black", linewidth=0.2)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{procs.get(p, p)}: {threads.get((p, t), t)}" for p, t in rows])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, COLORS.keys(), ncol=6, fontsize=7, loc="upper center",
              bbox_to_anchor=(0.5, -0.12 if len(rows) > 4 else -0.25))
    ax.set_title(args.title or args.trace)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
