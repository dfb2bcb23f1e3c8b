"""OpenAI-shaped answers: completions and chat completions, whole or as stream chunks, and errors.

Every choice also carries ``token_ids``, the tokens the text came from: rallypoint's gateway
resumes a request from them when its driver dies, and a client can check them. The OpenAI client
ignores the extra field.
"""

from __future__ import annotations

from typing import Any

import orjson

COMPLETION, CHAT = "text_completion", "chat.completion"


def model_list(model: str, created: float) -> dict[str, Any]:
    """``/v1/models``: the one checkpoint a deployment serves."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": int(created),
                                        "owned_by": "rallypoint"}]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(kind: str, rid: str, created: int, model: str, text: str, tokens: list[int],
          finish: str | None, role: bool = False) -> dict[str, Any]:
    """One streamed chunk; ``role`` marks a chat stream's first chunk (``delta.role``)."""
    if kind == COMPLETION:
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                                  "token_ids": tokens}
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [choice]}
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if text or role:
        delta["content"] = text
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
                         "token_ids": tokens}]}


def usage_chunk(kind: str, rid: str, created: int, model: str, used: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream that asked for ``stream_options.include_usage``: no choices."""
    obj = "text_completion" if kind == COMPLETION else "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": used}


def whole(kind: str, rid: str, created: int, model: str, text: str, tokens: list[int], finish: str | None,
          used: dict[str, int], **extra: Any) -> dict[str, Any]:
    """A non-streamed answer."""
    if kind == COMPLETION:
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                                  "token_ids": tokens}
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [choice], "usage": used, **extra}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish, "token_ids": tokens}],
            "usage": used, **extra}


def choice_parts(obj: dict[str, Any]) -> tuple[str, list[int], str | None]:
    """(text, token ids, finish reason) of a chunk or a whole answer of either kind.

    Raises:
        KeyError, IndexError, TypeError: not an answer of this shape.
    """
    c = obj["choices"][0]
    if "text" in c:
        text = c["text"]
    elif "delta" in c:
        text = c["delta"].get("content") or ""
    else:
        text = (c["message"] or {}).get("content") or ""
    tokens = c.get("token_ids") or []
    if not isinstance(text, str) or not isinstance(tokens, list):
        raise TypeError("choice text or token_ids of the wrong type")
    return text, tokens, c.get("finish_reason")


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable",
               504: "timeout"}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": param,
                      "code": code if code is not None else status}}


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line (orjson: every streamed token is
    one of these, twice, on the way through the gateway)."""
    return b"data: " + (payload.encode() if isinstance(payload, str) else orjson.dumps(payload)) + b"\n\n"


KEEPALIVE = b": keepalive\n\n"  # an SSE comment: clients ignore it, readers see the stream alive
DONE = sse("[DONE]")
