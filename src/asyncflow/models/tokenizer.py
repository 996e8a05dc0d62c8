"""Thin wrapper over the `tokenizers` library reading an HF `tokenizer.json`.

Special tokens and the chat template come from `tokenizer_config.json` when present (the HF
layout); the template is rendered with jinja2 the way transformers renders it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


class TokenizerError(ValueError):
    """A tokenizer directory that is missing files or does not fit the model."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, config: dict[str, Any] | None = None):
        self._tok = tok
        self.config = config or {}
        self.chat_template: str | None = self.config.get("chat_template")
        self.bos_id = self._special_id("bos_token")
        self.eos_id = self._special_id("eos_token")
        self.pad_id = self._special_id("pad_token")

    def _special_id(self, key: str) -> int | None:
        text = _token_text(self.config.get(key))
        return None if text is None else self._tok.token_to_id(text)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"{file}: no such file (a model directory needs tokenizer.json)")
        try:
            tok = _HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust error type is not exported
            raise TokenizerError(f"{file}: cannot be read as a tokenizers file ({e})") from None
        config_file = file.parent / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template_file = file.parent / "chat_template.jinja"
        if "chat_template" not in config and template_file.is_file():
            config["chat_template"] = template_file.read_text()
        return cls(tok, config)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (added tokens included)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat_template in tokenizer_config.json")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        special = {k: _token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special
        )

    def check_fits(self, vocab_size: int, source: str = "model") -> None:
        """Refuse a tokenizer that can emit ids the model has no embedding for."""
        if self.vocab_size > vocab_size:
            raise TokenizerError(
                f"tokenizer has {self.vocab_size} tokens but the {source} embeds only "
                f"{vocab_size}: ids >= {vocab_size} would index past the embedding"
            )

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2) + "\n")
