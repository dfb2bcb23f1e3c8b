"""Request bodies of ``/v1/completions`` and ``/v1/chat/completions``, validated strictly.

Strict means: a string is not an integer, unknown fields are refused, and OpenAI fields that
rallypoint does not implement are accepted only at their neutral value (``n`` 1, no penalties,
no logprobs...), so a client never gets an answer computed differently from what it asked.
``resume_tokens`` and ``resume_text`` are rallypoint's own: the gateway sends them when it
resumes a request whose driver died, with what the client already received. ``kv_to`` and
``kv_gen`` too: a decode replica asks a prefill replica to prefill a prompt (``max_tokens`` 1)
and send its KV cache to the decode replica's rank ``kv_to`` of the DP group of generation
``kv_gen`` (``worker.disaggregation``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SEED = 2**63 - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: bool = False


class _Sampling(BaseModel):
    """What both endpoints share: sampling, stopping, streaming and the unsupported OpenAI knobs."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    resume_tokens: list[int] = Field(default_factory=list)
    resume_text: str | None = None
    kv_to: int | None = Field(default=None, ge=0)
    kv_gen: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _neutral(self) -> _Sampling:
        if self.n != 1:
            raise ValueError("n: only 1 is supported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ValueError(f"{name}: not supported (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs: not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream: true")
        stops = self.stop_strings
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: up to 4 non-empty strings")
        if (self.kv_to is None) != (self.kv_gen is None):
            raise ValueError("kv_to and kv_gen: give both or neither")
        if self.kv_to is not None and (self.max_tokens != 1 or self.resume_tokens or self.stream):
            raise ValueError("kv_to: a prefill for another replica takes max_tokens 1, no resume_tokens, no stream")
        if self.max_tokens is not None and len(self.resume_tokens) > self.max_tokens:
            raise ValueError(f"resume_tokens: {len(self.resume_tokens)} token(s) are more than "
                             f"max_tokens ({self.max_tokens})")
        return self

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a prompt as text (tokenized with the checkpoint's tokenizer,
    special tokens included) or as token ids (used as they are)."""

    prompt: str | list[int]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _prompt(self) -> CompletionRequest:
        if not self.prompt:
            raise ValueError("prompt: must not be empty")
        if self.echo:
            raise ValueError("echo: not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only 1 is supported")
        if self.suffix:
            raise ValueError("suffix: not supported")
        return self


class ChatMessage(BaseModel):
    """One message; ``content`` is text or a list of ``{"type": "text", "text": ...}`` parts."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for i, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content[{i}]: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: messages rendered with the checkpoint's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    add_generation_prompt: bool = True
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _chat(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools: not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice: not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise ValueError("response_format: only {\"type\": \"text\"} is supported")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_completion_tokens: differs from max_tokens (give one)")
            self.max_tokens = self.max_completion_tokens
        for i, m in enumerate(self.messages):
            try:
                m.text()
            except ValueError as exc:
                raise ValueError(f"messages[{i}].{exc}") from None
        return self

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as the client sent them (extra fields too: a template may read them), with
        text parts joined into one string."""
        return [{**m.model_dump(exclude_unset=True), "content": m.text()} for m in self.messages]


_UNION_MEMBERS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
                  "list[int]": "a list of token ids (integers)", "list[str]": "a list of strings",
                  "list[dict[str,any]]": "a list of content parts"}


def _is_member(part: object) -> bool:
    """Whether a pydantic error location part names the union member tried, not a field."""
    return isinstance(part, str) and (part in _UNION_MEMBERS or part.startswith("function-"))


def _where(loc: list[Any]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def field_error(errors: list[dict[str, Any]]) -> str:
    """One sentence naming the field of the first validation error (pydantic's ``errors()``)."""
    if not errors:
        return "invalid request"
    e = errors[0]
    loc = [p for p in e.get("loc", ()) if p != "body"]
    msg = str(e.get("msg", "invalid"))
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    kind = e.get("type")
    if kind == "json_invalid":
        return f"body is not valid JSON: {e.get('ctx', {}).get('error', msg)}"
    cut = next((i for i, p in enumerate(loc) if _is_member(p)), None)
    if cut is not None:  # a field of several accepted types: say which, not the first one's complaint
        field, members = loc[:cut], []
        for x in errors:
            xl = [p for p in x.get("loc", ()) if p != "body"]
            if xl[:cut] == field and len(xl) > cut and xl[cut] in _UNION_MEMBERS and xl[cut] not in members:
                members.append(xl[cut])
        want = " or ".join(_UNION_MEMBERS[m] for m in members) or "another type"
        return f"{_where(field)}: expected {want}, got {_shown(e.get('input'))}"
    if kind == "missing":
        return f"{_where(loc)}: required"
    if kind == "extra_forbidden":
        return f"{_where(loc)}: unsupported field"
    if not loc and kind in ("model_attributes_type", "dict_type"):
        return "body must be a JSON object"
    return f"{_where(loc)}: {msg} (got {_shown(e.get('input'))})"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
