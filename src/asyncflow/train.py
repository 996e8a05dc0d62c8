"""Entry point: `torchrun --nproc_per_node=N -m asyncflow.train [hydra overrides]`.

Parses config, runs the pipeline, and tears down on both paths. A configuration mistake is one
line on stderr naming the field, and exit code 2, before any work starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from asyncflow.checkpoint import check_fresh_run_dir
from asyncflow.config import ConfigError, load_config, starts_fresh
from asyncflow.launch.preflight import report_user_error
from asyncflow.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        return _user_error(f"asyncflow: config error: {e}")
    from asyncflow.pipeline.runner import StopRequested, run

    try:
        if cfg.run.name is not None and starts_fresh(cfg):
            check_fresh_run_dir(Path(cfg.run.root) / cfg.run.name, cfg.run.overwrite)
        run(cfg)
    except (ValueError, TypeError) as e:  # user or data mistakes found while building the run
        return _user_error(f"asyncflow: error: {e}")
    except StopRequested:  # SIGTERM/SIGINT: checkpointed at a step boundary
        return 143
    return 0


def _user_error(line: str) -> int:
    """One line, exit 2: to the launcher when there is one (it prints it once for all ranks),
    else to stderr."""
    line = " ".join(line.split())  # one line, whatever the message held
    if not report_user_error(int(os.environ.get("RANK", 0)), line):
        print(line, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
