"""Entry point: `torchrun --nproc_per_node=N -m asyncflow.train [hydra overrides]`.

Parses config, runs the pipeline, and tears down on both paths. A configuration mistake is one
line on stderr naming the field, and exit code 2, before any work starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

from asyncflow.checkpoint import check_fresh_run_dir
from asyncflow.config import ConfigError, load_config, starts_fresh
from asyncflow.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"asyncflow: config error: {e}", file=sys.stderr)
        return 2
    from asyncflow.pipeline.runner import StopRequested, run

    try:
        if cfg.run.name is not None and starts_fresh(cfg):
            check_fresh_run_dir(Path(cfg.run.root) / cfg.run.name, cfg.run.overwrite)
        run(cfg)
    except (ValueError, TypeError) as e:  # user or data mistakes found while building the run
        print(f"asyncflow: error: {e}", file=sys.stderr)
        return 2
    except StopRequested:  # SIGTERM/SIGINT: checkpointed at a step boundary
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
