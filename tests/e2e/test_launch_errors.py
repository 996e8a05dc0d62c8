"""The README's command (`scripts/train.sh`) on bad input: one line on stderr, exit code 2.

Mistakes the launcher can see are found before any rank starts, so nothing is written; a user
error that only a rank can see is printed once by the launcher, without torchrun's report."""

import json
import os
import subprocess

import pytest

from .conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def _train_sh(args: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/train.sh", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout_s)


def _bad_model(tmp_path):
    model = tmp_path / "bad_model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32,
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True}))
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": trunc")
    return model


CASES = {  # name: (overrides, given tmp_path; what the line must say)
    "wrong type": (lambda t: ["trainer.optim.lr=fast"], "trainer.optim.lr=fast Value 'fast'"),
    "out of range": (lambda t: ["trainer.optim.lr=-1"], "trainer.optim.lr=-1.0 must be > 0"),
    "unknown key": (lambda t: ["trainer.lr=-1"],
                    "trainer.lr is not a config key; did you mean trainer.optim.lr"),
    "unknown group option": (lambda t: ["placement=nowhere"],
                             "Could not find 'placement/nowhere'"),
    "missing data file": (lambda t: ["task=jsonl", f"task.path={t}/none.jsonl"],
                          "none.jsonl: no such file"),
    "malformed data line": (lambda t: ["task=jsonl", f"task.path={t}/bad.jsonl"],
                            "bad.jsonl:2: not valid JSON"),
    "missing model dir": (lambda t: [f"model.path={t}/no_model"], "no_model' does not exist"),
    "corrupted safetensors": (lambda t: [f"model.path={t}/bad_model"],
                              "model.safetensors: not a readable safetensors file"),
    "missing resume path": (lambda t: [f"resume={t}/no_ckpt"],
                            "no_ckpt: no such checkpoint directory"),
    "existing run dir": (lambda t: ["run.name=taken", "resume=false"],
                         "already holds a run and resume=false"),
    "cuda without a GPU": (lambda t: ["engine.device=cuda"], "engine.device=cuda: no CUDA device"),
    "trainer on cuda without a GPU": (lambda t: ["trainer.device=cuda"],
                                      "trainer.device=cuda: no CUDA device"),
    "unknown trainer device": (lambda t: ["trainer.device=gpu"],
                               "trainer.device='gpu'; use 'auto', 'cpu' or 'cuda'"),
    "unwritable run root": (lambda t: ["run.root=/proc/asyncflow_runs"],
                            "run.root=/proc/asyncflow_runs: cannot write under /proc"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, case):
    make_args, message = CASES[case]
    if case.endswith("without a GPU"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA: the override is valid here")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1=", "answer": "02"}\nnot json\n')
    _bad_model(tmp_path)
    root = tmp_path / "runs"
    (root / "taken").mkdir(parents=True)
    (root / "taken" / "config.yaml").write_text("run: {}\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = make_args(tmp_path)
    out = _train_sh([*([] if any(a.startswith("run.root=") for a in args)
                       else [f"run.root={root}"]), *args])
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr[-3000:]
    assert lines[0].startswith("asyncflow: "), lines
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing new


def test_user_error_after_start_is_printed_once_without_torchruns_report(tmp_path):
    # a tiny-model recipe that cannot reach its threshold: only the ranks find out (they train it)
    out = _train_sh([f"run.root={tmp_path}", "model.tiny.max_steps=5", "model.tiny.eval_every=5",
                     "pipeline.num_steps=2"], timeout_s=240)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [x for x in out.stderr.splitlines() if x.startswith("asyncflow: ")]
    assert errors == [errors[0]] and "below stop_accuracy=0.2" in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "FAILED" not in out.stderr, out.stderr[-3000:]

