"""Checkpoints of the whole pipeline, and the choice of where a run resumes.

```
 runs/<name>/checkpoints/step_<k>/      k = optimizer steps done = policy version of the weights
   train/            torch.distributed.checkpoint: policy model + optimizer (sharded, any train size)
   queue.pt          the queue: row metadata and every stored column (rows generated, not trained)
   rng_train<i>.pt   torch RNG state of train rank i
   meta.json         step, LR schedule, non-finite streak, data cursor
   manifest.json     size and CRC32 of every file above; written last
```

The train mesh saves between two steps: after the optimizer step that made version k and before
those weights are sent. With max_staleness=0 the rollout ranks are then waiting for version k, so
the queue holds only prompts and a resumed run recomputes the same numbers bit for bit. The rollout
side saves nothing: its sampling is seeded per row id (restored with the queue) and its weights are
sent by the train mesh when the run resumes. A checkpoint is written to `.step_<k>.tmp` and renamed
once its manifest is on disk, so a half-written one is never picked up; `latest_complete` checks
sizes and CRCs and falls back to the previous checkpoint with a warning.
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from asyncflow.log import get_logger

logger = get_logger(__name__)

MANIFEST = "manifest.json"
REQUIRED = ("meta.json", "queue.pt", "train/.metadata", "rng_train0.pt")
"""Files every checkpoint has (with at least one `train/*.distcp` shard)."""


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every: int = 50
    """Optimizer steps between checkpoints (0: only at the end of the run)."""
    keep: int = 2
    """Complete checkpoints kept in the run directory; older ones are deleted."""
    export_hf: bool = False
    """Also write an HF-format policy (`hf/`: config, safetensors, tokenizer) into every
    checkpoint; the end of a run always exports one to `runs/<name>/export/`."""

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"checkpoint.every={self.every} must be >= 0 (0: only at the end)")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep={self.keep} must be >= 1")


class CheckpointCorrupt(ValueError):
    """A checkpoint directory whose files do not match its manifest."""


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> None:
    files = {str(p.relative_to(directory)): [p.stat().st_size, _crc32(p)]
             for p in _files(directory)}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.rename(directory / MANIFEST)


def verify(directory: Path) -> None:
    """Raise CheckpointCorrupt naming the first file that is missing, truncated or changed."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise CheckpointCorrupt(f"{directory}: no {MANIFEST} (incomplete checkpoint)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointCorrupt(f"{manifest}: unreadable ({e})") from None
    # A manifest vouches only for what it lists: it must list every file a resume reads (a
    # manifest listing nothing would otherwise pass and let corrupted shards load).
    unlisted = [str(p.relative_to(directory)) for p in _files(directory)
                if str(p.relative_to(directory)) not in files]
    missing = [f for f in REQUIRED if f not in files]
    if not any(f.startswith("train/") and f.endswith(".distcp") for f in files):
        missing.append("train/*.distcp")
    if unlisted or missing:
        raise CheckpointCorrupt(f"{manifest}: does not list "
                                f"{', '.join((missing + unlisted)[:4])} (incomplete manifest)")
    for rel, (size, crc) in files.items():
        path = directory / rel
        if not path.is_file():
            raise CheckpointCorrupt(f"{path}: missing")
        if path.stat().st_size != size:
            raise CheckpointCorrupt(f"{path}: {path.stat().st_size} bytes, manifest says {size}")
        if _crc32(path) != crc:
            raise CheckpointCorrupt(f"{path}: CRC32 differs from the manifest (corrupted)")


def step_of(directory: Path) -> int:
    return int(directory.name.removeprefix("step_"))


def checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint directories under `root`, newest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
            and p.name.removeprefix("step_").isdigit()]
    return sorted(dirs, key=step_of, reverse=True)


def supersede_newer(root: Path, step: int) -> list[Path]:
    """Checkpoints past `step` when `step` was just written belong to a future this run left (it
    resumed from an earlier step, or `resume=auto` skipped them as corrupted): renamed to
    `step_<n>.superseded`, out of `resume=auto`'s and pruning's way (pruning by step would keep
    them and delete the new ones), not deleted. Returns the new paths."""
    moved = []
    for path in checkpoints(root):
        if step_of(path) <= step:
            break
        target = path.with_name(path.name + ".superseded")
        if target.exists():  # superseded twice: the older copy goes
            shutil.rmtree(target)
        path.rename(target)
        logger.warning("checkpoint %s is past the resumed run's step %d: renamed to %s", path,
                       step, target.name)  # fmt: skip
        moved.append(target)
    return moved


def latest_complete(root: Path) -> Path | None:
    """The newest checkpoint that passes `verify`; corrupted ones are skipped with a warning."""
    for path in checkpoints(root):
        try:
            verify(path)
            return path
        except CheckpointCorrupt as e:
            logger.warning("skipping corrupted checkpoint: %s", e)
    return None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint `resume` (auto | a path) names for `run_dir`; None = nothing to resume."""
    if resume == "auto":
        root = run_dir / "checkpoints"
        found = latest_complete(root)
        if found is None and checkpoints(root):  # starting over would overwrite them
            raise CheckpointCorrupt(
                f"resume=auto: every checkpoint under {root} is corrupted (see the warnings); "
                "pass resume=<path> to one, or resume=false run.overwrite=true to start over")
        return found
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"resume={resume}: no such checkpoint directory")
    verify(path)
    return path


def check_fresh_run_dir(run_dir: Path, overwrite: bool) -> None:
    """resume=false: refuse a run directory that already holds a run, unless told to replace it."""
    if not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists():
        return
    if not overwrite:
        raise ValueError(f"run directory {run_dir} already holds a run and resume=false; pass "
                         "resume=auto to continue it or run.overwrite=true to replace it")


def truncate_jsonl(path: Path, start_step: int) -> int:
    """Keep the lines of steps < start_step (a resumed run rewrites the later ones); returns the
    number of lines dropped."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [x for x in lines if x.strip() and json.loads(x)["step"] < start_step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(kept))
    tmp.rename(path)
    return len(lines) - len(kept)


class Checkpointer:
    """Saves and loads the train mesh's part of a checkpoint; collective over `group` (the train
    mesh). The leader (train rank 0) also writes the queue snapshot and the metadata."""

    def __init__(self, root: Path, cfg: CheckpointConfig, group, dp_rank: int):
        self.root, self.cfg, self.group, self.dp_rank = root, cfg, group, dp_rank
        self.leader = dp_rank == 0

    def due(self, version: int, num_steps: int) -> bool:
        return version == num_steps or (self.cfg.every > 0 and version % self.cfg.every == 0)

    def save(self, version: int, engine, queue_snapshot, meta: dict[str, Any],
             export=None) -> Path:
        """Write checkpoint `step_<version>`. `queue_snapshot()` (leader only) is taken first.
        `export(dir)`, when given, writes an HF copy of the policy (every train rank calls it)."""
        t0 = time.perf_counter()
        final = self.root / f"step_{version}"
        tmp = self.root / f".step_{version}.tmp"
        if self.leader:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            snapshot = queue_snapshot()
            torch.save(snapshot, tmp / "queue.pt")
            meta = {**meta, "data_cursor": {"next_train_step": version,
                                            "next_prompt_step": next_prompt_step(snapshot, version),
                                            "queued_rows": len(snapshot["meta"]["rows"])}}
        dist.barrier(group=self.group)
        model_sd, optim_sd = get_state_dict(engine.model, engine.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "train"),
                 process_group=self.group)
        torch.save({"torch": torch.get_rng_state()}, tmp / f"rng_train{self.dp_rank}.pt")
        if export is not None:
            export(tmp / "hf")
        dist.barrier(group=self.group)
        if self.leader:
            (tmp / "meta.json").write_text(json.dumps({
                "step": version, "scheduler": engine.scheduler.state_dict(),
                "nonfinite_streak": engine.nonfinite_streak, **meta}, indent=1))
            write_manifest(tmp)
            if final.exists():  # a resumed run passing a step it had saved before
                shutil.rmtree(final)
            tmp.rename(final)
            supersede_newer(self.root, version)
            for old in checkpoints(self.root)[self.cfg.keep:]:
                shutil.rmtree(old)
            logger.info("checkpoint %s written in %.2f s", final, time.perf_counter() - t0)
        return final

    def load(self, path: Path, engine) -> dict[str, Any]:
        """Restore model, optimizer, LR schedule, RNG and policy version; returns meta.json."""
        meta = json.loads((path / "meta.json").read_text())
        model_sd, optim_sd = get_state_dict(engine.model, engine.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "train"), process_group=self.group)
        # how the optimizer steps (fused, foreach) is this code's choice, not the checkpoint's:
        # a checkpoint saved before AdamW was fused would otherwise turn it off again
        impl = [{k: g[k] for k in ("fused", "foreach") if k in g}
                for g in engine.optimizer.param_groups]
        set_state_dict(engine.model, engine.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        for group, flags in zip(engine.optimizer.param_groups, impl, strict=True):
            group.update(flags)
        engine.scheduler.load_state_dict(meta["scheduler"])
        engine.policy_version = int(meta["step"])
        engine.nonfinite_streak = int(meta["nonfinite_streak"])
        rng = path / f"rng_train{self.dp_rank}.pt"
        if rng.exists():  # absent when the train mesh grew since the save
            torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
        return meta


def load_queue(path: Path) -> dict[str, Any]:
    return torch.load(path / "queue.pt", weights_only=True)


def next_prompt_step(snapshot: dict[str, Any], step: int) -> int:
    """The data cursor: prompts continue after the last step whose rows the queue holds (the
    prompt stage puts a step's rows at once; the train stage is at `step`)."""
    return max([step, *(row[1] + 1 for row in snapshot["meta"]["rows"])])
