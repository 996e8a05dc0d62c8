"""The SGLang adapter's translation between our protocol and sglang 0.5.23's offline Engine.

The CPU tests here check pure functions only. Their SGLang-side inputs are dicts written by hand
from the structures in sglang 0.5.23's source (`meta_info` as built by
`managers/tokenizer_manager.py` and `utils/weight_versions.py`), NOT outputs recorded from a real
SGLang run: no such run has happened yet. What needs sglang itself is `gpu`-marked (here and in
test_engine_conformance.py)."""

import importlib.util

import pytest

from asyncflow.engines import SamplingParams, SGLangEngineConfig, build_rollout_engine
from asyncflow.engines.sglang_engine import (
    completion_from_output,
    sampling_kwargs,
    server_kwargs,
)
from asyncflow.models import load_pretrained
from tests.engines import make_requests, random_prompts, weights_of


def test_server_kwargs_serve_token_ids_from_the_given_gpu_at_the_given_version():
    cfg = SGLangEngineConfig(dtype="float32", max_batch_size=8, deterministic=True,
                             cuda_graphs=False, mem_fraction_static=0.25, seed=3)
    kw = server_kwargs(cfg, "/models/m", gpu_id=2, context_length=64, policy_version=5)
    assert kw["model_path"] == "/models/m" and kw["skip_tokenizer_init"] is True
    assert (kw["base_gpu_id"], kw["context_length"], kw["weight_version"]) == (2, 64, "5")
    assert (kw["dtype"], kw["max_running_requests"], kw["random_seed"]) == ("float32", 8, 3)
    assert kw["enable_deterministic_inference"] is True and kw["disable_cuda_graph"] is True
    assert kw["mem_fraction_static"] == 0.25 and kw["enable_memory_saver"] is False
    assert "max_running_requests" not in server_kwargs(SGLangEngineConfig(), "m", 0, 64, 0)


def test_sampling_kwargs_map_greedy_disabled_top_k_and_the_seed():
    greedy = sampling_kwargs(SamplingParams(max_new_tokens=7, temperature=0), [2], seed=11)
    assert greedy == {"max_new_tokens": 7, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
                      "ignore_eos": False, "stop_token_ids": None, "sampling_seed": 11}
    sampled = sampling_kwargs(SamplingParams(temperature=0.7, top_p=0.9, top_k=5), [2], seed=1)
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (0.7, 0.9, 5)


def test_stop_tokens_must_include_the_eos_ids_sglang_always_stops_at():
    both = sampling_kwargs(SamplingParams(stop_token_ids=(7, 2)), [2], seed=0)
    assert both["stop_token_ids"] == [7, 2]
    with pytest.raises(ValueError, match=r"leave out the eos ids \[2\]"):
        sampling_kwargs(SamplingParams(stop_token_ids=(7,)), [2], seed=0)
    # ignore_eos turns SGLang's stop_token_ids off as well: the protocol's "never stop"
    ignored = sampling_kwargs(SamplingParams(stop_token_ids=(7,), ignore_eos=True), [2], seed=0)
    assert ignored["ignore_eos"] is True and ignored["stop_token_ids"] is None


def _output(entries, spans=None, finish=None, output_ids=None):
    """An Engine.async_generate result as tokenizer_manager builds it with skip_tokenizer_init:
    output_token_logprobs holds (logprob, token id, None) per token."""
    meta = {"id": "afx-0.", "finish_reason": finish or {"type": "length", "length": len(entries)},
            "weight_version": spans[-1]["version"] if spans else "0",
            "output_token_logprobs": entries}
    if spans is not None:
        meta["weight_versions"] = spans
    ids = [t for _, t, _ in entries] if output_ids is None else output_ids
    return {"output_ids": ids, "meta_info": meta}


def test_a_completion_takes_tokens_logprobs_and_version_spans_from_meta_info():
    entries = [(-0.5, 4, None), (-1.25, 9, None), (-0.1, 4, None), (-2.0, 2, None)]
    spans = [{"version": "3", "start": 0, "end": 1}, {"version": "4", "start": 1, "end": 3},
             {"version": "6", "start": 3, "end": 4}]
    c = completion_from_output("q", [5, 6], _output(entries, spans,
                                                    {"type": "stop", "matched": 2}), 3)
    assert (c.request_id, c.prompt_ids, c.finish_reason) == ("q", [5, 6], "stop")
    assert c.token_ids == [4, 9, 4, 2] and c.logprobs == [-0.5, -1.25, -0.1, -2.0]
    assert (c.policy_version_start, c.policy_version_end) == (3, 6)
    assert c.version_changes == [(1, 4), (3, 6)]
    assert [c.policy_version_at(i) for i in range(4)] == [3, 4, 4, 6]


def test_one_span_means_one_version_and_no_changes():
    c = completion_from_output("q", [5], _output([(-0.5, 4, None)],
                                                 [{"version": "2", "start": 0, "end": 1}]), 1)
    assert (c.policy_version_start, c.policy_version_end, c.version_changes) == (2, 2, [])
    assert c.finish_reason == "length"


def test_an_abort_in_the_waiting_queue_has_no_tokens_and_the_submission_version():
    out = _output([], finish={"type": "abort", "message": "Abort in waiting queue"})
    c = completion_from_output("q", [5], out, 7)
    assert (c.finish_reason, c.token_ids, c.logprobs) == ("abort", [], [])
    assert (c.policy_version_start, c.policy_version_end) == (7, 7)


def test_inconsistent_outputs_are_refused_not_guessed():
    spans = [{"version": "0", "start": 0, "end": 2}]
    with pytest.raises(ValueError, match="differ from the tokens"):
        completion_from_output("q", [5], _output([(-0.5, 4, None), (-1.0, 9, None)], spans,
                                                 output_ids=[4]), 0)
    with pytest.raises(ValueError, match="no meta_info\\['weight_versions'\\]"):
        completion_from_output("q", [5], _output([(-0.5, 4, None)]), 0)
    with pytest.raises(ValueError, match="finish_reason None"):
        completion_from_output("q", [5], {"output_ids": [], "meta_info": {
            "id": "x", "finish_reason": None, "output_token_logprobs": []}}, 0)


def test_config_refuses_cpu_and_unknown_dtypes():
    with pytest.raises(ValueError, match="engine.device='cpu'"):
        SGLangEngineConfig(device="cpu")
    with pytest.raises(ValueError, match="engine.dtype='fp8'"):
        SGLangEngineConfig(dtype="fp8")
    with pytest.raises(ValueError, match="mem_fraction_static=1.0"):
        SGLangEngineConfig(mem_fraction_static=1.0)


def test_building_needs_a_checkpoint_directory_and_the_unaltered_logprob_semantics(
        tiny, monkeypatch):
    with pytest.raises(TypeError, match="HF checkpoint directory"):
        build_rollout_engine(SGLangEngineConfig(), load_pretrained(tiny))
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
    with pytest.raises(ValueError, match="SGLANG_RETURN_ORIGINAL_LOGPROB is set"):
        build_rollout_engine(SGLangEngineConfig(), tiny)


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None,
                    reason="sglang is installed: the missing-package message cannot show")
def test_without_sglang_the_error_says_how_to_install_it_and_that_it_needs_cuda(tiny):
    with pytest.raises(ImportError, match=r"pip install asyncflow\[sglang\]") as e:
        build_rollout_engine(SGLangEngineConfig(), tiny)
    assert "CUDA" in str(e.value) and "0.5.23" in str(e.value)


@pytest.mark.gpu
def test_released_memory_comes_back_and_takes_the_weights_again(tiny):
    """The colocated cycle: release weights and KV cache (the trainer steps), resume, commit the
    new weights (released weights' contents are gone), generate."""
    engine = build_rollout_engine(SGLangEngineConfig(memory_saver=True, dtype="float32",
                                                     mem_fraction_static=0.2,
                                                     cuda_graphs=False), tiny)
    try:
        rs = make_requests(random_prompts(4, seed=30), max_new_tokens=8, temperature=0,
                           ignore_eos=True)
        before = engine.generate(rs)
        engine.release_memory()
        engine.resume_memory()
        engine.load_weights(weights_of(tiny))
        engine.commit_weights(1)
        after = engine.generate(rs)
        assert all(c.policy_version_start == 1 for c in after)
        assert [c.token_ids for c in after] == [c.token_ids for c in before]
        assert all(len(c.token_ids) == 8 for c in after)
    finally:
        engine.shutdown()
