"""The streaming data queue: rows and named columns between RL stages (DESIGN.md section 4).

Stages use `QueueClient.put` / `get` / `ack`; one rank hosts the `Controller` (`serve`).
"""

from asyncflow.queue.client import Batch, QueueClient, connect, serve
from asyncflow.queue.controller import Controller, Grant
from asyncflow.queue.samplers import (
    FifoSampler,
    GroupRangeSampler,
    GroupSampler,
    StepSampler,
    balance_by_tokens,
)
from asyncflow.queue.schema import ColumnSpec, QueueConfig, Ragged, StageSpec

__all__ = [
    "Batch",
    "ColumnSpec",
    "Controller",
    "FifoSampler",
    "Grant",
    "GroupRangeSampler",
    "GroupSampler",
    "QueueClient",
    "QueueConfig",
    "Ragged",
    "StageSpec",
    "StepSampler",
    "balance_by_tokens",
    "connect",
    "serve",
]
