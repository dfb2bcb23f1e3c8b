"""The HTTP servers take a client hanging up mid-answer as normal, and any other error as one."""

from __future__ import annotations

import pytest

from rallypoint.http_json import JsonHandler, JsonServer


def test_a_client_hanging_up_prints_nothing_and_a_real_error_its_traceback(capsys: pytest.CaptureFixture) -> None:
    server = JsonServer(("127.0.0.1", 0), JsonHandler)
    try:
        for exc in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset by peer")):
            try:
                raise exc
            except ConnectionError:
                server.handle_error(None, ("127.0.0.1", 1))
        assert capsys.readouterr().err == ""
        try:
            raise ValueError("a bug in a handler")
        except ValueError:
            server.handle_error(None, ("127.0.0.1", 1))
        assert "ValueError: a bug in a handler" in capsys.readouterr().err
    finally:
        server.server_close()
