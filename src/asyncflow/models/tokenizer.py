"""Thin wrapper over the `tokenizers` library reading an HF `tokenizer.json`.

Special tokens and the chat template come from `tokenizer_config.json` when present (the HF
layout, or a `chat_template.jinja` beside it). The template is rendered with jinja2 the way
transformers 5 renders it (`transformers.utils.chat_template_utils`), so that the text, and the
ids of `apply_chat_template(..., tokenize=True)`, equal transformers' for the same directory:

- a sandboxed environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension,
  a `{% generation %}` block that renders its body, `raise_exception`, `strftime_now` and a
  `tojson` filter that does not escape HTML;
- the variables `messages` (message keys whose value is None dropped), `tools=None`,
  `documents=None`, `add_generation_prompt` and every special token of the config by name
  (`bos_token`, `eos_token`, ...);
- the rendered text is tokenised without the tokenizer's own special-token template: a template
  that writes `{{ bos_token }}` itself gets one BOS, not two.

A template's `raise_exception` (e.g. "roles must alternate") is a `TokenizerError` naming it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")
"""The special tokens transformers passes to a chat template by name."""


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
        self.chat_template: str | None = _default_template(self.config.get("chat_template"))
        self._compiled = None  # the jinja template, compiled on first use (not picklable)
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

    def batch_decode(self, ids: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return self._tok.decode_batch([list(x) for x in ids],
                                      skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]:
        """The chat rendered with the tokenizer's template (text), or its ids when `tokenize`:
        what transformers' `apply_chat_template` returns for the same arguments."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat_template in tokenizer_config.json")
        import jinja2

        if self._compiled is None:
            self._compiled = _compile(self.chat_template)
        special = {k: _token_text(self.config[k]) for k in _SPECIAL_KEYS
                   if _token_text(self.config.get(k)) is not None}
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            text = self._compiled.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **special)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"the chat template refused the messages: {e}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_compiled": None}

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


def _default_template(template: Any) -> str | None:
    """A config's `chat_template`: one string, or a list of named ones (the `default` is used)."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template


def _compile(template: str):
    """`template` compiled in an environment that renders as transformers' does."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template does not parse: {e} (line {e.lineno})") from None
