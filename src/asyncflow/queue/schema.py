"""Column schema and queue configuration: what a row may hold and how each tensor is checked.

A ragged column (response tokens) is declared with its maximum length as `shape[0]`: storage keeps a
fixed slot of that size plus a length, so shared-memory slabs stay simple fixed-stride arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_DTYPES: dict[str, torch.dtype] = {
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_TRANSPORTS = ("local", "shm", "dist")


@dataclass
class ColumnSpec:
    """One named field of a row."""

    name: str
    """Column name, e.g. `prompt_ids`."""
    dtype: str = "int64"
    """Element type; one of the keys of `_DTYPES` (int64, float32, bfloat16, ...)."""
    shape: list[int] = field(default_factory=list)
    """Per-row shape; `[]` for a scalar. For a ragged column `shape[0]` is the maximum length."""
    ragged: bool = False
    """Rows have different lengths along dim 0 (up to `shape[0]`); returned as values + offsets."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"column {self.name!r}: dtype={self.dtype!r}; allowed: {sorted(_DTYPES)}"
            )
        if any(int(d) < 1 for d in self.shape):
            raise ValueError(f"column {self.name!r}: shape={self.shape} must have sizes >= 1")
        if self.ragged and not self.shape:
            raise ValueError(f"column {self.name!r}: ragged=True needs shape=[max_len, ...]")
        self.shape = [int(d) for d in self.shape]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def row_numel(self) -> int:
        """Elements in one row's slot (the maximum for a ragged column)."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    def check(self, value: torch.Tensor) -> None:
        """Raise ValueError unless `value` is one row of this column (ragged: any length <= max)."""
        if value.dtype != self.torch_dtype:
            raise ValueError(
                f"column {self.name!r}: dtype {value.dtype} contradicts schema {self.dtype}; "
                f"convert with .to(torch.{self.dtype})"
            )
        if value.device.type != "cpu":
            raise ValueError(
                f"column {self.name!r}: tensor on {value.device}; this store holds CPU tensors"
            )
        if self.ragged:
            ok = value.dim() == len(self.shape) and list(value.shape[1:]) == self.shape[1:]
            ok = ok and value.shape[0] <= self.shape[0]
        else:
            ok = list(value.shape) == self.shape
        if not ok:
            want = f"[<= {self.shape[0]}, *{self.shape[1:]}]" if self.ragged else str(self.shape)
            raise ValueError(
                f"column {self.name!r}: row shape {list(value.shape)} contradicts schema {want}"
            )


@dataclass
class StageSpec:
    """A consumer of rows: the queue delivers each row to each stage exactly once."""

    name: str
    """Stage name, e.g. `reward`."""
    needs: list[str] = field(default_factory=list)
    """Columns that must all be ready before a row is offered to this stage."""


@dataclass
class QueueConfig:
    """The streaming data queue: schema, capacity and where the control plane listens."""

    columns: list[ColumnSpec] = field(default_factory=list)
    """Every column a row may hold."""
    stages: list[StageSpec] = field(default_factory=list)
    """Every stage that consumes rows; a row is freed once all of them consumed it."""
    capacity_rows: int = 4096
    """Most rows stored at once; `put` of new rows blocks while the queue is full."""
    group_size: int = 1
    """Rows per group (GRPO n); the group sampler hands out only whole groups."""
    rows_per_step: int = 0
    """Rows in one global step; needed by the step sampler ("the rest of step s"); 0 = unknown."""
    transport: str = "shm"
    """How consumers pull other ranks' columns: `local` (one process), `shm` (one host), `dist`."""
    host: str = "127.0.0.1"
    """Address the controller's control socket binds to (never 0.0.0.0 unless you mean it)."""
    port: int = 0
    """Control socket port; 0 picks a free one (read it back from the server)."""
    secret: str = ""
    """Shared by the host and its clients: a connection whose hello lacks it is refused (any
    local process can reach the port). Runs set a random one per run; empty: no check."""
    timeout_s: float = 30.0
    """Default timeout of blocking `put`/`get` calls and of connecting to the controller."""

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise ValueError(f"columns: duplicate names in {names}")
        if len(names) > 62:
            raise ValueError(f"columns: {len(names)} columns; at most 62 are supported")
        stage_names = [s.name for s in self.stages]
        if len(set(stage_names)) != len(stage_names) or len(stage_names) > 62:
            raise ValueError(f"stages: need <= 62 unique names, got {stage_names}")
        for s in self.stages:
            unknown = [c for c in s.needs if c not in names]
            if unknown or not s.needs:
                raise ValueError(
                    f"stages: stage {s.name!r} needs={s.needs}; unknown {unknown}; "
                    f"needs must be a non-empty subset of {names}"
                )
        if self.capacity_rows < 1:
            raise ValueError(f"capacity_rows={self.capacity_rows}; must be >= 1")
        if self.group_size < 1:
            raise ValueError(f"group_size={self.group_size}; must be >= 1")
        if self.rows_per_step < 0:
            raise ValueError(f"rows_per_step={self.rows_per_step}; must be >= 0 (0 = unknown)")
        if self.transport not in _TRANSPORTS:
            raise ValueError(f"transport={self.transport!r}; allowed: {list(_TRANSPORTS)}")


class Schema:
    """Column lookup by name and by index (the bit used in ready masks)."""

    def __init__(self, columns: list[ColumnSpec]):
        self.columns = list(columns)
        self.index = {c.name: i for i, c in enumerate(columns)}
        self.by_name = {c.name: c for c in columns}

    def spec(self, name: str) -> ColumnSpec:
        if name not in self.by_name:
            raise ValueError(f"unknown column {name!r}; known columns: {list(self.by_name)}")
        return self.by_name[name]

    def mask(self, names: list[str]) -> int:
        m = 0
        for n in names:
            self.spec(n)
            m |= 1 << self.index[n]
        return m


@dataclass
class Ragged:
    """A ragged column of a batch: `values` concatenated along dim 0, row i is
    `values[offsets[i]:offsets[i+1]]`."""

    values: torch.Tensor
    offsets: torch.Tensor  # int64 [B+1]

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @staticmethod
    def from_lengths(values: torch.Tensor, lengths: torch.Tensor) -> Ragged:
        """Rows of `values` (concatenated along dim 0) of the given int64 lengths."""
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        return Ragged(values, offsets)

    @staticmethod
    def from_rows(rows: list[torch.Tensor], empty: torch.Tensor) -> Ragged:
        """Rows given as tensors (concatenated along dim 0); `empty` (no rows, the column's dtype
        and trailing shape) is the values of a Ragged with no rows."""
        return Ragged.from_lengths(torch.cat(rows) if rows else empty,
                                   torch.tensor([r.shape[0] for r in rows], dtype=torch.int64))

    @staticmethod
    def from_lists(rows: list[list], dtype: torch.dtype) -> Ragged:
        """Rows given as Python lists (token ids, log-probs): one tensor for all of them, not one
        per row (a hot path: every generated row goes through it)."""
        return Ragged.from_lengths(torch.tensor([x for r in rows for x in r], dtype=dtype),
                                   torch.tensor([len(r) for r in rows], dtype=torch.int64))

    @staticmethod
    def from_padded(padded: torch.Tensor, lengths: torch.Tensor) -> Ragged:
        """The inverse of `padded`: row i is `padded[i, :lengths[i]]`."""
        mask_BT = torch.arange(padded.shape[1]) < lengths[:, None]
        return Ragged.from_lengths(padded[mask_BT], lengths)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def slice_rows(self, start: int, end: int) -> Ragged:
        """Rows [start, end) as a view of these values."""
        offsets = self.offsets[start : end + 1]
        first = int(offsets[0])
        return Ragged(self.values[first : int(offsets[-1])], offsets - first)

    @staticmethod
    def gather(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> Ragged:
        """Row i is `values[starts[i] : starts[i] + lengths[i]]` (int64 tensors): one index
        computation and one `index_select` for all rows, however many (no per-row tensors)."""
        out = Ragged.from_lengths(values[:0], lengths)
        total = int(out.offsets[-1])
        index = torch.arange(total) + torch.repeat_interleave(starts - out.offsets[:-1], lengths,
                                                               output_size=total)
        out.values = values.index_select(0, index)
        return out

    def take(self, rows: list[int] | torch.Tensor) -> Ragged:
        """The given rows, in the given order, as a new Ragged (values copied once)."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        return Ragged.gather(self.values, self.offsets[:-1][rows], self.lengths[rows])

    def rows(self) -> list[torch.Tensor]:
        return [
            self.values[a:b]
            for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist(), strict=True)
        ]

    def padded(self, pad_value: float = 0) -> torch.Tensor:
        """Dense `[B, max_len, ...]` tensor, rows right-padded with `pad_value`."""
        lens = self.lengths
        max_len = int(lens.max()) if len(self) else 0
        out = self.values.new_full((len(self), max_len, *self.values.shape[1:]), pad_value)
        mask_BT = torch.arange(max_len) < lens[:, None]
        out[mask_BT] = self.values
        return out
