"""The run context: everything a rank sets up before its stages exist, built in one place.

`open_run` does, in this order on every rank: torch.distributed and every process group, the run
directory and the resume choice (rank 0 decides, the others follow), the model, tokenizer and
task (checked before anything is served). `RunContext.start_queue` then derives the queue from
the stage graph, serves it on rank 0, connects every rank and restores a resumed queue.
`RunContext.close` is the success path's ordered teardown; `guard` is the error path's, which
makes no collective call (a peer may be gone).
"""

from __future__ import annotations

import dataclasses
import fcntl
import secrets
import shutil
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from asyncflow.checkpoint import (
    check_fresh_run_dir,
    load_queue,
    next_prompt_step,
    resolve_resume,
    step_of,
    truncate_jsonl,
)
from asyncflow.config import Config, default_run_name, starts_fresh, to_yaml
from asyncflow.launch import Meshes, build_meshes, init_distributed
from asyncflow.log import get_logger, setup_logging
from asyncflow.metrics.trace import Tracer, merge_traces
from asyncflow.models import ModelConfig, Tokenizer
from asyncflow.pipeline.control import StopControl, StopRequested, timeout_hint
from asyncflow.pipeline.stage import StageDecl, queue_layout
from asyncflow.pipeline.stages import StepShape
from asyncflow.queue import QueueClient, QueueConfig, connect, serve
from asyncflow.queue.server import ControllerServer
from asyncflow.tasks import AdditionConfig, ChecksTokenizer, Task, build_task, encode_problem
from asyncflow.tasks.tiny import default_cache_dir, prepare_tiny_model

logger = get_logger(__name__)


@dataclass
class Resume:
    """Where a resumed run continues: its checkpoint, first step, and first step of prompts
    (the restored queue may hold prompts of later steps)."""

    path: Path
    step: int
    prompt_step: int


@dataclass
class RunContext:
    cfg: Config
    meshes: Meshes
    run_dir: Path
    name: str
    resume: Resume | None
    model_dir: Path
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    task: Task
    shape: StepShape
    stop: StopControl
    tracer: Tracer
    client: QueueClient | None = None
    server: ControllerServer | None = None
    report: Callable[..., None] | None = None
    """`report(stage, step, metrics)`: set by the schedule, for work a stage finishes in the
    background (see `StageDecl.reports`)."""
    _shared: dict[str, Any] = field(default_factory=dict)
    _closers: list[Callable[[], None]] = field(default_factory=list)
    _abort_hooks: list[Callable[[], None]] = field(default_factory=list)
    _aborted: bool = False
    owns_process_group: bool = True
    """False when the caller initialised torch.distributed (it then also destroys it)."""
    _abort_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def rank(self) -> int:
        return self.meshes.rank

    @property
    def start(self) -> int:
        """First step this run executes."""
        return self.resume.step if self.resume is not None else 0

    @property
    def max_prompt_len(self) -> int:
        return self.model_cfg.max_position_embeddings - self.cfg.rollout.max_new_tokens

    def shared(self, key: str, make: Callable[[], Any]) -> Any:
        """One object per rank for every stage that asks (e.g. the rollout engine, which the
        rollout, eval and weight stages share)."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run at `close` (success path), last registered first."""
        self._closers.append(fn)

    def on_abort(self, fn: Callable[[], None]) -> None:
        """Run at `abort` (error path): wake a wait that the queue's abort does not reach."""
        self._abort_hooks.append(fn)

    def start_queue(self, graph: list[StageDecl]) -> None:
        """Serve the queue the graph needs (rank 0), connect this rank, restore a resumed one."""
        secret = broadcast_str(secrets.token_hex(16) if self.rank == 0 else "")
        port = torch.tensor([0])
        if self.rank == 0:
            self.server = serve(self._queue_config(graph, self.cfg.queue.port, secret))
            port[0] = self.server.address[1]
        dist.broadcast(port, 0)
        # the host rank's own stages call its controller in-process
        self.client = connect(self._queue_config(graph, int(port.item()), secret), self.rank,
                              group=self.meshes.data_group,
                              controller=self.server.controller if self.server else None)
        if self.resume is not None:
            self._restore_queue()

    def _queue_config(self, graph: list[StageDecl], port: int, secret: str) -> QueueConfig:
        columns, stages = queue_layout(graph)
        p, q = self.cfg.pipeline, self.cfg.queue
        return QueueConfig(columns=columns, stages=stages, group_size=p.group_size,
                           capacity_rows=(p.max_staleness + 2) * p.rows_per_step,
                           rows_per_step=p.rows_per_step,
                           # one process: columns stay tensors in it, no shared-memory copies
                           transport="local" if self.meshes.world_size == 1 else q.transport,
                           host=q.host,
                           port=port, secret=secret, timeout_s=self.cfg.run.timeout_s)

    def _restore_queue(self) -> None:
        """The first train rank restores the snapshot into its own storage; prompts continue
        after the last step it holds."""
        first_train = self.meshes.train_ranks[0]
        prompt_step = torch.tensor([self.start])
        if self.rank == first_train:
            snapshot = load_queue(self.resume.path)
            self.client.restore(snapshot)
            prompt_step[0] = next_prompt_step(snapshot, self.start)
            logger.info("queue restored: %d rows of steps %s", len(snapshot["meta"]["rows"]),
                        sorted({r[1] for r in snapshot["meta"]["rows"]}))
        dist.broadcast(prompt_step, first_train)
        self.resume.prompt_step = int(prompt_step.item())

    @contextmanager
    def guard(self):
        """The error path: log once, drop this rank's queue links (its leases return to the
        queue) and unlink its shared-memory slabs, with no collective call."""
        try:
            yield
        except BaseException as e:
            if isinstance(e, ValueError | TypeError):  # user and data mistakes: one line
                logger.error("this rank failed: %s", e)
            elif not isinstance(e, StopRequested | KeyboardInterrupt):
                logger.exception("this rank failed; dropping its queue links")
                if hint := timeout_hint(e):
                    logger.error(hint)
            self.abort()
            raise

    def abort(self) -> None:
        """Once; a second caller waits for the first to finish it."""
        with self._abort_lock:
            if self._aborted:
                return
            self._aborted = True
            if self.client is not None:
                self.client.abort()
            if self.server is not None:
                self.server.close()
            for fn in self._abort_hooks:
                fn()

    @property
    def aborted(self) -> bool:
        return self._aborted

    def close(self) -> None:
        """The success path, after the stages closed and the recorder finished."""
        self.tracer.write(self.run_dir / "trace")
        dist.barrier()
        if self.rank == 0:
            m = self.meshes
            roles = {r: ("rollout+train" if m.colocated else
                         "rollout" if r in m.rollout_ranks else "train")
                     for r in range(m.world_size)}
            merge_traces(self.run_dir / "trace", self.run_dir / "trace.json", roles)
        self.client.close()
        if self.server is not None:
            self.server.close()
        for fn in reversed(self._closers):
            fn()
        if self.owns_process_group:
            dist.destroy_process_group()


def open_run(cfg: Config) -> RunContext:
    """Distributed set-up, run directory, model and task on this rank (see the module doc)."""
    torch.manual_seed(cfg.run.seed)
    stop = StopControl(cfg.run.timeout_s)  # signals caught from the start
    owns = not dist.is_initialized()
    _, _, device = init_distributed(cfg.run.timeout_s, cfg.trainer.device)
    meshes = build_meshes(cfg.placement, cfg.run.timeout_s, device,
                          reference=cfg.algorithm.kl_coef > 0,
                          data_plane=cfg.queue.transport == "dist",
                          engine_device=cfg.engine.device)
    name = broadcast_str(cfg.run.name or default_run_name())
    run_dir = Path(cfg.run.root) / name
    resume = _open_run_dir(cfg, run_dir, meshes.rank)
    if meshes.rank == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        dropped = truncate_jsonl(run_dir / "metrics.jsonl", resume.step if resume else 0)
        logger.info("run directory %s; %s", run_dir,
                    f"resuming from {resume.path} (step {resume.step}; {dropped} metric lines "
                    "of later steps dropped)" if resume else "starting at step 0")
    model_dir = resolve_model_dir(cfg)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    model_cfg = ModelConfig.from_file(model_dir)
    tokenizer.check_fits(model_cfg.vocab_size)
    task = build_task(cfg.task)
    p = cfg.pipeline
    shape = StepShape(p.prompts_per_step, p.group_size, p.num_steps, p.max_staleness,
                      cfg.run.timeout_s, chunk_rows=cfg.trainer.micro_batch_size)
    if isinstance(task, ChecksTokenizer):  # e.g. a user's data file: fail here, naming the line
        task.check_tokenizer(tokenizer, model_cfg.max_position_embeddings
                             - cfg.rollout.max_new_tokens)
    encode_problem(tokenizer, task.train_problem(0))  # e.g. a chat template the model lacks
    return RunContext(cfg, meshes, run_dir, name, resume, model_dir, model_cfg, tokenizer,
                      task, shape, stop, Tracer(meshes.rank), owns_process_group=owns)


def broadcast_str(value: str, src: int = 0) -> str:
    buf = torch.zeros(4096, dtype=torch.uint8)
    data = value.encode()[:4096]
    if dist.get_rank() == src:
        buf[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buf, src)
    return bytes(buf.tolist()).rstrip(b"\0").decode()


def _open_run_dir(cfg: Config, run_dir: Path, rank: int) -> Resume | None:
    """Set up the run directory and this rank's log file; returns where this run resumes (None:
    fresh). Rank 0 decides (replacing the directory for resume=false with run.overwrite), then
    broadcasts its verdict, or its error so every rank fails alike."""
    def log_to_file():
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        setup_logging(cfg.run.log_level, file=str(run_dir / "logs" / f"rank{rank}.log"))

    verdict = ""
    if rank == 0:
        try:
            fresh = starts_fresh(cfg)
            if fresh:
                check_fresh_run_dir(run_dir, cfg.run.overwrite)
                if run_dir.exists():
                    shutil.rmtree(run_dir)
            log_to_file()  # before looking for checkpoints: skipped ones are warned about
            path = None if fresh else resolve_resume(cfg.resume, run_dir)
            if path is not None and step_of(path) >= cfg.pipeline.num_steps:
                # resuming would run no step: the rollout side would wait for weights forever
                raise ValueError(
                    f"run {run_dir} is already finished: checkpoint {path.name} is at step "
                    f"{step_of(path)} >= pipeline.num_steps={cfg.pipeline.num_steps}; raise "
                    "pipeline.num_steps to train it on, or start over with a new run.name (or "
                    "resume=false run.overwrite=true)")
            verdict = "" if path is None else "path:" + str(path)
        except ValueError as e:
            verdict = "error:" + str(e)
    verdict = broadcast_str(verdict)
    if verdict.startswith("error:"):
        raise ValueError(verdict.removeprefix("error:"))
    if rank != 0:
        log_to_file()
    if not verdict:
        return None
    path = Path(verdict.removeprefix("path:"))
    return Resume(path, step_of(path), step_of(path))


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_model_dir(cfg: Config) -> Path:
    """The policy's HF directory: configured, a packaged pretrained model converted once per
    cache, or the tiny default prepared once per cache."""
    if cfg.model.path is not None:
        path = Path(cfg.model.path)
        if not (path / "config.json").is_file():
            raise ValueError(f"model.path={cfg.model.path!r}: no config.json there")
        return path
    cache = default_cache_dir()
    if cfg.model.pretrained is not None:
        from asyncflow.models.packaged import prepare_packaged_model

        with _file_lock(cache / ".prepare.lock"):  # one rank converts, the others reuse it
            return prepare_packaged_model(cfg.model.pretrained, cache)
    tiny = cfg.model.tiny
    if isinstance(cfg.task, AdditionConfig):  # warm-start on the task the run trains on
        tiny = dataclasses.replace(tiny, task=cfg.task)
    with _file_lock(cache / ".prepare.lock"):  # one rank trains, the others then hit the cache
        return prepare_tiny_model(tiny, cache)
