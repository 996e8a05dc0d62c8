"""Entry point: `torchrun --nproc_per_node=N -m asyncflow.train [hydra overrides]`.

Parses config, runs the pipeline, and tears down on both paths. A configuration mistake is one
line on stderr naming the field, and exit code 2, before any work starts.
"""

from __future__ import annotations

import errno
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
        cfg = load_config(*config_args(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        return _user_error(f"asyncflow: config error: {e}")
    from asyncflow.pipeline.runner import StopRequested, run

    try:
        if cfg.run.name is not None and starts_fresh(cfg):
            check_fresh_run_dir(Path(cfg.run.root) / cfg.run.name, cfg.run.overwrite)
        run(cfg)
    except (ValueError, TypeError) as e:  # user or data mistakes found while building the run
        return _user_error(f"asyncflow: error: {e}")
    except OSError as e:
        if (line := storage_error(e)) is None:
            raise
        return _user_error(line)
    except StopRequested:  # SIGTERM/SIGINT: checkpointed at a step boundary
        return 143
    return 0


def config_args(argv: list[str]) -> tuple[list[str], str | None, str]:
    """(overrides, --config-dir, --config-name) from the command line."""
    overrides, options = [], {"--config-dir": None, "--config-name": "config"}
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in options:
            options[name] = value if eq else next(it, None)
            if options[name] is None:
                raise ConfigError(f"{name} needs a value")
        else:
            overrides.append(arg)
    return overrides, options["--config-dir"], options["--config-name"]


def storage_error(e: OSError) -> str | None:
    """One line for a full, read-only or forbidden disk (the machine's state, not a bug)."""
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}.get(e.errno)
    if what is None:
        return None
    return (f"asyncflow: error: {what} writing {e.filename or 'a file'}; free space or point "
            "run.root (and the cache, ASYNCFLOW_CACHE) at a writable disk")


def _user_error(line: str) -> int:
    """One line, exit 2: to the launcher when there is one (it prints it once for all ranks),
    else to stderr."""
    line = " ".join(line.split())  # one line, whatever the message held
    if not report_user_error(int(os.environ.get("RANK", 0)), line):
        print(line, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
