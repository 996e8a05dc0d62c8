"""Weight synchronisation from the train mesh to the rollout engines.

```
 train ranks (all)            train rank 0 (src)                  rollout ranks
 FSDP full_tensor() -------> bucket (same dtype, <= bucket_bytes) --broadcast--> staging
 every rank iterates          header [version, numel, count]        engine.load_weights(bucket)
 (all-gather collectives)                                          engine.commit_weights(version)
```

Both ends derive the same tensor list (HF names, shapes, dtypes, in state-dict order) from the
model config, so only a small header and raw bucket bytes travel; the header lets a receiver
refuse a mismatched model with a clear error instead of silently mis-assigning bytes.
Strategies: `broadcast` (torch.distributed on the sync group: NCCL with GPU buffers when the
train mesh and the engines are both on CUDA, gloo with CPU buffers otherwise; see
`launch.placement.sync_backend`) and `disk` (one safetensors file per version, any engine can read
it).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from asyncflow.log import get_logger

logger = get_logger(__name__)


@dataclass
class WeightSyncConfig:
    """How new weights reach the rollout engines (the `weight_sync` section)."""

    kind: str = "broadcast"
    """`broadcast` (torch.distributed) or `disk` (safetensors files in the run directory)."""
    bucket_mb: float = 256.0
    """Largest bucket broadcast at once, in MiB."""
    background: bool = True
    """Delayed parameter update: send from a background thread while training goes on (the
    train rank keeps one gathered copy of the weights for it)."""

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"weight_sync.kind={self.kind!r}; use one of {sorted(_KINDS)}")
        if self.bucket_mb <= 0:
            raise ValueError(f"weight_sync.bucket_mb={self.bucket_mb} must be > 0")


Spec = tuple[str, torch.Size, torch.dtype]


def weight_specs(model: torch.nn.Module) -> list[Spec]:
    """(name, shape, dtype) of every tensor a sync carries, in order (a tied lm_head excluded)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    return [(n, t.shape, t.dtype) for n, t in model.state_dict().items()
            if not (tied and n == "lm_head.weight")]


def _buckets(specs: list[Spec], bucket_bytes: int) -> list[list[Spec]]:
    out: list[list[Spec]] = []
    size = 0
    for spec in specs:
        nbytes = spec[1].numel() * spec[2].itemsize
        if not out or out[-1][0][2] != spec[2] or size + nbytes > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(spec)
        size += nbytes
    return out


class BroadcastSync:
    """Bucketed broadcast from train rank 0 to the rollout ranks on the sync group."""

    def __init__(self, cfg: WeightSyncConfig, specs: list[Spec], group, src: int,
                 device: torch.device):
        self.specs, self.group, self.src, self.device = specs, group, src, device
        self.plan = _buckets(specs, int(cfg.bucket_mb * 2**20))
        self.total_numel = sum(s[1].numel() for s in specs)

    def _header(self, version: int) -> torch.Tensor:
        return torch.tensor([version, self.total_numel, len(self.specs)], dtype=torch.int64,
                            device=self.device)

    def send(self, named: Iterable[tuple[str, torch.Tensor]], version: int,
             local_engine=None) -> dict[str, float]:
        """Train side. Every train rank calls it (the iterator runs collectives); rank src sends.
        `local_engine` (colocated) receives straight from the full tensors."""
        t0 = time.perf_counter()
        sending = dist.get_rank() == self.src
        if sending:
            dist.broadcast(self._header(version), self.src, group=self.group)
        it = iter(named)
        nbytes = 0
        for bucket in self.plan:
            tensors = []
            for name, _shape, dtype in bucket:
                got_name, t = next(it)
                assert got_name == name, (got_name, name)
                tensors.append(t.detach().to(self.device, dtype))
            if not sending:
                continue
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.broadcast(flat, self.src, group=self.group)
            nbytes += flat.numel() * flat.element_size()
            if local_engine is not None:
                local_engine.load_weights(zip([s[0] for s in bucket], tensors, strict=True))
        if local_engine is not None:
            local_engine.commit_weights(version)
        return {"weights/send_s": time.perf_counter() - t0, "weights/bytes": float(nbytes)}

    def receive(self, engine, commit_lock: threading.Lock | None = None) -> int:
        """Rollout side: block for the next version, stage every bucket, commit (holding
        `commit_lock`, which an evaluation holds to pin its weights). Returns the version."""
        header = self._header(-1)
        dist.broadcast(header, self.src, group=self.group)
        version, numel, count = header.tolist()
        if (numel, count) != (self.total_numel, len(self.specs)):
            raise RuntimeError(
                f"weight sync: sender has {count} tensors / {numel} elements, this engine's model "
                f"{len(self.specs)} / {self.total_numel}: rollout and train models differ")
        for bucket in self.plan:
            flat = torch.empty(sum(s[1].numel() for s in bucket), dtype=bucket[0][2],
                               device=self.device)
            dist.broadcast(flat, self.src, group=self.group)
            views = flat.split([s[1].numel() for s in bucket])
            engine.load_weights((s[0], v.view(s[1])) for s, v in zip(bucket, views, strict=True))
        with commit_lock or contextlib.nullcontext():
            engine.commit_weights(version)
        return version


class DiskSync:
    """Train rank 0 writes `weights/v<version>.safetensors` then broadcasts the version number."""

    def __init__(self, cfg: WeightSyncConfig, specs: list[Spec], group, src: int,
                 device: torch.device, directory: Path):
        self.group, self.src, self.device, self.dir = group, src, device, Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, version: int) -> Path:
        return self.dir / f"v{version}.safetensors"

    def send(self, named, version, local_engine=None) -> dict[str, float]:
        t0 = time.perf_counter()
        state = {n: t.detach().cpu().contiguous() for n, t in named}
        if dist.get_rank() != self.src:
            return {"weights/send_s": time.perf_counter() - t0, "weights/bytes": 0.0}
        tmp = self._path(version).with_suffix(".tmp")
        save_file(state, tmp)
        tmp.rename(self._path(version))  # atomic: a reader never sees half a file
        self._path(version - 2).unlink(missing_ok=True)  # a reader may still open version - 1
        dist.broadcast(torch.tensor([version], device=self.device), self.src, group=self.group)
        if local_engine is not None:
            local_engine.load_weights(state.items())
            local_engine.commit_weights(version)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        return {"weights/send_s": time.perf_counter() - t0, "weights/bytes": float(nbytes)}

    def receive(self, engine, commit_lock: threading.Lock | None = None) -> int:
        v = torch.tensor([-1], device=self.device)
        dist.broadcast(v, self.src, group=self.group)
        version = int(v.item())
        engine.load_weights(load_file(self._path(version)).items())
        with commit_lock or contextlib.nullcontext():
            engine.commit_weights(version)
        return version


class LocalSync:
    """Colocated ranks (or train ranks that send nothing): every rank iterates the full weights
    (FSDP all-gathers) and loads them straight into its own engine, if it has one."""

    def send(self, named, version, local_engine=None) -> dict[str, float]:
        t0 = time.perf_counter()
        if local_engine is None:
            for _ in named:
                pass
        else:
            local_engine.load_weights(named)
            local_engine.commit_weights(version)
        return {"weights/send_s": time.perf_counter() - t0, "weights/bytes": 0.0}


class BackgroundSender:
    """Delayed parameter update: the train rank hands a gathered copy of the weights to a thread
    that broadcasts it while training goes on. At most one send is in flight: `submit` first waits
    for the previous one. `done(version, metrics)` is called on the sending thread."""

    def __init__(self, sync, done):
        self.sync, self.done = sync, done
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, named: list[tuple[str, torch.Tensor]], version: int) -> float:
        """Start sending; returns the seconds spent waiting for the previous send."""
        t0 = time.perf_counter()
        self.wait()

        def body():
            try:
                self.done(version, self.sync.send(named, version))
            except BaseException as e:  # re-raised on the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=body, name=f"weights-send-v{version}", daemon=True)
        self._thread.start()
        return time.perf_counter() - t0

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise RuntimeError("background weight send failed") from self._error


_KINDS = {"broadcast": BroadcastSync, "disk": DiskSync}


def build_weight_sync(cfg: WeightSyncConfig, specs: list[Spec], group, src: int,
                      device: torch.device, run_dir: Path | None = None):
    if cfg.kind == "disk":
        if run_dir is None:
            raise ValueError("weight_sync.kind='disk' needs a run directory")
        return DiskSync(cfg, specs, group, src, device, run_dir / "weights")
    return _KINDS[cfg.kind](cfg, specs, group, src, device)


def iter_state(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors a sync carries from a plain (unsharded) model."""
    names = {s[0] for s in weight_specs(model)}
    return ((n, t) for n, t in model.state_dict().items() if n in names)
