"""Prepare (or reuse) the tiny default model and show it answering held-out problems.

    python -m asyncflow.prepare [--size xs] [--seed 0] [--cache DIR]

Without --size/--seed it prepares the model the default run uses (`model.tiny` of conf/config.yaml).

The accuracy printed is recomputed from the saved directory, not copied from prep.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool

import torch  # noqa: E402

from asyncflow.config import load_config  # noqa: E402
from asyncflow.log import setup_logging  # noqa: E402
from asyncflow.models import Tokenizer, load_pretrained  # noqa: E402
from asyncflow.tasks.arithmetic import AdditionTask  # noqa: E402
from asyncflow.tasks.tiny import (  # noqa: E402
    MARKER,
    TINY_SIZES,
    greedy_completions,
    prepare_tiny_model,
)

NUM_SHOWN = 8


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m asyncflow.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=None, choices=sorted(TINY_SIZES),
                        help="model size (default: the default run's)")
    parser.add_argument("--seed", type=int, default=None,
                        help="weight-init seed (default: the default run's)")
    parser.add_argument("--cache", default=None,
                        help="cache folder (default $ASYNCFLOW_CACHE or <repo>/.cache)")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_config([]).model.tiny
    cfg = dataclasses.replace(cfg, size=args.size or cfg.size,
                              seed=cfg.seed if args.seed is None else args.seed)
    torch.set_num_threads(cfg.num_threads)
    path = prepare_tiny_model(cfg, args.cache)

    record = json.loads((path / MARKER).read_text())
    model = load_pretrained(path)
    tokenizer = Tokenizer.from_pretrained(path)
    task = AdditionTask(cfg.task)
    heldout = task.heldout_problems()
    outs = greedy_completions(model, tokenizer, heldout, max_new_tokens=len(heldout[0].answer) + 1)
    rewards = [task.reward(c, p.answer, f) for (c, f), p in zip(outs, heldout, strict=True)]
    print(f"model: {path}")
    print(f"prepared in {record['seconds']:.1f} s, {record['steps']} SFT steps, "
          f"{record['num_params'] / 1e6:.2f} M params")
    print(f"held-out greedy accuracy: {sum(rewards) / len(rewards):.3f} "
          f"({int(sum(rewards))}/{len(rewards)})")
    for p, (completion, finished), r in list(zip(heldout, outs, rewards, strict=True))[:NUM_SHOWN]:
        shown = completion + ("<eos>" if finished else "")
        print(f"  {p.prompt}{shown:<10} {'right' if r else 'wrong (want ' + p.answer + ')'}")


if __name__ == "__main__":
    main()
