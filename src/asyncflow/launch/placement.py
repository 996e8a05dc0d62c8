"""Placement: which ranks form the rollout mesh and the train mesh, and their process groups.

Every `new_group` is created by every rank in the same order (a torch.distributed rule; breaking
it hangs), each with the configured timeout so a dead peer surfaces as an error, not a hang.
`colocated` puts every rank in both meshes (time-sliced): the baseline users compare against.

Backends: the weight-sync group (train rank 0 + the rollout ranks) uses NCCL when the train mesh
and the rollout engines are both on CUDA, so weights go GPU to GPU, and gloo with CPU tensors
otherwise. The queue's data plane and the metrics group are gloo over CPU tensors whatever the
devices: RL rows are small. Only train rank 0 belongs both to the sync group and to the train
mesh's NCCL group, so the two communicators (the sync runs on a background thread) share no pair
of ranks that could order their collectives differently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from asyncflow.log import get_logger

logger = get_logger(__name__)


@dataclass
class PlacementConfig:
    """Which torchrun ranks run rollout and which train (the `placement=` config group)."""

    kind: str = "split"
    """`split` (disjoint rollout and train ranks) or `colocated` (every rank does both)."""
    rollout_ranks: list[int] = field(default_factory=lambda: [0])
    """Ranks of the rollout mesh (split only)."""
    train_ranks: list[int] = field(default_factory=lambda: [1])
    """Ranks of the train mesh (split only)."""
    pin_cpus: bool = True
    """On a CPU-only run, give each rank of this node its own share of the CPUs the job may use
    (`pin_local_rank_cpus`). Turn off when several jobs share one machine without `taskset`."""

    def __post_init__(self):
        if self.kind not in ("split", "colocated"):
            raise ValueError(f"placement.kind={self.kind!r}; use 'split' or 'colocated'")

    def resolve(self, world_size: int) -> tuple[list[int], list[int]]:
        """(rollout ranks, train ranks) for this world size; ValueError if they do not fit."""
        if self.kind == "colocated":
            return list(range(world_size)), list(range(world_size))
        rollout, train = sorted(self.rollout_ranks), sorted(self.train_ranks)
        if not rollout or not train:
            raise ValueError("placement: rollout_ranks and train_ranks must both be non-empty")
        if set(rollout) & set(train):
            raise ValueError(f"placement: ranks {sorted(set(rollout) & set(train))} are in both "
                             "rollout_ranks and train_ranks; use placement=colocated to share")
        if sorted(rollout + train) != list(range(world_size)):
            raise ValueError(
                f"placement: rollout_ranks={rollout} + train_ranks={train} must cover ranks "
                f"0..{world_size - 1} exactly (torchrun world size {world_size}); change "
                f"--nproc_per_node or the placement")
        return rollout, train


@dataclass
class Meshes:
    """This rank's view of the placement. Groups are None on ranks outside them."""

    rank: int
    world_size: int
    rollout_ranks: list[int]
    train_ranks: list[int]
    device: torch.device
    train_mesh: DeviceMesh | None
    """FSDP mesh over the train ranks."""
    rollout_group: dist.ProcessGroup | None
    """The rollout ranks (data-parallel generation)."""
    sync_group: dist.ProcessGroup | None
    """Train rank 0 plus every rollout rank: the weight broadcast."""
    metrics_group: dist.ProcessGroup | None = None
    """Every rank, gloo: per-step metrics to rank 0."""
    reference_group: dist.ProcessGroup | None = None
    """The train ranks again, for the reference stage's collectives (only with KL): its thread
    runs beside the train stage's, and two threads must not share a group."""
    data_group: dist.ProcessGroup | None = None
    """Every rank, gloo: the queue's data plane with transport='dist'."""
    sync_device: torch.device = torch.device("cpu")
    """Where weight-sync buffers live: this rank's GPU with an NCCL sync group, else the CPU."""

    @property
    def is_rollout(self) -> bool:
        return self.rank in self.rollout_ranks

    @property
    def is_train(self) -> bool:
        return self.rank in self.train_ranks

    @property
    def colocated(self) -> bool:
        return self.rollout_ranks == self.train_ranks

    @property
    def sync_src(self) -> int:
        """Global rank that sends weights: train rank 0."""
        return self.train_ranks[0]


_JOB_CPUS: list[int] | None = None
"""The CPUs this process could use before its first pin: what every pin shares out, and what
`unpin_cpus` gives back (a process may run the pipeline more than once)."""


def pin_local_rank_cpus() -> list[int] | None:
    """Restrict this process (and the threads and processes it starts later) to its node-local
    rank's contiguous share of the CPUs it may use now; returns them, or None where there is no
    share to give (one local rank, fewer CPUs than ranks, no torchrun environment, no
    `sched_setaffinity`). Unpinned, the rollout rank's helper threads (reward, advantage,
    prompts, queue server, ~2,000 wake-ups a second) kept landing on the train rank's core: its
    main thread was preempted ~440 times a second. Pinned, the default split run's step took
    0.69-0.93 of the unpinned time (2-core Xeon VM, 6 alternating pairs of 300-step runs)."""
    try:
        local, n_local = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    if not hasattr(os, "sched_setaffinity"):
        return None
    global _JOB_CPUS
    if _JOB_CPUS is None:
        _JOB_CPUS = sorted(os.sched_getaffinity(0))
    cpus = _JOB_CPUS
    if n_local < 2 or len(cpus) < n_local:
        return None
    mine = cpus[local * len(cpus) // n_local:(local + 1) * len(cpus) // n_local]
    os.sched_setaffinity(0, mine)
    return mine


def unpin_cpus() -> None:
    """Give this thread back the CPUs it had before `pin_local_rank_cpus`."""
    if _JOB_CPUS is not None:
        os.sched_setaffinity(0, _JOB_CPUS)


def train_device_type(setting: str) -> str:
    """"cuda" or "cpu" for `trainer.device` (auto: cuda when CUDA is available)."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device=cuda: no CUDA device here (torch {torch.__version__}); "
                         "use trainer.device=cpu or auto")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def init_distributed(timeout_s: float, train_device: str = "auto"
                     ) -> tuple[int, int, torch.device]:
    """init_process_group from torchrun's environment: NCCL for CUDA tensors and gloo for CPU
    ones when this rank trains on its GPU (`trainer.device`), gloo alone otherwise. Returns
    (rank, world size, this rank's train device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():  # "cuda" then means this rank's GPU, for an engine too
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if train_device_type(train_device) == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        backend = "cuda:nccl,cpu:gloo"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # plain `python -m` run: a world of one
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
        timeout = timedelta(seconds=timeout_s)
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        # torchrun --max-restarts keeps its store across restarts: without a per-attempt prefix
        # a restarted rank can read a dead rank's gloo address and fail to connect
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"attempt{attempt}/", store),
                                rank=rank, world_size=world, timeout=timeout)
    return rank, world, device


def sync_backend(train_device: torch.device, engine_device: str) -> str:
    """Backend of the weight-sync group: "nccl" when the trainer (`train_device`) and the rollout
    engines (`engine.device`) are both on CUDA, else "gloo" (weights travel as CPU tensors)."""
    both_cuda = train_device.type == "cuda" and torch.device(engine_device).type == "cuda"
    return "nccl" if both_cuda else "gloo"


def build_meshes(cfg: PlacementConfig, timeout_s: float, device: torch.device,
                 reference: bool = False, data_plane: bool = False,
                 engine_device: str = "cpu") -> Meshes:
    """Every process group of a run, made here and only here: same groups, same order, on every
    rank. `device`: this rank's train device; `engine_device`: the rollout engines' (together
    they pick the sync group's backend); `reference`: a group for the reference stage;
    `data_plane`: one for the queue."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rollout, train = cfg.resolve(world)
    timeout = timedelta(seconds=timeout_s)
    train_group = dist.new_group(train, timeout=timeout)
    rollout_group = dist.new_group(rollout, timeout=timeout)
    sync_ranks = sorted({train[0], *rollout})
    backend = sync_backend(device, engine_device)
    sync_group = dist.new_group(sync_ranks, timeout=timeout, backend=backend)
    everyone = list(range(world))
    metrics_group = dist.new_group(everyone, timeout=timeout, backend="gloo")
    reference_group = dist.new_group(train, timeout=timeout) if reference else None
    data_group = dist.new_group(everyone, timeout=timeout, backend="gloo") if data_plane else None
    train_mesh = DeviceMesh.from_group(train_group, device.type) if rank in train else None
    meshes = Meshes(rank, world, rollout, train, device, train_mesh,
                    rollout_group if rank in rollout else None,
                    sync_group if rank in sync_ranks else None, metrics_group,
                    reference_group if rank in train else None, data_group,
                    device if backend == "nccl" else torch.device("cpu"))
    logger.info("placement %s: rollout ranks %s, train ranks %s; weight sync over %s",
                cfg.kind, rollout, train, backend)
    return meshes
