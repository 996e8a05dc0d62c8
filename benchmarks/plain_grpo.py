"""A plain single-process GRPO loop on the tiny default: the floor asyncflow's step time is judged by.

    python benchmarks/plain_grpo.py --steps 60 [--threads 1] [--out steps.json] [overrides ...]

No queue, no threads, no process groups, no reward worker: generate with the built-in torch
engine, score with the task's reward in this process, group advantages, one AdamW step over
micro-batches of whole groups, copy the weights into the engine. Model, batch, sampling, learning
rate and schedule come from the default run's composed config (Hydra overrides allowed), so the
loop follows the default when it changes; the algorithm is the default's GRPO (token-mean PPO clip,
rows with zero advantage skipped but counted in the normaliser, gradient clip). It is always
synchronous (eta = 0). `benchmarks/overhead.py` runs it beside asyncflow; ~100 lines on purpose.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from asyncflow.algorithms import group_advantages, policy_loss, sequence_weights, token_logprobs
from asyncflow.config import load_config
from asyncflow.engines import GenerationRequest, SamplingParams, build_rollout_engine
from asyncflow.engines.fsdp_engine import lr_factor
from asyncflow.engines.sequences import pack_shared
from asyncflow.models import Tokenizer, load_pretrained
from asyncflow.pipeline.runner import freeze_startup_objects, keep_freed_memory
from asyncflow.tasks import AdditionTask, encode_prompt, split_completions
from asyncflow.tasks.tiny import default_cache_dir, prepare_tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write per-step times and rewards as JSON")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the default config")
    args = ap.parse_args()
    keep_freed_memory()  # what every asyncflow rank does: the comparison is not about malloc
    cfg = load_config(args.overrides)
    torch.set_num_threads(args.threads)
    seed = cfg.run.seed
    torch.manual_seed(seed)

    model_dir = prepare_tiny_model(cfg.model.tiny, default_cache_dir())
    task, tok = AdditionTask(cfg.task), Tokenizer.from_pretrained(model_dir)
    policy = load_pretrained(model_dir).train()
    engine = build_rollout_engine(cfg.engine, load_pretrained(model_dir))
    o, a = cfg.trainer.optim, cfg.algorithm
    opt = torch.optim.AdamW(policy.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay, fused=True)  # as the FSDP2 trainer
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(o, args.steps))
    P, N, mb = cfg.pipeline.prompts_per_step, cfg.pipeline.group_size, cfg.trainer.micro_batch_size
    sampling = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens,
                              temperature=cfg.rollout.temperature)
    eos = [tok.eos_id]
    freeze_startup_objects()  # as every asyncflow rank does before its first step
    record: dict[str, list[float]] = {
        k: [] for k in ("step_time_s", "gen_s", "score_s", "train_s", "reward", "trained_rows")}
    t_last = time.perf_counter()
    for step in range(args.steps):
        problems = [task.train_problem(step * P + i) for i in range(P)]
        prompts = [encode_prompt(tok, p.prompt) for p in problems]
        requests = [GenerationRequest(str(i), prompts[i // N], SamplingParams(
            **{**sampling.__dict__, "seed": seed * 1_000_003 + step * P * N + i}))
            for i in range(P * N)]
        comps = engine.generate(requests)
        t_gen = time.perf_counter()
        texts = split_completions(tok, [c.token_ids for c in comps], eos)
        reward_GN = torch.tensor([task.reward(text, problems[i // N].answer, finished)
                                  for i, (text, finished) in enumerate(texts)]).view(P, N)
        adv = group_advantages(reward_GN)[0].flatten()
        t_score = time.perf_counter()

        normaliser = sum(len(c.token_ids) for c in comps)  # token-mean over every row
        keep = [i for i in range(P * N) if adv[i] != 0]  # zero advantage: zero gradient
        for lo in range(0, len(keep), mb):
            rows = keep[lo:lo + mb]
            batch = pack_shared([torch.tensor(prompts[i // N]) for i in rows],
                                [torch.tensor(comps[i].token_ids) for i in rows])
            lp = token_logprobs(batch.logits(policy), batch.targets_BT)
            behaviour = batch.scatter_response(
                [torch.tensor(comps[i].logprobs, dtype=torch.float32) for i in rows])
            loss, _ = policy_loss(lp, behaviour, adv[rows],
                                  sequence_weights(batch.response_mask_BT, a.aggregation),
                                  a.clip_low, a.clip_high)
            loss.backward()
        for p in policy.parameters():
            if p.grad is not None:
                p.grad.div_(normaliser)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), o.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t_train = time.perf_counter()
        engine.load_weights((n, t.detach()) for n, t in policy.state_dict().items()
                            if not (policy.config.tie_word_embeddings and n == "lm_head.weight"))
        engine.commit_weights(step + 1)

        now = time.perf_counter()
        for k, v in (("step_time_s", now - t_last), ("gen_s", t_gen - t_last),
                     ("score_s", t_score - t_gen), ("train_s", t_train - t_score),
                     ("reward", reward_GN.mean().item()),
                     ("trained_rows", len(keep))):
            record[k].append(v)
        t_last = now
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f)
    else:
        print(json.dumps(record))


if __name__ == "__main__":
    main()
