"""Row metadata and the typed answer to a `get`, shared by the controller and the client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

UNKNOWN_VERSION = -1
"""`policy_version` of rows no policy has produced yet (prompts)."""


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
    locations: dict[str, tuple[list[int], list[int]]]
    """column -> (owner rank of each row, slot of each row in its owner's storage)."""
    exhausted: bool = False
    """Empty because the step sampler's step has nothing left for the stage (not a timeout)."""

    @staticmethod
    def empty(exhausted: bool = False) -> Grant:
        return Grant(-1, [], [], [], [], [], {}, exhausted)

    def to_wire(self) -> dict[str, Any]:
        """For the socket. Every int list is packed (`pack_ints`): rows put together have
        consecutive ids and slots and share step and owner, so a 64-row grant is a few numbers
        instead of ~3 KB of JSON arrays (~110 us to write and read)."""
        locs: dict[str, Any] = {}
        seen: list[tuple[str, tuple[list[int], list[int]]]] = []
        for col, loc in self.locations.items():
            same = next((c for c, other in seen if other == loc), None)  # columns put together
            locs[col] = same if same is not None else [pack_ints(loc[0]), pack_ints(loc[1])]
            seen.append((col, loc))
        return {"lease_id": self.lease_id, "rows": pack_ints(self.row_ids),
                "steps": pack_ints(self.steps), "groups": pack_ints(self.group_ids),
                "versions": pack_ints(self.policy_versions), "tokens": pack_ints(self.num_tokens),
                "locations": locs, "exhausted": self.exhausted}  # fmt: skip

    @staticmethod
    def from_wire(d: dict[str, Any]) -> Grant:
        """Decode a socket reply (`to_wire`)."""
        locs: dict[str, tuple[list[int], list[int]]] = {}
        for col, loc in d["locations"].items():
            locs[col] = locs[loc] if isinstance(loc, str) else (unpack_ints(loc[0]),
                                                                unpack_ints(loc[1]))
        return Grant(
            int(d["lease_id"]), unpack_ints(d["rows"]), unpack_ints(d["steps"]),
            unpack_ints(d["groups"]), unpack_ints(d["versions"]), unpack_ints(d["tokens"]), locs,
            bool(d["exhausted"]),
        )  # fmt: skip


def pack_ints(xs: list[int]) -> list[int] | dict[str, int]:
    """An arithmetic progression as `{"first", "stride", "n"}`, anything else as the list itself.
    The check runs at C speed (`count`, a range compared with the list), not per element in Python."""
    n = len(xs)
    if n < 3:
        return xs
    first, stride = xs[0], xs[1] - xs[0]
    if xs.count(first) == n if stride == 0 else xs == list(range(first, first + stride * n, stride)):
        return {"first": first, "stride": stride, "n": n}
    return xs


def unpack_ints(packed: list[int] | dict[str, int]) -> list[int]:
    if isinstance(packed, list):
        return packed
    first, stride, n = packed["first"], packed["stride"], packed["n"]
    return [first] * n if stride == 0 else list(range(first, first + stride * n, stride))
