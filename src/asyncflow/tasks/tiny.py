"""The tiny default model: a character tokenizer and a Qwen2-style model warm-started on addition.

`prepare_tiny_model` builds both deterministically from a `TinyModelConfig`, fine-tunes the model
on the train stream of the addition task (teacher forcing, loss on the answer and EOS only) and
stops as soon as greedy held-out accuracy first reaches `stop_accuracy` (0.20 by default: low
enough that RL has room to improve it; SFT of these models has a sharp, seed-dependent phase
transition, and stopping at the first check past 0.20 started every seed tried at 0.21-0.30).
The result is an HF directory (config.json, model.safetensors, generation_config.json,
tokenizer.json, tokenizer_config.json, prep.json) under `cache_dir/<name>-<config hash>/` that
loads in transformers. The directory appears atomically (built in a temp dir, then renamed), so an existing
directory with `prep.json` is a complete cache hit and is returned without training.

Shape legend: B batch, P prompt length (with `<bos>`), A answer length + 1 (EOS), T = P + A,
V vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from asyncflow.log import get_logger
from asyncflow.models import CausalLM, ModelConfig, Tokenizer, build_model, save_pretrained
from asyncflow.tasks.arithmetic import AdditionConfig, AdditionTask
from asyncflow.tasks.base import Problem, Task, encode_prompt, split_completions, train_problems

logger = get_logger(__name__)

FORMAT_VERSION = 1
"""Bumped whenever the recipe changes in a way the config hash cannot see."""
MARKER = "prep.json"
"""Written last; its presence marks a complete prepared directory."""
REWARD_RUNTIME_FIELDS = ("reward_timeout_s", "on_reward_failure", "chat_template",
                         "system_prompt")
"""Task fields that say how rewards are run during RL, or how prompts are rendered for models with
a chat template (the tiny tokenizer has none), not what the model learns: left out of the cache
hash, so adding or changing them does not invalidate prepared models."""

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
CHARACTERS = tuple("0123456789") + tuple("+-*/=().") + (" ",)
# transformers 5 loads any `qwen2` checkpoint's tokenizer as Qwen2Tokenizer, which keeps only the
# vocab, merges and post-processor of tokenizer.json and imposes its own normaliser, pre-tokeniser
# and decoder. The tiny tokenizer therefore *is* a Qwen2 byte-level BPE (same pipeline) whose vocab
# holds single characters and no merges: one id per character in both libraries. Characters outside
# the vocab are dropped, as Qwen2Tokenizer (no unk token) does.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# name: (hidden, layers, heads, kv heads, MLP width). On a 2-core CPU, SFT to ~25% greedy takes
# about 20 s (xs), 16 s (s) or 35 s (m).
TINY_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "xs": (64, 2, 4, 2, 176),
    "s": (128, 3, 4, 2, 352),
    "m": (256, 4, 8, 4, 704),
}


class SFTError(ValueError):
    """Supervised warm-start ended at max_steps without reaching stop_accuracy: a recipe the
    user can change (a ValueError: one line and exit code 2, not a traceback)."""


@dataclass
class TinyModelConfig:
    """Recipe of the tiny default model; every field enters the cache directory's hash."""

    size: str = "s"
    """Model size from TINY_SIZES: xs (0.09 M params), s (0.56 M) or m (3.0 M). The default run
    (conf/config.yaml) sets xs: it reaches 0.9 held-out accuracy in fewer seconds of RL."""
    seed: int = 0
    """Seed of the weight init; the SFT data order is the task's train stream from index 0."""
    task: AdditionConfig = field(default_factory=AdditionConfig)
    """The addition task whose train stream is used for SFT and whose held-out list is scored."""
    batch_size: int = 64
    """Problems per SFT step."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up, in steps."""
    eval_every: int = 25
    """Greedy held-out accuracy is computed every this many steps."""
    stop_accuracy: float = 0.20
    """SFT stops at the first evaluation with greedy held-out accuracy >= this."""
    max_steps: int = 3000
    """SFT gives up (SFTError) after this many steps without reaching stop_accuracy."""
    num_threads: int = 1
    """torch threads while preparing; one per process on a shared 2-core machine."""

    def __post_init__(self):
        if self.size not in TINY_SIZES:
            raise ValueError(f"TinyModelConfig.size={self.size!r} is unknown; use one of "
                             f"{sorted(TINY_SIZES)}")
        if isinstance(self.task, dict):  # e.g. rebuilt from prep.json
            self.task = AdditionConfig(**self.task)
        if not 0.0 <= self.stop_accuracy <= 1.0:
            raise ValueError(
                f"TinyModelConfig.stop_accuracy={self.stop_accuracy} must be in [0, 1]")
        for name in ("batch_size", "eval_every", "max_steps", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TinyModelConfig.{name}={getattr(self, name)} must be >= 1")

    @property
    def name(self) -> str:
        """Cache directory name: readable prefix plus a hash of every field that shapes the model."""
        recipe = dataclasses.asdict(self)
        for key in REWARD_RUNTIME_FIELDS:
            del recipe["task"][key]
        blob = json.dumps([FORMAT_VERSION, recipe], sort_keys=True)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
        return f"tiny-add{self.task.num_digits}-{self.size}-seed{self.seed}-{digest}"


def default_cache_dir() -> Path:
    """`$ASYNCFLOW_CACHE` if set, else `<repo>/.cache` (git-ignored), else `./.cache`."""
    if os.environ.get("ASYNCFLOW_CACHE"):
        return Path(os.environ["ASYNCFLOW_CACHE"])
    repo = Path(__file__).resolve().parents[3]
    return repo / ".cache" if (repo / "pyproject.toml").is_file() else Path.cwd() / ".cache"


def build_char_tokenizer() -> Tokenizer:
    """Character tokenizer (Qwen2 byte-level BPE without merges); its template prepends `<bos>`."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # ' ' is spelled U+0120 inside the vocab
    assert all(c in byte_chars or c == " " for c in CHARACTERS)
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARACTERS[:-1] + ("\u0120",))}
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False,
                                  byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 64,
    }
    return Tokenizer(tok, config)


def tiny_model_config(size: str, tokenizer: Tokenizer) -> ModelConfig:
    """Qwen2-style config of the named size (tied embeddings, GQA, q/k/v bias) for `tokenizer`."""
    hidden, layers, heads, kv_heads, ffn = TINY_SIZES[size]
    return ModelConfig.from_hf_dict({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": tokenizer.vocab_size, "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": 64,
        "tie_word_embeddings": True, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    })


@torch.no_grad()
def greedy_completions(model: CausalLM, tokenizer: Tokenizer, problems: list[Problem],
                       max_new_tokens: int = 5) -> list[tuple[str, bool]]:
    """Greedy `(completion, finished)` per problem (see `split_completions`).

    Full forward each step, no KV cache: enough for equal-length prompts, which this needs.
    """
    prompts = [encode_prompt(tokenizer, p.prompt) for p in problems]
    if len({len(p) for p in prompts}) > 1:
        raise ValueError("greedy_completions needs prompts of equal length (fixed-width tasks)")
    ids_BT = torch.tensor(prompts, dtype=torch.long)
    P = ids_BT.shape[1]
    for _ in range(max_new_tokens):
        hidden_BE = model.hidden(ids_BT)[:, -1]
        next_B = model.lm_head(hidden_BE).argmax(-1)
        ids_BT = torch.cat([ids_BT, next_B[:, None]], dim=1)
    eos = [tokenizer.eos_id]
    return split_completions(tokenizer, ids_BT[:, P:].tolist(), eos)


def greedy_accuracy(model: CausalLM, tokenizer: Tokenizer, task: Task,
                    problems: list[Problem]) -> float:
    """Mean reward of greedy completions over `problems`."""
    num_new = len(problems[0].answer) + 1  # answer then EOS
    outs = greedy_completions(model, tokenizer, problems, max_new_tokens=num_new)
    rewards = [task.reward(c, p.answer, f) for (c, f), p in zip(outs, problems, strict=True)]
    return sum(rewards) / len(rewards)


def sft_batch(tokenizer: Tokenizer, problems: list[Problem]) -> tuple[torch.Tensor, int]:
    """Token ids [B, T] of `<bos>prompt answer<eos>` and the prompt length P."""
    rows = [encode_prompt(tokenizer, p.prompt) + tokenizer.encode(p.answer) + [tokenizer.eos_id]
            for p in problems]
    P = len(encode_prompt(tokenizer, problems[0].prompt))
    return torch.tensor(rows, dtype=torch.long), P


def sft_loss(model: CausalLM, ids_BT: torch.Tensor, P: int) -> torch.Tensor:
    """Mean cross-entropy of the answer and EOS tokens under teacher forcing."""
    hidden_BAE = model.hidden(ids_BT[:, :-1])[:, P - 1:]
    logits_BAV = model.lm_head(hidden_BAE)
    return F.cross_entropy(logits_BAV.flatten(0, 1), ids_BT[:, P:].flatten())


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_tiny_model(cfg: TinyModelConfig, tokenizer: Tokenizer) -> tuple[CausalLM, dict]:
    """Build and warm-start the model; returns it and the prep record (steps, accuracy, seconds)."""
    start = time.perf_counter()
    task = AdditionTask(cfg.task)
    heldout = task.heldout_problems()
    model = build_model(tiny_model_config(cfg.size, tokenizer))
    model.init_weights(seed=cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / max(1, cfg.warmup_steps)))
    accuracy, loss = 0.0, float("nan")
    for step in range(1, cfg.max_steps + 1):
        model.train()
        ids_BT, P = sft_batch(tokenizer, train_problems(task, (step - 1) * cfg.batch_size,
                                                         cfg.batch_size))
        loss_t = sft_loss(model, ids_BT, P)
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            model.eval()
            loss = loss_t.item()
            accuracy = greedy_accuracy(model, tokenizer, task, heldout)
            logger.info("tiny SFT step %d loss %.4f held-out greedy accuracy %.3f", step, loss,
                        accuracy)
            if accuracy >= cfg.stop_accuracy:
                break
    else:
        raise SFTError(
            f"tiny SFT ({cfg.size}, seed {cfg.seed}) reached held-out accuracy {accuracy:.3f} "
            f"after max_steps={cfg.max_steps}, below stop_accuracy={cfg.stop_accuracy}; raise "
            f"max_steps or lr, or lower stop_accuracy"
        )
    model.eval()
    record = {
        "name": cfg.name, "format_version": FORMAT_VERSION, "size": cfg.size, "seed": cfg.seed,
        "steps": step, "heldout_accuracy": accuracy, "loss": loss,
        "seconds": round(time.perf_counter() - start, 3),
        "num_params": sum(p.numel() for p in model.parameters()),
        "config": dataclasses.asdict(cfg),
    }
    return model, record


def prepare_tiny_model(cfg: TinyModelConfig | None = None, cache_dir: str | Path | None = None
                       ) -> Path:
    """Return the prepared directory for `cfg`, training and saving it on a cache miss."""
    cfg = cfg or TinyModelConfig()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / cfg.name
    if (final / MARKER).is_file():
        logger.info("tiny model cache hit: %s", final)
        return final
    if final.exists():
        raise ValueError(f"{final} exists without {MARKER} (not made by prepare_tiny_model?); "
                         f"delete it and prepare again")
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info("preparing tiny model %s (threshold %.2f)", cfg.name, cfg.stop_accuracy)
    tokenizer = build_char_tokenizer()
    with _torch_threads(cfg.num_threads):
        model, record = train_tiny_model(cfg, tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cfg.name}.tmp-", dir=cache_dir))
    try:
        save_pretrained(model, tmp)
        tokenizer.save(tmp)
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                      "pad_token_id": tokenizer.pad_id, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        for file in tmp.iterdir():  # mkdtemp and safetensors create owner-only files
            file.chmod(0o644)
        tmp.chmod(0o755)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first; its directory is equally valid
            if not (final / MARKER).is_file():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("tiny model prepared in %.1f s: %d steps, held-out accuracy %.3f -> %s",
                record["seconds"], record["steps"], record["heldout_accuracy"], final)
    return final
