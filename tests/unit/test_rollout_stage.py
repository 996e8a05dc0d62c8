"""The rollout stage over a real in-process queue and engine: a step whose every row the engine
refuses fails the run instead of training nothing while the accounting says it trained."""

import pytest
import torch

from asyncflow.engines import SamplingParams, TorchEngineConfig, TorchRolloutEngine
from asyncflow.models import ModelConfig, build_model
from asyncflow.pipeline.stages import RolloutStage, StepShape, VersionGate
from asyncflow.queue import ColumnSpec, Controller, QueueConfig, StageSpec, connect

P, N, VOCAB = 2, 2, 24


def _stage(sampling: SamplingParams):
    cfg = QueueConfig(
        columns=[ColumnSpec("prompt_ids", "int64", [8], ragged=True),
                 ColumnSpec("response_ids", "int64", [8], ragged=True),
                 ColumnSpec("behaviour_logprobs", "float32", [8], ragged=True),
                 ColumnSpec("finished", "int64", [])],
        stages=[StageSpec("rollout", ["prompt_ids"]),
                StageSpec("reward", ["response_ids", "behaviour_logprobs", "finished"])],
        capacity_rows=P * N, group_size=N, rows_per_step=P * N, transport="local", timeout_s=5.0)
    q = connect(cfg, 0, controller=Controller(cfg))
    q.put({"prompt_ids": [torch.tensor([1, 5, 6])] * (P * N)}, step=0,
          group_ids=[g for g in range(P) for _ in range(N)])
    model = build_model(ModelConfig.from_hf_dict(dict(
        architectures=["Qwen2ForCausalLM"], vocab_size=VOCAB, hidden_size=16,
        intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        tie_word_embeddings=True, max_position_embeddings=32, eos_token_id=2)))
    model.init_weights(seed=0)
    engine = TorchRolloutEngine(model, TorchEngineConfig(max_batch_size=8, max_seq_len=32))
    shape = StepShape(P, N, num_steps=1, max_staleness=0, timeout_s=5.0, chunk_rows=N)
    stage = RolloutStage(q, engine, VersionGate(engine, 0), sampling, shape,
                         seed=0, batch_size=P * N)
    return stage, q


def test_a_step_the_engine_generates_is_put_onward_and_truncation_is_counted():
    stage, q = _stage(SamplingParams(max_new_tokens=4, temperature=1.0))
    metrics = stage.run_step(0).values()
    batch = q.get("reward", P * N, timeout_s=1.0)
    assert len(batch) == P * N and metrics["rollout/errors"] == 0
    lengths = batch.columns["response_ids"].lengths
    stopped = batch.columns["finished"].bool()  # ended with EOS; the rest hit max_new_tokens
    assert bool((lengths[~stopped] == 4).all())
    assert metrics["response/truncated_frac"] == (~stopped).sum().item() / (P * N)


def test_every_row_cut_at_max_new_tokens_is_counted_as_truncated():
    stage, _ = _stage(SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert stage.run_step(0).values()["response/truncated_frac"] == 1.0


def test_a_step_whose_every_row_is_refused_fails_the_run():
    # a stop token outside the vocabulary: the engine refuses each request on its own
    stage, _ = _stage(SamplingParams(max_new_tokens=4, stop_token_ids=[VOCAB + 5]))
    with pytest.raises(RuntimeError, match="refused all 4 rows of step 0"):
        stage.run_step(0)
