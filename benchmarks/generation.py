"""Generated tokens/s of the torch rollout engine against transformers' `generate`.

Same checkpoint, same prompts (one batch), same number of new tokens for both (EOS ignored:
`min_new_tokens = max_new_tokens` in transformers, `ignore_eos` in ours), greedy decoding, same
device and dtype (fp32 on CPU by default), run alternately in one process so that machine noise hits
both; median and spread of repeats.

    python benchmarks/generation.py                       # tiny + SmolLM2-135M, results printed
    python benchmarks/generation.py --models tiny --repeats 5 --scenarios equal,tail
    python benchmarks/generation.py --profile tiny        # where the engine's time goes
    python benchmarks/generation.py --no-compile          # eager decode step
    python benchmarks/generation.py --eager-too           # also the plain eager engine
    python benchmarks/generation.py --models smollm2 --device cuda --dtype bfloat16 --batch 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from asyncflow.engines import (  # noqa: E402
    GenerationRequest,
    SamplingParams,
    TorchEngineConfig,
    build_rollout_engine,
)
from asyncflow.models import ModelConfig, build_model, save_pretrained  # noqa: E402

# The tiny default shape (Qwen2-style, char-level vocabulary for 3-digit addition).
TINY = dict(architectures=["Qwen2ForCausalLM"], vocab_size=24, hidden_size=128,
            intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512,
            rms_norm_eps=1e-6, eos_token_id=2, bos_token_id=1, pad_token_id=0)


def tiny_checkpoint(tmp: Path) -> tuple[Path, str]:
    """The prepared tiny default model if `asyncflow.tasks.tiny` has cached it, else the same
    shape with random weights. Its context window (64) is raised so that 128 new tokens fit:
    default RoPE does not depend on it, and transformers does not enforce it."""
    import json
    import shutil

    from asyncflow.tasks.tiny import MARKER, TinyModelConfig, default_cache_dir

    prepared = default_cache_dir() / TinyModelConfig().name
    if (prepared / MARKER).is_file():
        out = Path(shutil.copytree(prepared, tmp / "tiny"))
        config = json.loads((out / "config.json").read_text())
        config["max_position_embeddings"] = 512
        (out / "config.json").write_text(json.dumps(config))
        return out, f"real SFT weights, {prepared.name}"
    cfg = ModelConfig.from_hf_dict(TINY)
    model = build_model(cfg)
    model.init_weights(seed=0, std=0.2)
    return save_pretrained(model, tmp / "tiny"), "random init"


def smollm2_checkpoint() -> tuple[Path, str]:
    from asyncflow.models.packaged import prepare_packaged_model
    from asyncflow.tasks.tiny import default_cache_dir

    path = prepare_packaged_model("smollm2-135m-instruct", default_cache_dir())
    return path, "real (Q4_1 GGUF dequantized to fp32)"


def prompts(vocab: int, batch: int, prompt_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, prompt_len), generator=g).tolist()


def run_ours(engine, batch_ids, new_tokens: list[int], batch: int) -> int:
    """All requests at once; the engine keeps `batch` slots busy (continuous batching)."""
    reqs = [GenerationRequest(str(i), p, SamplingParams(max_new_tokens=n, temperature=0,
                                                       ignore_eos=True))
            for i, (p, n) in enumerate(zip(batch_ids, new_tokens, strict=True))]
    outs = engine.generate(reqs)
    return sum(len(c.token_ids) for c in outs)


def run_hf(model, batch_ids, new_tokens: list[int], batch: int) -> int:
    """Static batches of `batch` requests, each run to its longest request; counts only the
    tokens requested (the useful ones), like `run_ours`. Returns once the tokens are on the host
    (as ours does), so GPU time is counted."""
    useful = 0
    for i in range(0, len(batch_ids), batch):
        ids = torch.tensor(batch_ids[i: i + batch], device=model.device)
        n = max(new_tokens[i: i + batch])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        out = out.cpu()
        assert out.shape[1] - ids.shape[1] == n
        useful += sum(new_tokens[i: i + batch])
    return useful


def bench(name, path, weights, batch, prompt_len, new_tokens, repeats, num_requests=None,
          compile=True, eager_too=False, device="cpu", dtype="float32", cuda_graphs=True) -> dict:
    """Equal lengths (num_requests None: one batch, every request new_tokens long) or a long tail
    (num_requests requests, lengths uniform in [8, new_tokens])."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype)).to(device).eval()
    hf.generation_config.eos_token_id = None

    def build(compile, cuda_graphs=True):
        return build_rollout_engine(TorchEngineConfig(
            max_batch_size=batch, max_seq_len=prompt_len + new_tokens, compile=compile,
            cuda_graphs=cuda_graphs, device=device, dtype=dtype), path)

    engine = build(compile, cuda_graphs)
    n_req = num_requests or batch
    batch_ids = prompts(engine.vocab_size, n_req, prompt_len)
    if num_requests is None:
        lens = [new_tokens] * n_req
    else:
        lens = torch.randint(8, new_tokens + 1, (n_req,),
                             generator=torch.Generator().manual_seed(1)).tolist()
    runs = {"asyncflow": (run_ours, engine), "transformers": (run_hf, hf)}
    if eager_too:
        runs["asyncflow eager"] = (run_ours, build(False, cuda_graphs=False))
    warmup_s = {}
    for key, (fn, m) in runs.items():  # warm-up (compiles the decode step)
        t0 = time.perf_counter()
        fn(m, batch_ids[:4], [8] * 4, 4)
        warmup_s[key] = time.perf_counter() - t0
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, (fn, m) in runs.items():
            t0 = time.perf_counter()
            n = fn(m, batch_ids, lens, batch)
            rates[key].append(n / (time.perf_counter() - t0))
            assert n == sum(lens), (key, n)
    ratios = [a / b for a, b in zip(rates["asyncflow"], rates["transformers"], strict=True)]
    shape = (f"{batch} x ({prompt_len} + {new_tokens})" if num_requests is None else
             f"{n_req} requests, new 8-{new_tokens}, {batch} slots / HF batches of {batch}")
    return dict(name=name, weights=weights, rates=rates, ratios=ratios, shape=shape,
                warmup_s=warmup_s)


def fmt(r: dict) -> str:
    def ms(xs):
        return f"{statistics.median(xs):,.0f} ({min(xs):,.0f}-{max(xs):,.0f})"
    ra = r["ratios"]
    return (f"| {r['name']} ({r['weights']}) | {r['shape']} | {ms(r['rates']['asyncflow'])} | "
            f"{ms(r['rates']['transformers'])} | {statistics.median(ra):.2f}x "
            f"({min(ra):.2f}-{max(ra):.2f}) |")


def fmt_extra(r: dict) -> str:
    """Warm-up times (the first includes compiling the decode step) and the eager engine."""
    out = "warm-up s: " + ", ".join(f"{k} {v:.1f}" for k, v in r["warmup_s"].items())
    if "asyncflow eager" in r["rates"]:
        eager, hf = r["rates"]["asyncflow eager"], r["rates"]["transformers"]
        vs = [a / b for a, b in zip(r["rates"]["asyncflow"], eager, strict=True)]
        out += (f"; eager tok/s {statistics.median(eager):,.0f} ({min(eager):,.0f}-"
                f"{max(eager):,.0f}), eager/transformers "
                f"{statistics.median([a / b for a, b in zip(eager, hf, strict=True)]):.2f}x, "
                f"compiled/eager {statistics.median(vs):.2f}x ({min(vs):.2f}-{max(vs):.2f})")
    return out


def profile(path, batch, prompt_len, new_tokens, compile, device="cpu", dtype="float32",
            cuda_graphs=True) -> str:
    """Operator table; on CUDA also how much of the wall time the GPU was busy with kernels."""
    engine = build_rollout_engine(TorchEngineConfig(
        max_batch_size=batch, max_seq_len=prompt_len + new_tokens, compile=compile,
        cuda_graphs=cuda_graphs, device=device, dtype=dtype), path)
    batch_ids = prompts(engine.vocab_size, batch, prompt_len)
    run_ours(engine, batch_ids, [8] * batch, batch)
    acts = [torch.profiler.ProfilerActivity.CPU]
    cuda = torch.device(device).type == "cuda"
    if cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        run_ours(engine, batch_ids, [new_tokens] * batch, batch)
    wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.key_averages()
    if not cuda:
        return events.table(sort_by="self_cpu_time_total", row_limit=25)
    busy_us = sum(e.self_device_time_total for e in events)
    print(f"GPU kernel time {busy_us / 1e3:.1f} ms of {wall_us / 1e3:.1f} ms wall "  # noqa: T201
          f"({busy_us / wall_us:.0%} busy; profiler overhead included in the wall time)")
    return (events.table(sort_by="self_device_time_total", row_limit=20) + "\n"
            + events.table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scenarios", default="equal",
                    help="equal: one batch, all new-tokens long; tail: --long-tail requests of "
                         "lengths uniform in [8, new-tokens]; or both: equal,tail")
    ap.add_argument("--long-tail", type=int, default=256, help="requests in the tail scenario")
    ap.add_argument("--profile", choices=["tiny", "smollm2"])
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="eager decode step (TorchEngineConfig.compile=False)")
    ap.add_argument("--eager-too", action="store_true",
                    help="also time the plain eager engine (no compile, no CUDA graphs) in the "
                         "same loop")
    ap.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                    help="launch each kernel (TorchEngineConfig.cuda_graphs=False); CUDA only")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (both engines)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--write", type=Path, help="append the table to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    ckpts = {"tiny": lambda: (*tiny_checkpoint(tmp), 9), "smollm2": lambda: (*smollm2_checkpoint(), 32)}
    if args.profile:
        path, _, plen = ckpts[args.profile]()
        print(profile(path, args.batch, plen, args.new_tokens, args.compile,  # noqa: T201
                      args.device, args.dtype, args.cuda_graphs))
        return
    where = (torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda"
             else f"CPU, {torch.get_num_threads()} thread(s)")
    print(f"{where}, {args.dtype}, torch {torch.__version__}", flush=True)  # noqa: T201
    lines = ["| model (weights) | requests | asyncflow tok/s | transformers tok/s | ratio |",
             "|---|---|---|---|---|"]
    for name in args.models.split(","):
        path, weights, plen = ckpts[name]()
        scenarios = {"equal": None, "tail": args.long_tail}
        for num_requests in [scenarios[k] for k in args.scenarios.split(",")]:
            r = bench(name, path, weights, args.batch, plen, args.new_tokens, args.repeats,
                      num_requests, args.compile, args.eager_too, args.device, args.dtype,
                      args.cuda_graphs)
            lines.append(fmt(r))
            print(lines[-1], flush=True)  # noqa: T201
            print(fmt_extra(r), flush=True)  # noqa: T201
    table = "\n".join(lines)
    print(table)  # noqa: T201
    if args.write:
        with args.write.open("a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
