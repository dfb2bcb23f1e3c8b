"""Committed tokens to text deltas, with stop strings.

Text is decoded from all of a request's generated tokens each time (a token's text can depend on
its neighbours), and only text that can no longer change is sent: a trailing U+FFFD (half of a
UTF-8 character) and a tail that may be the start of a stop string are held back until the next
token settles them. When a stop string appears, the text before it is the last delta and the
request ends with finish reason "stop"; the stop string itself is not sent (OpenAI's behaviour).
"""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """One request's text as its tokens arrive.

    Args:
        decode: token ids to text (special tokens skipped).
        stop: stop strings.
        sent: text already delivered to the client (a resumed request: what the gateway received
            before the driver died), so deltas continue exactly after it.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str], sent: str = "") -> None:
        self.decode, self.stop = decode, [s for s in stop if s]
        self.sent = sent
        self.stopped = False

    def push(self, tokens: list[int], final: bool = False) -> str:
        """The new text, given every generated token so far; ``final`` flushes what was held back.

        After a stop string was found, ``stopped`` is True and later calls return "".
        """
        if self.stopped:
            return ""
        text = self.decode(tokens)
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
