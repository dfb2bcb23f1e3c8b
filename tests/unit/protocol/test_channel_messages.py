"""The local channel's messages: one JSON object a line, and what is not one."""

from __future__ import annotations

import pytest

from rallypoint.protocol import channel as msgs


def test_messages_round_trip_one_line_each() -> None:
    for m in (msgs.hello(7, msgs.SPARE, None), msgs.adopt(1, 3, api_port=0, api_url_file="f"),
              msgs.beat(7, "serving", 3, 0, 0, True, 0, 1, {"ok": 2}, "http://x")):
        line = msgs.encode(m)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert msgs.decode(line) == m
    assert msgs.sockaddr("@rallyd-a") == "\0rallyd-a" and msgs.sockaddr("/run/r.sock") == "/run/r.sock"


@pytest.mark.parametrize("raw", [b"{not json\n", b"[1]\n", b'{"pid": 1}\n', b'{"op": ["x"]}\n', b"\xff\n"])
def test_what_is_not_a_message_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        msgs.decode(raw)
