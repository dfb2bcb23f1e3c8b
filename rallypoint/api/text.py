"""Committed tokens to text deltas, with stop strings.

Text grows by incremental detokenization (as vLLM does it): each new token is decoded together
with a few tokens before it, so a tokenizer whose pieces depend on their neighbours (a leading
space, a byte-level character split over two tokens) gives the same text as decoding everything
at once, at a cost that does not grow with the length of the completion. Only text that can no
longer change is sent: a trailing U+FFFD (half of a UTF-8 character) and a tail that may be the
start of a stop string are held back until the next token settles them. When a stop string
appears, the text before it is the last delta and the request ends with finish reason "stop";
the stop string itself is not sent (OpenAI's behaviour).
"""

from __future__ import annotations

from collections.abc import Callable

_CONTEXT = 5  # tokens decoded before the new ones, for the tokenizers whose pieces look around


class TextStream:
    """One request's text as its tokens arrive.

    Args:
        decode: token ids to text (special tokens skipped).
        stop: stop strings.
        sent: text already delivered to the client (a resumed request: what the gateway received
            before the driver died), so deltas continue exactly after it.
        resumed: the tokens that text came from (the request's ``resume_tokens``).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str], sent: str = "",
                 resumed: list[int] | None = None) -> None:
        self.decode, self.stop = decode, [s for s in stop if s]
        resumed = resumed or []
        self.text = decode(resumed) if resumed else ""  # every token's text so far
        if not self.text.startswith(sent):
            self.text = sent  # what the client has is the truth the deltas continue from
        self.sent = sent
        self._prefix = max(0, len(resumed) - _CONTEXT)
        self._read = len(resumed)
        self.stopped = False

    def push(self, tokens: list[int], final: bool = False) -> str:
        """The new text, given every generated token so far; ``final`` flushes what was held back.

        After a stop string was found, ``stopped`` is True and later calls return "".
        """
        if self.stopped:
            return ""
        self._extend(tokens, final)
        text = self.text
        if self.stop:
            start = max(0, len(self.sent) - max(map(len, self.stop)) + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._emit(text[:min(hits)])
        end = len(text)
        if not final:
            while end > len(self.sent) and text[end - 1] == "\ufffd":
                end -= 1
            end -= self._partial_stop(text[:end])
        return self._emit(text[:end])

    def _extend(self, tokens: list[int], final: bool) -> None:
        if len(tokens) <= self._read and not final:
            return
        before = self.decode(tokens[self._prefix:self._read])
        after = self.decode(tokens[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = max(self._prefix, len(tokens) - _CONTEXT), len(tokens)

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, upto: str) -> str:
        delta = upto[len(self.sent):]
        self.sent += delta
        return delta
