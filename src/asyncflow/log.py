"""One stdlib logger for the whole library: rank prefix, rank-0 filter, warn-once.

Configured once by the entry point (`setup_logging`); library modules call `get_logger(__name__)`.
"""

from __future__ import annotations

import logging
import os
import sys

_ROOT = "asyncflow"
_warned: set[str] = set()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    """Adds `rank` to every record; drops INFO and below on ranks other than 0 unless `all_ranks`."""

    def __init__(self, all_ranks: bool):
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = _rank()
        return self.all_ranks or record.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(level: str = "INFO", all_ranks: bool = False, file: str | None = None) -> None:
    """Configure the `asyncflow` logger once: stderr, and optionally a per-rank file."""
    logger = logging.getLogger(_ROOT)
    logger.handlers.clear()
    logger.setLevel(level)
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s r%(rank)s %(levelname).1s] %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        handlers.append(logging.FileHandler(file))
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_RankFilter(all_ranks or h is not handlers[0]))
        logger.addHandler(h)


def get_logger(name: str) -> logging.Logger:
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


def warn_once(logger: logging.Logger, msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)
