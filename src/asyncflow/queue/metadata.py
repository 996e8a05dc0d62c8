"""Row metadata and the typed answer to a `get`, shared by the controller and the client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

UNKNOWN_VERSION = -1
"""`policy_version` of rows no policy has produced yet (prompts); never filtered as stale."""


@dataclass(slots=True)
class RowMeta:
    step: int
    group_id: int
    policy_version: int = UNKNOWN_VERSION
    num_tokens: int = 1
    ready_mask: int = 0
    consumed_mask: int = 0
    leased_mask: int = 0
    locations: dict[int, tuple[int, int]] = field(default_factory=dict)
    """column index -> (owner rank, slot in the owner's storage)."""


@dataclass
class Lease:
    lease_id: int
    stage: int
    consumer: str
    row_ids: list[int]


@dataclass
class Grant:
    """The answer to a `get`: leased rows, their metadata and where each requested column lives."""

    lease_id: int
    row_ids: list[int]
    steps: list[int]
    group_ids: list[int]
    policy_versions: list[int]
    num_tokens: list[int]
    locations: dict[str, list[tuple[int, int]]]
    """column -> per row (owner rank, slot)."""
    exhausted: bool = False
    """Empty because the step sampler's step has nothing left for the stage (not a timeout)."""

    @staticmethod
    def empty(exhausted: bool = False) -> Grant:
        return Grant(-1, [], [], [], [], [], {}, exhausted)

    def to_dict(self) -> dict[str, Any]:
        """For the socket: JSON writes the (owner, slot) tuples as arrays, no copy per row."""
        return dict(self.__dict__)

    @staticmethod
    def from_dict(d: dict[str, Any] | Grant) -> Grant:
        """Decode a socket reply; the in-process control plane hands over the Grant itself."""
        if isinstance(d, Grant):
            return d
        locs = {k: list(map(tuple, v)) for k, v in d["locations"].items()}
        return Grant(
            int(d["lease_id"]), list(d["row_ids"]), list(d["steps"]), list(d["group_ids"]),
            list(d["policy_versions"]), list(d["num_tokens"]), locs, bool(d.get("exhausted")),
        )  # fmt: skip
