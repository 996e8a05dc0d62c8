"""Double-buffered weights: load new tensors beside the live ones, then swap pointers.

`load` copies named tensors (HF names, any dtype, in buckets) into a staging copy of every
parameter while the live parameters keep serving forwards. `swap` exchanges the two sets by
pointer (no copy), so the previous weights become the next staging area; with `in_place=True` it
copies the staged tensors into the live ones instead (one device-side copy of the weights), for
callers whose CUDA graphs hold the live parameters' addresses. Memory: one extra copy of the
parameters, allocated at the first load.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class StagedWeights:
    """Staging buffers for the parameters of one module (tied parameters are staged once)."""

    def __init__(self, model: nn.Module, in_place: bool = False):
        self._in_place = in_place
        self._params: dict[str, nn.Parameter] = dict(
            model.named_parameters(remove_duplicate=False))
        self._staged: dict[int, torch.Tensor] = {}  # id(param) -> buffer
        self._loaded: set[int] = set()

    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy each (name, tensor) into staging; ValueError on an unknown name or shape."""
        for name, tensor in named_tensors:
            p = self._params.get(name)
            if p is None:
                raise ValueError(f"weight {name!r} is not a parameter of the model; expected HF "
                                 f"names such as {next(iter(self._params))!r}")
            if tuple(tensor.shape) != tuple(p.shape):
                raise ValueError(f"weight {name!r} has shape {list(tensor.shape)}, the model's "
                                 f"is {list(p.shape)}")
            buf = self._staged.get(id(p))
            if buf is None:
                buf = self._staged[id(p)] = torch.empty_like(p.data)
            with torch.no_grad():
                buf.copy_(tensor, non_blocking=True)
            self._loaded.add(id(p))

    def check_complete(self) -> None:
        """ValueError naming parameters not loaded since the last swap."""
        missing = [n for n, p in self._params.items() if id(p) not in self._loaded]
        if missing:
            raise ValueError(f"commit before every weight was loaded: missing {missing[:4]}"
                             f"{'...' if len(missing) > 4 else ''} ({len(missing)} tensors)")

    def swap(self) -> None:
        """Make the staged tensors live (caller guarantees no forward is running)."""
        self.check_complete()
        if any(p.is_cuda for p in self._params.values()):
            torch.cuda.synchronize()  # staged copies may still be in flight
        for p in {id(p): p for p in self._params.values()}.values():
            if self._in_place:
                with torch.no_grad():
                    p.data.copy_(self._staged[id(p)])
                continue
            live = p.data
            p.data = self._staged[id(p)]
            self._staged[id(p)] = live
        self._loaded.clear()
