"""What every rollout engine must do, checked the same way for each (the `engine_factory` fixture):
greedy parity with transformers, log-probs equal to a full forward at the sampling temperature,
batch invariance, a weight commit in the middle of generation, and bad requests that fail alone.

References are computed on CPU in fp32 from the same HF checkpoint. The torch engine runs here on
CPU; its CUDA variant and SGLang are `gpu`-marked (run with `-m gpu`)."""

from __future__ import annotations

import pytest
import torch

from asyncflow.engines import (
    GenerationRequest,
    SamplingParams,
    SGLangEngineConfig,
    TorchEngineConfig,
    build_rollout_engine,
)
from asyncflow.models import load_pretrained
from tests.engines import (
    EOS,
    VOCAB,
    batch_atol,
    full_logprobs,
    greedy_under,
    make_requests,
    random_prompts,
    weights_of,
)

transformers = pytest.importorskip("transformers")

ENGINES = ["torch-cpu", pytest.param("torch-cuda", marks=pytest.mark.gpu),
           pytest.param("sglang", marks=pytest.mark.gpu)]


def _config(kind: str, device: str, max_batch_size: int, max_seq_len: int):
    if kind == "sglang":
        # fp32 for the 1e-4 log-prob checks; deterministic inference honours per-request seeds
        # and makes kernels batch-invariant; no CUDA graphs: a test builds several engines
        return SGLangEngineConfig(device=device, dtype="float32", max_batch_size=max_batch_size,
                                  max_seq_len=max_seq_len, deterministic=True, cuda_graphs=False,
                                  mem_fraction_static=0.15)
    return TorchEngineConfig(device=device, max_batch_size=max_batch_size,
                             max_seq_len=max_seq_len)


@pytest.fixture(params=ENGINES)
def engine_factory(request):
    """(make, device): `make(path, max_batch_size=8, max_seq_len=64)` builds the engine under
    test serving the HF checkpoint at `path`; every engine it built is shut down afterwards. A
    CUDA engine selected on a machine without CUDA fails (it is deselected unless `-m gpu`), and
    so does SGLang where sglang does not import (the error says how to install it)."""
    kind = request.param
    device = "cpu" if kind == "torch-cpu" else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"engine {kind} was selected but torch.cuda.is_available() is False "
                    f"(torch {torch.__version__})")
    built = []

    def make(path, max_batch_size=8, max_seq_len=64):
        built.append(build_rollout_engine(_config(kind, device, max_batch_size, max_seq_len),
                                          path))
        return built[-1]

    yield make, device
    for engine in built:
        engine.shutdown()


@pytest.mark.parametrize("ckpt", ["tiny", "llama"])
def test_greedy_matches_transformers_generate_with_continuous_batching(request, ckpt,
                                                                      engine_factory):
    make, _ = engine_factory
    path = request.getfixturevalue(ckpt)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ps = random_prompts(12, seed=3)
    # 4 slots for 12 requests of mixed lengths: finished rows are refilled mid-batch.
    outs = make(path, max_batch_size=4).generate(make_requests(ps, max_new_tokens=24,
                                                               temperature=0))
    reasons = set()
    for p, c in zip(ps, outs, strict=True):
        ids = torch.tensor([p])
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                            do_sample=False, eos_token_id=EOS, pad_token_id=0)[0, len(p):]
        assert c.token_ids == want.tolist(), (p, c.finish_reason)
        reasons.add(c.finish_reason)
    assert reasons == {"stop", "length"}  # both ends exercised


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_full_forward_before_truncation(tiny, temperature, engine_factory):
    make, _ = engine_factory
    ps = random_prompts(8, seed=5)
    rs = make_requests(ps, max_new_tokens=20, temperature=temperature, ignore_eos=True)
    rs[1].sampling.top_k, rs[2].sampling.top_p = 3, 0.5  # truncation must not change them
    outs = make(tiny, max_batch_size=4).generate(rs)
    model = load_pretrained(tiny)
    worst = 0.0
    for p, c in zip(ps, outs, strict=True):
        assert len(c.token_ids) == len(c.logprobs) == 20
        got = torch.tensor(c.logprobs)
        worst = max(worst, (got - full_logprobs(model, p, c.token_ids, temperature)).abs().max())
    assert worst <= 1e-4


def test_greedy_logprobs_use_temperature_one(tiny, engine_factory):
    make, _ = engine_factory
    p = random_prompts(1, seed=6)[0]
    c = make(tiny).generate(make_requests([p], max_new_tokens=10, temperature=0,
                                          ignore_eos=True))[0]
    want = full_logprobs(load_pretrained(tiny), p, c.token_ids, 1.0)
    assert torch.allclose(torch.tensor(c.logprobs), want, atol=1e-4)


def test_batch_of_mixed_lengths_equals_each_alone(tiny, engine_factory):
    make, device = engine_factory
    ps = random_prompts(10, seed=4, hi=30)
    batched = make(tiny, max_batch_size=3).generate(make_requests(ps, max_new_tokens=20,
                                                                  temperature=0))
    engine = make(tiny, max_batch_size=1)
    for p, c in zip(ps, batched, strict=True):
        alone = engine.generate(make_requests([p], max_new_tokens=20, temperature=0))[0]
        assert c.token_ids == alone.token_ids
        assert c.logprobs == pytest.approx(alone.logprobs, abs=batch_atol(device))


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(tiny, engine_factory):
    make, _ = engine_factory
    ps = random_prompts(6, seed=7)
    rs = [GenerationRequest(f"r{i}", p, SamplingParams(max_new_tokens=16, temperature=1.0,
                                                       seed=100 + i, ignore_eos=True))
          for i, p in enumerate(ps)]
    a = make(tiny, max_batch_size=6).generate(rs)
    b = make(tiny, max_batch_size=2).generate(rs[::-1])[::-1]  # other order, other slots
    c = make(tiny, max_batch_size=1).generate(rs[3:4])
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert a[3].token_ids == c[0].token_ids
    reseeded = [GenerationRequest(r.request_id, r.prompt_ids,
                                  SamplingParams(max_new_tokens=16, temperature=1.0, seed=7,
                                                 ignore_eos=True)) for r in rs]
    d = make(tiny, max_batch_size=6).generate(reseeded)
    assert [x.token_ids for x in d] != [x.token_ids for x in a]


def test_weights_committed_mid_generation_sample_the_rest_and_are_accounted(tiny, tiny_b,
                                                                           engine_factory):
    """A short request finishes; then pause, load, commit version 1, resume. The long requests,
    still running, switch to the new weights at one token index k: tokens before k are the old
    policy's greedy choice, tokens from k on the new policy's given the same prefix (running
    sequences are re-prefilled under the new weights), and the completion says so."""
    make, _ = engine_factory
    engine = make(tiny, max_batch_size=4)
    long_prompts = random_prompts(3, seed=11, hi=4)
    n = 56  # long enough to outlast the commit on a fast engine
    rs = [GenerationRequest("short", long_prompts[0], SamplingParams(max_new_tokens=3,
                                                                     temperature=0,
                                                                     ignore_eos=True))]
    rs += [GenerationRequest(f"long{i}", p, SamplingParams(max_new_tokens=n, temperature=0,
                                                           ignore_eos=True))
           for i, p in enumerate(long_prompts)]
    stream = engine.stream(rs)
    first = next(stream)
    assert first.request_id == "short"
    assert (first.policy_version_start, first.policy_version_end) == (0, 0)
    assert first.version_changes == []
    engine.pause()
    new = weights_of(tiny_b)
    engine.load_weights(new[:5])  # in buckets
    engine.load_weights(new[5:])
    engine.commit_weights(1)
    assert engine.policy_version == 1
    engine.resume()
    rest = list(stream)
    assert sorted(c.request_id for c in rest) == ["long0", "long1", "long2"]
    new_model = load_pretrained(tiny_b)
    for c in rest:
        assert c.finish_reason == "length" and len(c.token_ids) == n  # nothing aborted
        (k, v), = c.version_changes
        assert (c.policy_version_start, c.policy_version_end, v) == (0, 1, 1)
        assert 3 <= k < n
        assert c.policy_version_at(k - 1) == 0 and c.policy_version_at(k) == 1
        assert c.token_ids[:k] == greedy_under(tiny, c.prompt_ids, k)
        prefix = c.prompt_ids + c.token_ids[:k]
        assert c.token_ids[k:] == greedy_under(tiny_b, prefix, n - k)
        want = full_logprobs(new_model, prefix, c.token_ids[k:], 1.0)
        assert torch.allclose(torch.tensor(c.logprobs[k:]), want, atol=1e-4)


def test_bad_requests_fail_alone_and_the_batch_completes(tiny, engine_factory):
    make, _ = engine_factory
    good = random_prompts(3, seed=10)
    rs = [
        GenerationRequest("too-long", [5] * 64),
        GenerationRequest("empty", []),
        GenerationRequest("no-new-tokens", [5], SamplingParams(max_new_tokens=0)),
        GenerationRequest("neg-temp", [5], SamplingParams(temperature=-0.5)),
        GenerationRequest("oov", [5, VOCAB, -1]),
        GenerationRequest("bad-top-p", [5], SamplingParams(top_p=0.0)),
    ] + make_requests(good, max_new_tokens=5, temperature=0, ignore_eos=True)
    outs = {c.request_id: c for c in make(tiny, max_batch_size=2).generate(rs)}
    expected = {"too-long": "context window", "empty": "empty prompt",
                "no-new-tokens": "max_new_tokens=0", "neg-temp": "temperature=-0.5",
                "oov": "outside the vocabulary", "bad-top-p": "top_p=0.0"}
    for rid, phrase in expected.items():
        assert outs[rid].finish_reason == "error" and phrase in outs[rid].error, outs[rid]
        assert outs[rid].token_ids == []
    for i in range(3):
        assert outs[f"r{i}"].finish_reason == "length" and len(outs[f"r{i}"].token_ids) == 5
