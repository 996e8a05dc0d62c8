"""Hugging Face checkpoint directories in and out: config.json + (sharded) model.safetensors.

Module paths of `CausalLM` equal HF parameter names, so loading is a checked one-to-one copy.
Every mismatch (missing or unexpected tensor, wrong shape) is reported as one `ValueError` that
names the file and the tensor, before any weight is touched.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from asyncflow.models.config import ModelConfig
from asyncflow.models.transformer import CausalLM, build_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory whose tensors do not fit its config."""


def _weight_files(directory: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file, from the index if sharded."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        return {name: directory / fname for name, fname in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{directory}: no model.safetensors or {INDEX_NAME}")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _open(path: Path):
    """safe_open, with a truncated or corrupted file reported as one line naming it."""
    try:
        return safe_open(path, "pt")
    except Exception as e:  # safetensors raises its own (Rust) error type
        raise CheckpointError(f"{path}: not a readable safetensors file "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _expected(model: CausalLM) -> dict[str, torch.Size]:
    """Names and shapes a checkpoint must hold (a tied lm_head is optional)."""
    return {n: p.shape for n, p in model.state_dict().items()}


def load_state_into(model: CausalLM, directory: str | Path) -> None:
    """Copy the checkpoint's tensors into `model` (already materialised), casting dtypes."""
    params = model.state_dict(keep_vars=True)
    for path, names in _matching_files(model, Path(directory)).items():
        with _open(path) as f:
            for name in names:
                with torch.no_grad():
                    params[name].copy_(f.get_tensor(name))


def check_pretrained(path: str | Path) -> None:
    """What `load_pretrained` would refuse, found without reading a tensor: a missing directory,
    a bad config.json, unreadable safetensors headers, missing or misshapen tensors."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model directory does not exist")
    _matching_files(build_model(ModelConfig.from_file(path), device="meta"), path)


def _matching_files(model: CausalLM, directory: Path) -> dict[Path, list[str]]:
    """The files holding `model`'s tensors and their names, after checking names and shapes."""
    files = _weight_files(directory)
    expected = _expected(model)
    tied = model.config.tie_word_embeddings
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(set(expected) - set(files) - optional)
    unexpected = sorted(n for n in set(files) - set(expected) if not n.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: tensors do not match config.json "
            f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''})"
        )
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        if name in expected:
            by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with _open(path) as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(expected[name]):
                    raise CheckpointError(
                        f"{path.name}: tensor {name} has shape {list(shape)} but config.json "
                        f"implies {list(expected[name])}"
                    )
    return by_file


def load_pretrained(path: str | Path, dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu") -> CausalLM:
    """Build a model from an HF directory (config.json + safetensors). dtype None keeps the file's."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model directory does not exist")
    cfg = ModelConfig.from_file(path)
    if dtype is None:
        dtype = _DTYPES.get(cfg.torch_dtype, torch.float32)
    model = build_model(cfg, device="meta", dtype=dtype)
    model.to_empty(device=device)
    load_state_into(model, path)
    return model.eval()


def _save(state: dict[str, torch.Tensor], file: Path, meta: dict[str, str]) -> None:
    save_file(state, file, metadata=meta)
    file.chmod(0o644)  # safetensors writes owner-only files; engines may run as another user


def save_pretrained(model: CausalLM, path: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int | None = None) -> Path:
    """Write config.json and model.safetensors (sharded with an index past max_shard_bytes)."""
    return save_weights(model.state_dict(), model.config, path, dtype, max_shard_bytes)


def save_weights(named: dict[str, torch.Tensor], config: ModelConfig, path: str | Path,
                 dtype: torch.dtype | None = None, max_shard_bytes: int | None = None) -> Path:
    """`save_pretrained` for full tensors with HF names (e.g. gathered from a sharded model)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {n: t.detach().to("cpu", dtype or t.dtype).contiguous() for n, t in named.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    dtype_name = {v: k for k, v in _DTYPES.items()}[next(iter(state.values())).dtype]
    dataclasses.replace(config, torch_dtype=dtype_name).save(path)
    meta = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        _save(state, path / "model.safetensors", meta)
        (path / INDEX_NAME).unlink(missing_ok=True)
        return path
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, path / fname, meta)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (path / "model.safetensors").unlink(missing_ok=True)
    return path
