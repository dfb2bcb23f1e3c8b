"""The local control channel over a real Unix socket (daemon's end, worker's end): hello,
heartbeats, adopt, bad input."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from rallypoint.daemon.channel import ChannelServer, channel_address
from rallypoint.worker.channel import ChannelClient


def wait(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_hello_beats_adopt_and_malformed_lines(tmp_path: Path) -> None:
    seen: list[dict] = []
    server = ChannelServer(channel_address(tmp_path, "a"), lambda peer, msg: seen.append(msg))
    adopted = threading.Event()
    got: dict = {}
    client = ChannelClient(server.address, "spare", None, {"adopt": lambda m: (got.update(m), adopted.set())})
    try:
        wait(lambda: os.getpid() in server.peers)
        peer = server.peers[os.getpid()]
        assert peer.role == "spare" and peer.local_rank is None
        client.sock.sendall(b"{not json\n")  # logged and skipped; the connection stays up
        client.send({"op": "beat", "pid": os.getpid(), "state": "serving", "gen": 3})
        wait(lambda: peer.last.get("gen") == 3)
        assert peer.send({"op": "adopt", "local_rank": 1, "after_gen": 3})
        assert adopted.wait(5) and got["local_rank"] == 1
        assert [m["op"] for m in seen] == ["hello", "beat"]
        client.close()
        wait(lambda: os.getpid() not in server.peers)  # a worker that goes away is forgotten
    finally:
        client.close()
        server.close()
    assert not Path(server.address).exists()


def test_no_daemon_listening_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        ChannelClient(str(tmp_path / "nobody.sock"), "seat", 0)


def test_long_state_dir_falls_back_to_an_abstract_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    address = channel_address(deep, "a")
    assert address.startswith("@rallyd-a-")
    server = ChannelServer(address)
    try:
        client = ChannelClient(address, "seat", 0)
        wait(lambda: os.getpid() in server.peers)
        assert server.peers[os.getpid()].local_rank == 0
        client.close()
    finally:
        server.close()
