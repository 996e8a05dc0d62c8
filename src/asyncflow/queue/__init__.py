"""The streaming data queue: rows and named columns passed between the RL stages. A row becomes
visible to a stage once every column that stage needs is stored, and reaches each stage once.

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
