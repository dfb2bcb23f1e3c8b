"""A checkpoint's tokenizer: its ``tokenizer.json`` and chat template, run as transformers runs them.

``load_tokenizer(dir)`` gives a ``Tokenizer`` whose ``encode(text)`` equals
``AutoTokenizer.from_pretrained(dir)(text)["input_ids"]``: the ``tokenizers`` library runs
``tokenizer.json`` with its post-processor, so a Llama 3 or byte-level checkpoint gets its BOS.
``add_bos_token`` / ``add_eos_token`` in ``tokenizer_config.json`` are ignored, as transformers 5
ignores them when a ``tokenizer.json`` is there (the post-processor already says it).
``apply_chat_template`` renders the checkpoint's Jinja chat template in the sandbox and with the
helpers transformers gives templates.

Stop tokens (``eos_ids``) are the tokenizer's ``eos_token`` and every ``eos_token_id`` of
``generation_config.json`` and ``config.json`` (each may be a list): instruct models end a turn
with a token that is not the tokenizer's EOS (Llama 3's ``<|eot_id|>``).

Only fast tokenizers (``tokenizer.json``) are read. transformers 5 rebuilds the normalizer and
pre-tokenizer of some classes (``LlamaTokenizer``, ``Qwen2Tokenizer``) from code rather than from
the file; that rebuild is not repeated here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend

from rallypoint.errors import CheckpointError, RallypointError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class NoChatTemplate(CheckpointError, ValueError):
    """The checkpoint has no chat template, so chat messages cannot be turned into a prompt."""


class ChatTemplateError(RallypointError, ValueError):
    """The chat template refused the messages (its ``raise_exception``, or messages it cannot render)."""


class Tokenizer:
    """Text to token ids and back, stop tokens and chat prompts of one checkpoint.

    Attributes:
        bos_id: the BOS token's id (None when the tokenizer has none).
        eos_ids: every token id that ends a generation.
        eos_id: the first of them (the tokenizer's own EOS when it has one), or None.
        vocab_size: the tokenizer's vocabulary, added tokens included (may be below the model's).
        special_tokens: ``bos_token``, ``eos_token``, ... as text, the variables a chat template sees.
        chat_template: the Jinja source, or None.
        source: the directory it was read from, for errors.
    """

    def __init__(self, backend: Backend, special_tokens: dict[str, str], eos_ids: Iterable[int] = (),
                 bos_id: int | None = None, chat_template: str | None = None, source: str = "<tokenizer>") -> None:
        self.backend, self.special_tokens, self.source = backend, dict(special_tokens), source
        backend.no_truncation()
        backend.no_padding()
        ids = [i for i in [self._id("eos_token"), *eos_ids] if i is not None]
        self.eos_ids = frozenset(ids)
        self.eos_id = ids[0] if ids else None
        self.bos_id = self._id("bos_token") if self._id("bos_token") is not None else bos_id
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self._template = _compile(chat_template, source) if chat_template is not None else None

    def _id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, with the special tokens (BOS) the post-processor adds unless told not to."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens skipped (ids outside the vocabulary too)."""
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages``, as ``apply_chat_template(..., tokenize=False)`` renders it.

        The text already holds the special tokens the template writes (BOS, turn markers): encode it
        with ``add_special_tokens=False`` (``encode_chat`` does).

        Raises:
            NoChatTemplate: the checkpoint has none.
            ChatTemplateError: the template refused the messages.
        """
        if self._template is None:
            raise NoChatTemplate(f"{self.source}: the checkpoint has no chat template (neither {CHAT_TEMPLATE_FILE} "
                                 f"nor a chat_template in {TOKENIZER_CONFIG})")
        if not messages or not all(isinstance(m, dict) for m in messages):
            raise ChatTemplateError(f"{self.source}: expected a non-empty list of message objects, got {messages!r}")
        chat = _alias_reasoning([{k: _plain(v) for k, v in m.items() if v is not None} for m in messages])
        try:
            return self._template.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as exc:
            raise ChatTemplateError(f"{self.source}: the chat template refused the messages: "
                                    f"{type(exc).__name__}: {exc}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat prompt (the template's own special tokens, none added)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of checkpoint directory ``path``.

    Raises:
        CheckpointError: no ``tokenizer.json``, a file that does not parse, or a chat template that
            does not compile.
    """
    path = Path(path)
    file = path / TOKENIZER_FILE
    if not file.exists():
        raise CheckpointError(f"{path}: no {TOKENIZER_FILE} (only fast tokenizers are supported)")
    try:
        backend = Backend.from_file(str(file))
    except Exception as exc:  # tokenizers raises plain Exceptions on a bad file
        raise CheckpointError(f"{file}: not a tokenizers file: {exc}") from None
    cfg = _json(path / TOKENIZER_CONFIG)
    specials = _special_tokens(cfg)
    if "added_tokens_decoder" not in cfg:  # transformers then lets the legacy file override
        specials.update(_special_tokens(_json(path / SPECIAL_TOKENS_MAP)))
    generation, model = _json(path / GENERATION_CONFIG), _json(path / MODEL_CONFIG)
    eos = [*_ids(generation, "eos_token_id", path / GENERATION_CONFIG), *_ids(model, "eos_token_id", path / MODEL_CONFIG)]
    bos = [*_ids(generation, "bos_token_id", path / GENERATION_CONFIG), *_ids(model, "bos_token_id", path / MODEL_CONFIG)]
    return Tokenizer(backend, specials, eos, bos[0] if bos else None, _chat_template(path, cfg), str(path))


# -- reading the files ---------------------------------------------------------------------

def _json(file: Path) -> dict[str, Any]:
    if not file.exists():
        return {}
    try:
        d = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot read it as JSON: {exc}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return d


def _special_tokens(cfg: dict[str, Any]) -> dict[str, str]:
    """``*_token`` entries as text (transformers saves some as ``{"content": ...}`` objects).

    These are transformers' ``special_tokens_map`` (the standard names plus model-specific ones),
    which it passes to chat templates as variables.
    """
    out = {}
    for key, raw in cfg.items():
        value = raw["content"] if isinstance(raw, dict) and isinstance(raw.get("content"), str) else raw
        if key.endswith("_token") and isinstance(value, str):
            out[key] = value
    return out


def _ids(cfg: dict[str, Any], key: str, file: Path) -> list[int]:
    value = cfg.get(key)
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise CheckpointError(f"{file}: {key} must be a token id or a list of them, got {value!r}")
    return ids


def _chat_template(path: Path, cfg: dict[str, Any]) -> str | None:
    """``chat_template.jinja`` (transformers 5 saves it there), else ``tokenizer_config.json``'s, default entry."""
    file = path / CHAT_TEMPLATE_FILE
    if file.exists():
        return file.read_text(encoding="utf-8")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        template = template.get("default")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{path / TOKENIZER_CONFIG}: chat_template must be a string, got {type(template).__name__}")
    return template


# -- the Jinja environment transformers renders chat templates in ----------------------------

class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): renders its body."""

    # jinja2's Extension declares ``tags`` as a plain (instance) set attribute, so no ClassVar here
    tags = {"generation"}  # noqa: RUF012

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes, as transformers' sandbox does."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """Plain ``json.dumps`` (Jinja's own ``tojson`` escapes HTML characters)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=dict, namespace=_Namespace)
    return env


def _compile(source: str, where: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as exc:
        raise CheckpointError(f"{where}: the chat template does not compile: {exc}") from None


def _plain(value: Any) -> Any:
    """A copy made of JSON types only (what the sandboxed template may see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``reasoning_content`` and ``thinking`` from whichever reasoning field a message has, as transformers does."""
    out = []
    for m in chat:
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return out
