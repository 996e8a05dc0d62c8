"""Checks a run's inputs before any rank starts, and carries a rank's user error to the launcher.

`preflight` finds what a user can get wrong without starting torch.distributed: the config
(composed and validated once), the placement against the number of ranks, the run directory and
the checkpoint to resume, and the model directory's files (headers and tensor shapes, no tensor
read). It writes nothing. Errors are ValueErrors with one line naming the field or file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ERROR_DIR_ENV = "ASYNCFLOW_ERROR_DIR"
"""Set by `python -m asyncflow.launch`: where a rank leaves its one-line user error."""


def preflight(overrides: list[str], nproc: int, config_dir: str | None = None,
              config_name: str = "config"):
    """The validated Config for `overrides` on `nproc` ranks; raises ConfigError (a ValueError)
    for the config itself and ValueError for the rest."""
    from asyncflow.checkpoint import check_fresh_run_dir, resolve_resume
    from asyncflow.config import load_config, starts_fresh
    from asyncflow.models.checkpoint import check_pretrained

    cfg = load_config(overrides, config_dir, config_name)
    cfg.placement.resolve(nproc)
    _check_writable(Path(cfg.run.root), "run.root")
    if cfg.run.name is not None:
        run_dir = Path(cfg.run.root) / cfg.run.name
        if starts_fresh(cfg):
            check_fresh_run_dir(run_dir, cfg.run.overwrite)
    if cfg.resume not in ("auto", "false"):
        resolve_resume(cfg.resume, Path(cfg.run.root))  # a path: it must be a sound checkpoint
    if cfg.model.path is not None:
        check_pretrained(cfg.model.path)
    if cfg.model.pretrained is not None:
        from asyncflow.models.packaged import PACKAGED_MODELS

        PACKAGED_MODELS[cfg.model.pretrained]()  # its package is installed
    if cfg.engine.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"engine.device={cfg.engine.device}: no CUDA device here "
                             f"(torch {torch.__version__}); use engine.device=cpu")
    from asyncflow.launch.placement import train_device_type

    train_device_type(cfg.trainer.device)  # trainer.device=cuda needs CUDA
    return cfg


def _check_writable(path: Path, key: str) -> None:
    """Probe with a directory made and removed at once (permission bits say nothing to root, nor
    about read-only or pseudo file systems); nothing is left behind."""
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".asyncflow-probe-", dir=existing))
    except OSError as e:
        raise ValueError(f"{key}={path}: cannot write under {existing} ({e.strerror or e}); "
                         f"choose a writable {key}") from None


def report_user_error(rank: int, line: str) -> bool:
    """Under the launcher, hand a rank's one-line user error to it and return True (the launcher
    prints one line whichever ranks failed); otherwise return False: the caller prints it."""
    directory = os.environ.get(ERROR_DIR_ENV)
    if not directory or not Path(directory).is_dir():
        return False
    tmp = Path(directory) / f".rank{rank}.tmp"
    tmp.write_text(line + "\n")
    tmp.rename(Path(directory) / f"rank{rank}.err")  # whole or absent
    return True
