"""Build this rank's part of the pipeline from config, run it, and shut it down in order.

```
 rank 0:            queue controller, prompts thread, metrics writer (+ its mesh's stages)
 rollout ranks:     main: rollout (+ eval on the first)   threads: reward, weight receiver,
                                                                advantage (first rollout rank)
                    child processes: a reward worker for the reward thread (+ one for eval)
 train ranks:       main: train (+ weight send)            threads: reference (with KL)
 colocated:         every rank runs all of its stages one after another on the main thread
```

Shutdown order: main loops finish their last step -> stage threads joined -> reward workers
stopped -> recorder.finish()
(rank 0 waits for every rank's last metrics) -> barrier -> queue clients closed -> controller
closed -> process group destroyed. A stage thread that raises logs the traceback and exits the
process: torchrun then stops the other ranks, so a failure is never a silent hang.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import secrets
import shutil
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from asyncflow.checkpoint import (
    Checkpointer,
    check_fresh_run_dir,
    load_queue,
    next_prompt_step,
    resolve_resume,
    step_of,
    truncate_jsonl,
)
from asyncflow.config import Config, default_run_name, starts_fresh, to_yaml
from asyncflow.engines import SamplingParams, build_rollout_engine
from asyncflow.engines.fsdp_engine import FSDPTrainEngine
from asyncflow.launch import build_meshes, init_distributed
from asyncflow.log import get_logger, setup_logging
from asyncflow.metrics import build_sinks
from asyncflow.metrics.trace import Tracer, merge_traces
from asyncflow.models import ModelConfig, Tokenizer, save_weights
from asyncflow.pipeline.recorder import StepRecorder
from asyncflow.pipeline.reward_worker import RewardWorker
from asyncflow.pipeline.stages import (
    AdvantageStage,
    PromptStage,
    RewardStage,
    RolloutStage,
    StepShape,
    VersionGate,
    evaluate,
)
from asyncflow.pipeline.trainer import DataParallelDrain, ReferenceStage, TrainStage
from asyncflow.queue import ColumnSpec, QueueConfig, StageSpec, connect, serve
from asyncflow.tasks import AdditionConfig, ChecksTokenizer, build_task, encode_problem
from asyncflow.tasks.tiny import default_cache_dir, prepare_tiny_model
from asyncflow.weights import LocalSync, build_weight_sync, weight_specs

logger = get_logger(__name__)


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
    """The policy's HF directory: configured, or the tiny default prepared once per cache."""
    if cfg.model.path is not None:
        path = Path(cfg.model.path)
        if not (path / "config.json").is_file():
            raise ValueError(f"model.path={cfg.model.path!r}: no config.json there")
        return path
    tiny = cfg.model.tiny
    if isinstance(cfg.task, AdditionConfig):  # warm-start on the task the run trains on
        tiny = dataclasses.replace(tiny, task=cfg.task)
    cache = default_cache_dir()
    with _file_lock(cache / ".prepare.lock"):  # one rank trains, the others then hit the cache
        return prepare_tiny_model(tiny, cache)


def queue_config(cfg: Config, max_prompt_len: int, port: int, secret: str = "") -> QueueConfig:
    R = cfg.rollout.max_new_tokens
    use_kl = cfg.algorithm.kl_coef > 0
    columns = [
        ColumnSpec("prompt_ids", "int64", [max_prompt_len], ragged=True),
        ColumnSpec("uid", "int64", []),
        ColumnSpec("response_ids", "int64", [R], ragged=True),
        ColumnSpec("behaviour_logprobs", "float32", [R], ragged=True),
        ColumnSpec("finished", "int64", []),
        ColumnSpec("reward", "float32", []),
        ColumnSpec("advantage", "float32", []),
    ]
    train_needs = ["prompt_ids", "uid", "response_ids", "behaviour_logprobs", "advantage"]
    stages = [StageSpec("rollout", ["prompt_ids"]),
              StageSpec("reward", ["response_ids", "finished", "uid"]),
              StageSpec("advantage", ["reward"])]
    if use_kl:
        columns.append(ColumnSpec("ref_logprobs", "float32", [R], ragged=True))
        stages.append(StageSpec("reference", ["prompt_ids", "response_ids"]))
        train_needs.append("ref_logprobs")
    stages.append(StageSpec("train", train_needs))
    p = cfg.pipeline
    return QueueConfig(columns=columns, stages=stages, group_size=p.group_size,
                       capacity_rows=(p.max_staleness + 2) * p.rows_per_step,
                       rows_per_step=p.rows_per_step, transport=cfg.queue.transport,
                       host=cfg.queue.host, port=port, secret=secret,
                       timeout_s=cfg.run.timeout_s)


def _broadcast_str(value: str, src: int = 0) -> str:
    buf = torch.zeros(4096, dtype=torch.uint8)
    data = value.encode()[:4096]
    if dist.get_rank() == src:
        buf[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buf, src)
    return bytes(buf.tolist()).rstrip(b"\0").decode()


@contextmanager
def _abort_queue_on_error(client, server):
    """No collectives on the error path (a peer may be gone): drop this rank's queue links, so
    its leases return to the queue, and unlink its shared-memory slabs (the controller's host:
    every slab of the session). Yields the abort function for stage threads' error path."""
    lock = threading.Lock()

    def abort():  # once; a second failing thread waits for the first to finish it
        with lock:
            if not abort.done:
                abort.done = True
                client.abort()
                if server is not None:
                    server.close()

    abort.done = False

    try:
        yield abort
    except BaseException as e:
        # logged before the abort: the stage threads it stops exit the process at once, which
        # would otherwise often win the race against reporting the error (user and data
        # mistakes are one line, as train.py prints them; anything else with its traceback)
        if isinstance(e, ValueError | TypeError):
            logger.error("this rank failed: %s", e)
        elif not isinstance(e, StopRequested | KeyboardInterrupt):
            logger.exception("this rank failed; dropping its queue links")
            if hint := timeout_hint(e):
                logger.error(hint)
        abort()
        raise


def _open_run_dir(cfg: Config, run_dir: Path, rank: int) -> Path | None:
    """Set up the run directory and this rank's log file; returns the checkpoint this run resumes
    from (None: fresh). Rank 0 decides (replacing the directory for resume=false with
    run.overwrite), then broadcasts its verdict, or its error so every rank fails alike."""
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
            verdict = "" if path is None else "path:" + str(path)
        except ValueError as e:
            verdict = "error:" + str(e)
    verdict = _broadcast_str(verdict)
    if verdict.startswith("error:"):
        raise ValueError(verdict.removeprefix("error:"))
    if rank != 0:
        log_to_file()
    return Path(verdict.removeprefix("path:")) if verdict else None


def export_hf(engine: FSDPTrainEngine, model_dir: Path, out: Path, leader: bool) -> None:
    """The policy in HF format (config.json, model.safetensors, tokenizer files), loadable by
    transformers; every train rank must call it (the full weights are gathered)."""
    named = dict(engine.full_weights())
    if leader:
        save_weights(named, engine.config, out)
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (model_dir / f).exists():
                shutil.copy(model_dir / f, out / f)


class StopRequested(Exception):
    """SIGTERM or SIGINT: the train mesh wrote a checkpoint at the step boundary; the run ends
    (exit code 143) and `resume=auto` continues it."""


def _catch_stop_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _exit_after_stop(stop: threading.Event, marker: Path, timeout_s: float, abort) -> None:
    """Ranks outside the train mesh: after a stop signal, wait (bounded) for the train mesh's
    checkpoint (this rank may host the queue it snapshots), then leave."""
    stop.wait()
    deadline = time.monotonic() + timeout_s
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if marker.exists():
        logger.info("stop requested: the train mesh checkpointed step %d; exiting",
                    json.loads(marker.read_text())["step"])
    else:
        logger.error("stop requested, but no checkpoint within run.timeout_s=%g s", timeout_s)
    abort()
    for h in logger.parent.handlers if logger.parent else []:
        h.flush()
    os._exit(143 if marker.exists() else 1)


def timeout_hint(e: BaseException | None) -> str | None:
    """For a torch.distributed wait that timed out (gloo says only "Timed out waiting Nms"):
    which of our waits it was, and what to change."""
    if e is None or "Timed out" not in str(e):
        return None
    torch_dir = str(Path(torch.__file__).parent)
    ours = [f for f in traceback.extract_tb(e.__traceback__)  # the caller of torch.distributed
            if not f.filename.startswith(torch_dir)]
    where = (f"{ours[-1].name} ({Path(ours[-1].filename).name}:{ours[-1].lineno})" if ours
             else "a collective")
    return (f"a torch.distributed wait in {where} timed out after run.timeout_s: a peer rank "
            "died, hung, or is still busy; if one step can take longer than that here, raise "
            "run.timeout_s (e.g. run.timeout_s=600)")


def _thread(name: str, fn, abort) -> threading.Thread:
    def body():
        try:
            fn()
        except BaseException:
            if abort.done:  # another thread failed first and closed the queue under this one
                logger.info("stage thread %r stopped by the queue's abort", name)
            else:
                logger.exception("stage thread %r failed; exiting this rank", name)
                if hint := timeout_hint(sys.exc_info()[1]):
                    logger.error(hint)
            try:
                abort()
            except OSError as e:  # best effort: the process exits either way
                logger.warning("queue abort failed: %s", e)
            for h in logger.parent.handlers if logger.parent else []:
                h.flush()
            os._exit(1)

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    return t


def run(cfg: Config) -> Path:
    """Run the whole pipeline on this rank; returns the run directory."""
    torch.manual_seed(cfg.run.seed)
    stop = _catch_stop_signals()
    rank, world, device = init_distributed(cfg.run.timeout_s)
    timeout = timedelta(seconds=cfg.run.timeout_s)
    meshes = build_meshes(cfg.placement, cfg.run.timeout_s, device)
    everyone = list(range(world))
    metrics_group = dist.new_group(everyone, timeout=timeout, backend="gloo")
    use_kl = cfg.algorithm.kl_coef > 0
    ref_group = dist.new_group(meshes.train_ranks, timeout=timeout) if use_kl else None
    data_group = (dist.new_group(everyone, timeout=timeout, backend="gloo")
                  if cfg.queue.transport == "dist" else None)

    name = _broadcast_str(cfg.run.name or default_run_name())
    run_dir = Path(cfg.run.root) / name
    resume_from = _open_run_dir(cfg, run_dir, rank)
    start = step_of(resume_from) if resume_from is not None else 0
    stop_marker = run_dir / "stopped.json"
    if rank == 0:
        stop_marker.unlink(missing_ok=True)
    dist.barrier()
    if rank == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        dropped = truncate_jsonl(run_dir / "metrics.jsonl", start)
        logger.info("run directory %s; %s", run_dir,
                    f"resuming from {resume_from} (step {start}; {dropped} metric lines of later "
                    "steps dropped)" if resume_from else "starting at step 0")

    model_dir = resolve_model_dir(cfg)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    model_cfg = ModelConfig.from_file(model_dir)
    tokenizer.check_fits(model_cfg.vocab_size)
    task = build_task(cfg.task)
    p = cfg.pipeline
    shape = StepShape(p.prompts_per_step, p.group_size, p.num_steps, p.max_staleness,
                      cfg.run.timeout_s, chunk_rows=cfg.trainer.micro_batch_size)
    max_prompt = model_cfg.max_position_embeddings - cfg.rollout.max_new_tokens
    if isinstance(task, ChecksTokenizer):  # e.g. a user's data file: fail here, naming the line
        task.check_tokenizer(tokenizer, max_prompt)
    encode_problem(tokenizer, task.train_problem(0))  # e.g. a chat template the model lacks

    server = None
    port = torch.tensor([0])
    # a per-run secret in every client's hello: other local processes can reach the port
    secret = _broadcast_str(secrets.token_hex(16) if rank == 0 else "")
    if rank == 0:
        server = serve(queue_config(cfg, max_prompt, cfg.queue.port, secret))
        port[0] = server.address[1]
    dist.broadcast(port, 0)
    qcfg = queue_config(cfg, max_prompt, int(port.item()), secret)
    # the host rank's own stages call its controller in-process: over its own socket they
    # cost two frame codecs and two GIL hand-offs per call on the rollout rank's CPU
    client = connect(qcfg, rank, group=data_group,
                     controller=server.controller if server is not None else None)
    with _abort_queue_on_error(client, server) as abort:
        # a resumed queue is restored by the first train rank into its own storage; prompts
        # continue after the last step it holds
        prompt_start = torch.tensor([start])
        if resume_from is not None:
            if rank == meshes.train_ranks[0]:
                snapshot = load_queue(resume_from)
                client.restore(snapshot)
                prompt_start[0] = next_prompt_step(snapshot, start)
                logger.info("queue restored: %d rows of steps %s", len(snapshot["meta"]["rows"]),
                            sorted({r[1] for r in snapshot["meta"]["rows"]}))
            dist.broadcast(prompt_start, meshes.train_ranks[0])

        stage_names = []
        if meshes.is_rollout:
            stage_names += ["rollout", "reward"] + ([] if meshes.colocated else ["weights"])
            stage_names += ["advantage"] if rank == meshes.rollout_ranks[0] else []
        if meshes.is_train:
            stage_names += ["train", "weight_send"] + (["reference"] if use_kl else [])
        sinks = (build_sinks(cfg.metrics, run_dir, name, p.num_steps, {"config": to_yaml(cfg)},
                             start) if rank == 0 else [])
        tracer = Tracer(rank)
        mesh_sizes = ({"colocated": world} if meshes.colocated else
                      {"rollout": len(meshes.rollout_ranks), "train": len(meshes.train_ranks)})
        recorder = StepRecorder(stage_names, metrics_group, sinks, tracer, mesh_sizes, start)

        seq: list = []  # colocated: stages in order; split: main loop stage
        threads: list[threading.Thread] = []
        engine = gate = None
        if rank == 0:
            prompts = PromptStage(client, task, tokenizer, shape)
            seq.append(prompts)
        if meshes.is_rollout:
            engine = build_rollout_engine(cfg.engine, model_dir, policy_version=0)
            gate = VersionGate(engine, p.max_staleness)
            sampling = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens,
                                      temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                      top_k=cfg.rollout.top_k)
            share = -(-p.prompts_per_step // len(meshes.rollout_ranks)) * p.group_size
            # a row's sampling seed depends on the row id only, not on which rollout rank drew
            # it, so a resumed run (or another timing) samples the same tokens for it
            seq.append(RolloutStage(client, engine, gate, sampling, shape, recorder,
                                    cfg.run.seed * 7919, share))
            reward = RewardStage(client, task, tokenizer, shape, recorder,
                                 cfg.task.reward_timeout_s, cfg.task.on_reward_failure)
            seq.append(reward)
            if rank == meshes.rollout_ranks[0]:
                # on the rollout side: the train rank is the usual bottleneck, and advantages need
                # only the rewards, which live here
                advantage = AdvantageStage(client, shape, recorder, cfg.algorithm.baseline,
                                           cfg.algorithm.normalize_std)
                if resume_from is not None:
                    advantage.resume()
                seq.append(advantage)
        if meshes.sync_group is not None and not meshes.colocated:
            sync = build_weight_sync(cfg.weight_sync, weight_specs(_meta_model(model_cfg)),
                                     meshes.sync_group, meshes.sync_src, device, run_dir)
        else:
            sync = LocalSync()
        if meshes.is_train:
            dp_rank = meshes.train_ranks.index(rank)
            dp_size = len(meshes.train_ranks)
            if use_kl:
                from torch.distributed.device_mesh import DeviceMesh

                ref = FSDPTrainEngine(str(model_dir), DeviceMesh.from_group(ref_group, device.type),
                                      None, cfg.trainer.precision, str(device))
                ref_drain = DataParallelDrain(client, "reference", ref_group, dp_rank,
                                              dp_size, shape, cfg.trainer.micro_batch_size,
                                              ["prompt_ids", "response_ids"], streaming=True)
                if resume_from is not None:
                    ref_drain.done_rows = client.taken("reference")
                seq.append(ReferenceStage(client, ref, ref_drain, cfg.rollout.temperature,
                                          recorder))
            policy = FSDPTrainEngine(str(model_dir), meshes.train_mesh, cfg.trainer.optim,
                                     cfg.trainer.precision, str(device), p.num_steps,
                                     cfg.trainer.activation_checkpointing)
            columns = ["prompt_ids", "uid", "response_ids", "behaviour_logprobs", "advantage"]
            columns += ["ref_logprobs"] if use_kl else []
            train_group = meshes.train_mesh.get_group()
            drain = DataParallelDrain(client, "train", train_group,
                                      dp_rank, dp_size, shape, cfg.trainer.micro_batch_size,
                                      columns, p.streaming)
            ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, train_group, dp_rank)
            if resume_from is not None:
                ckpt.load(resume_from, policy)
                drain.done_rows = client.taken("train")
            # per-prompt accounting: which problems each step trained, rolled back on resume
            accounting_path = run_dir / "accounting" / f"train_rank{dp_rank}.jsonl"
            accounting_path.parent.mkdir(exist_ok=True)
            truncate_jsonl(accounting_path, start)
            accounting = open(accounting_path, "a")

            def checkpoint(version: int) -> None:
                stopping = torch.tensor([float(stop.is_set())])
                dist.all_reduce(stopping, dist.ReduceOp.MAX, group=train_group)
                if stopping.item() or ckpt.due(version, p.num_steps):
                    ckpt.save(version, policy, client.snapshot, {"num_steps": p.num_steps},
                              export=(lambda out: export_hf(policy, model_dir, out, dp_rank == 0))
                              if cfg.checkpoint.export_hf else None)
                if stopping.item():
                    if dp_rank == 0:
                        stop_marker.write_text(json.dumps({"step": version}))
                    logger.info("stop requested: checkpoint step_%d written; exiting", version)
                    raise StopRequested(version)

            trainer = TrainStage(client, policy, drain, cfg.algorithm, cfg.rollout.temperature,
                                 recorder, sync, local_engine=engine if meshes.colocated else None,
                                 background=cfg.weight_sync.background, accounting=accounting,
                                 before_send=checkpoint)
            seq.append(trainer)

        eval_problems = task.heldout_problems()[:p.eval_size]
        commit_lock = threading.Lock()
        first_rollout = meshes.is_rollout and rank == meshes.rollout_ranks[0]
        # its own worker: evaluation runs on the main thread while the reward thread scores
        eval_scorer = RewardWorker(task, cfg.task.reward_timeout_s) if first_rollout else None

        def maybe_eval(step: int) -> None:
            if first_rollout and (step % p.eval_every == 0 or step == p.num_steps):
                # the weights rollout of this step may use (version >= step - eta), not older ones
                gate.wait_for(step - p.max_staleness, cfg.run.timeout_s)
                # no commit lands mid-evaluation: every held-out answer comes from one version
                with commit_lock, recorder.span(step, "eval", "eval"):
                    acc, failures = evaluate(engine, eval_scorer, tokenizer, eval_problems,
                                             cfg.rollout.max_new_tokens)
                recorder.set(step, "eval/accuracy", acc)
                recorder.set(step, "eval/reward_failures", failures)
                recorder.set(step, "eval/policy_version", engine.policy_version)

        def steps(stage) -> range:
            return range(int(prompt_start.item()) if stage.name == "prompts" else start,
                         p.num_steps)

        if meshes.colocated:
            if resume_from is not None:
                trainer.send_weights(start - 1)  # the restored weights into the local engine
            for step in range(start, p.num_steps):
                maybe_eval(step)
                for stage in seq:
                    if step in steps(stage):
                        stage.run_step(step)
        else:
            main = next(s for s in seq if s.name in ("rollout", "train") and
                        (s.name == "train") == meshes.is_train)
            for stage in seq:
                if stage is not main:
                    threads.append(_thread(stage.name, lambda s=stage: [
                        s.run_step(i) for i in steps(s)], abort))
            if meshes.is_rollout:
                def receive():
                    # a resumed run first gets the restored weights (version start)
                    while engine.policy_version < p.num_steps:
                        stall0 = engine.health().commit_stall_s
                        t0 = time.perf_counter()
                        with tracer.span("weight_recv", "weights"):
                            version = sync.receive(engine, commit_lock)
                        gate.notify()
                        recorder.record(version - 1, {
                            "weights/recv_s": time.perf_counter() - t0,
                            # generation stood still for the swap (and KV recompute): exposed sync
                            "weights/exposed_s": engine.health().commit_stall_s - stall0})
                        recorder.stage_done("weights", version - 1)
                threads.append(_thread("weights", receive, abort))
            if not meshes.is_train:
                threading.Thread(target=_exit_after_stop, name="stop", daemon=True,
                                 args=(stop, stop_marker, cfg.run.timeout_s, abort)).start()
            if meshes.is_train and resume_from is not None:
                trainer.send_weights(start - 1)
            for step in range(start, p.num_steps):
                if meshes.is_rollout:
                    maybe_eval(step)
                main.run_step(step)
        if first_rollout:
            gate.wait_for(p.num_steps, cfg.run.timeout_s)
            maybe_eval(p.num_steps)
        for t in threads:
            t.join()
        if meshes.is_train:
            trainer.close()
            accounting.close()
            export_hf(policy, model_dir, run_dir / "export", dp_rank == 0)
        if meshes.is_rollout:
            reward.close()
        if eval_scorer is not None:
            eval_scorer.close()
        recorder.finish()
        tracer.write(run_dir / "trace")
        dist.barrier()
        if rank == 0:
            roles = {r: ("rollout+train" if meshes.colocated else
                         "rollout" if r in meshes.rollout_ranks else "train") for r in everyone}
            merge_traces(run_dir / "trace", run_dir / "trace.json", roles)
        client.close()
        if server is not None:
            server.close()
        if engine is not None:
            engine.shutdown()
        dist.destroy_process_group()
        return run_dir


def _meta_model(model_cfg: ModelConfig):
    from asyncflow.models import build_model

    return build_model(model_cfg, device="meta")
