"""The command users run: check the config once, then start the ranks under torchrun.

    python -m asyncflow.launch [--nproc-per-node N] [--max-restarts K] [--config-dir DIR]
                               [--config-name NAME] [hydra overrides ...]
    asyncflow-train ...        (the same, as the installed console script)

A mistake in the overrides, the data, the model directory or the run directory is found here,
before any rank starts: one line on stderr naming the field, exit code 2, nothing written. A user
error that only a rank can see (found after start-up) is written by that rank to a file in a
directory this launcher names (`ASYNCFLOW_ERROR_DIR`) instead of stderr; the launcher prints the
first one as one line and exits 2, without torchrun's report. Anything else is a bug: torchrun's
report of the failed ranks is printed (their tracebacks are on stderr and in `logs/rank<N>.log`)
and the exit code is 1. torchrun runs in this process (`torch.distributed.run.run`), so its
failure is an exception we can read rather than a wall of text to filter.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m asyncflow.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc-per-node", type=int, default=2)
    ap.add_argument("--max-restarts", type=int, default=0)
    ap.add_argument("--config-dir", default=None,
                    help="your own config directory, searched after the packaged configs")
    ap.add_argument("--config-name", default="config", help="primary config (default: config)")
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        ap.error(f"unknown option {bad[0]}; Hydra overrides look like key=value")

    from asyncflow.config import ConfigError
    from asyncflow.launch.preflight import ERROR_DIR_ENV, preflight

    try:
        preflight(overrides, args.nproc_per_node, args.config_dir, args.config_name)
    except ConfigError as e:
        print(f"asyncflow: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"asyncflow: error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="asyncflow-errors-") as errors:
        os.environ[ERROR_DIR_ENV] = errors
        return _torchrun(args, overrides, Path(errors))


def _torchrun(args: argparse.Namespace, overrides: list[str], errors: Path) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # the elastic agent logs every failed rank with a traceback of its own; our summary replaces it
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    targs = get_args_parser().parse_args([
        f"--nproc_per_node={args.nproc_per_node}", "--standalone",
        f"--max-restarts={args.max_restarts}", "-m", "asyncflow.train",
        *([f"--config-dir={Path(args.config_dir).absolute()}"] if args.config_dir else []),
        f"--config-name={args.config_name}", *overrides])
    try:
        run(targs)
    except ChildFailedError as e:
        user = sorted(errors.glob("rank*.err"))
        if user:  # a user error: the rank wrote its line; one line, whichever ranks hit it
            print(user[0].read_text().strip(), file=sys.stderr)
            return 2
        codes = {f.exitcode for f in e.failures.values()}
        if codes == {143}:  # SIGTERM/SIGINT: the ranks checkpointed and said so in their logs
            return 143
        print(f"asyncflow: a rank failed (exit codes {sorted(codes)}); its traceback is above "
              f"and in runs/<name>/logs/rank<N>.log\n{e.format_msg()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
