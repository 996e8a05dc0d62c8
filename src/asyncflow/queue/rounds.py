"""Rounds of `Controller.get_balanced`: the k-th call of every rank of a data-parallel mesh joins
round k of its stage, and the round is answered for all of them at once (the last rank to arrive
takes the rows and splits them; see `Controller.get_balanced`). No lock here: the controller
holds its lock around every call."""

from __future__ import annotations

from dataclasses import dataclass, field

from asyncflow.queue.metadata import Grant


@dataclass
class Round:
    """One collective `get_balanced` call of all ranks of a data-parallel mesh."""

    dp_size: int
    consumers: dict[int, str] = field(default_factory=dict)
    """dp rank -> consumer of the ranks that arrived."""
    results: dict[int, Grant] | None = None
    num_answered: int = 0

    @property
    def full(self) -> bool:
        """Every rank of the mesh arrived."""
        return len(self.consumers) == self.dp_size

    def answer_empty(self) -> None:
        self.results = {r: Grant.empty() for r in range(self.dp_size)}


class Rounds:
    """The open rounds of every stage and the next round of each (stage, dp rank)."""

    def __init__(self) -> None:
        self.open: dict[tuple[str, int], Round] = {}
        self.next_seq: dict[tuple[str, int], int] = {}

    def join(self, stage: str, dp_rank: int, dp_size: int, consumer: str) -> tuple[int, Round]:
        """The round this call of `dp_rank` belongs to, and its number."""
        seq = self.next_seq.get((stage, dp_rank), 0)
        rnd = self.open.get((stage, seq))
        if rnd is not None and rnd.dp_size != dp_size:  # refused: this rank stays at `seq`
            raise ValueError(f"dp_size={dp_size} but other ranks of this round use {rnd.dp_size}")
        if rnd is None:
            rnd = self.open[(stage, seq)] = Round(dp_size)
        self.next_seq[(stage, dp_rank)] = seq + 1
        rnd.consumers[dp_rank] = consumer
        return seq, rnd

    def leave(self, stage: str, seq: int, rnd: Round) -> None:
        """A rank got its answer; the round is forgotten once every rank got its own."""
        rnd.num_answered += 1
        # after a `reset` the key may already name a newer round: not ours
        if rnd.num_answered == rnd.dp_size and self.open.get((stage, seq)) is rnd:
            del self.open[(stage, seq)]

    def reset(self) -> None:
        """Answer every waiting round empty and start counting rounds from zero again."""
        for rnd in self.open.values():
            if rnd.results is None:
                rnd.answer_empty()
        self.open = {}
        self.next_seq = {}
