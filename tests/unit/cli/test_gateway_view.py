"""How rallyctl status shows a node's gateway (pure logic over a node status)."""

from __future__ import annotations

from rallypoint.cli.views import gateway_view


def test_the_gateway_column_says_thread_processes_and_their_trouble() -> None:
    url = "http://10.0.0.5:8437"
    assert gateway_view(None) is None and gateway_view({"gateway": None}) is None  # no status, or no gateway
    assert gateway_view({"gateway": url, "gateway_processes": None}) == "thread"
    full = {"processes": 4, "alive": 4, "restarts": 0, "requests": [3, 5, 2, 4]}
    assert gateway_view({"gateway": url, "gateway_processes": full}) == "4 processes"
    hurt = {**full, "alive": 3, "restarts": 1}
    assert gateway_view({"gateway": url, "gateway_processes": hurt}) == "3 of 4 processes, 1 restart"
    assert gateway_view({"gateway": url, "gateway_processes": {**full, "restarts": 2}}) == "4 processes, 2 restarts"
