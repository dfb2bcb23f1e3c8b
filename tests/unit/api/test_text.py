"""Text deltas from committed tokens: stop strings and half characters are held back until the
next token settles them, and what was sent before a resume is not sent again (pure logic)."""

from __future__ import annotations

from rallypoint.api.text import TextStream


def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def push_all(stream: TextStream, data: bytes) -> list[str]:
    out, ids = [], []
    for b in data:
        ids.append(b)
        out.append(stream.push(ids))
        if stream.stopped:
            break
    else:
        out.append(stream.push(ids, final=True))
    return out


def test_a_stop_string_ends_the_text_before_it_even_across_tokens() -> None:
    s = TextStream(decode, ["END"])
    deltas = push_all(s, b"hello ENDING")
    assert "".join(deltas) == "hello " and s.stopped
    assert "E" not in "".join(deltas[:-1])  # the possible start of the stop string was held back


def test_a_false_start_of_a_stop_string_is_released() -> None:
    s = TextStream(decode, ["END"])
    assert "".join(push_all(s, b"an ENigma")) == "an ENigma" and not s.stopped


def test_the_earliest_of_several_stop_strings_wins() -> None:
    s = TextStream(decode, ["zz", "b"])
    assert "".join(push_all(s, b"aabzz")) == "aa"


def test_half_a_utf8_character_waits_for_its_other_half() -> None:
    s = TextStream(decode, [])
    deltas = push_all(s, "é!".encode())
    assert deltas[0] == "" and "".join(deltas) == "é!" and "\ufffd" not in "".join(deltas)


def test_a_resumed_stream_goes_on_after_what_was_sent() -> None:
    s = TextStream(decode, ["."], sent="abc", resumed=list(b"abc"))
    assert s.push(list(b"abcde")) == "de"
    assert s.push(list(b"abcdef.g")) == "f" and s.stopped


def test_incremental_text_equals_decoding_everything_at_once() -> None:
    """Decoding a few tokens of context at a time gives the text of the whole list (a held-back
    half character included), for text of every width of UTF-8 character."""
    data = "naïve café, 日本語 ✓ and emoji 🎉 ok".encode()
    s = TextStream(decode, [])
    assert "".join(push_all(s, data)) == data.decode()
    resumed = list(data[:13])  # cut inside a character
    r = TextStream(decode, [], sent=decode(resumed).rstrip("\ufffd"), resumed=resumed)
    assert r.sent + "".join(push_all(r, data)[13:]) == data.decode()
