"""What rallyd and its workers say on the node's local channel: one JSON object a line.

etcd carries what the whole cluster must agree on (plans, abort orders); this channel carries what
only this node's daemon and its own processes need, and keeps working when etcd is away:

    worker -> daemon   {"op": "hello", "pid": P, "role": "spare"|"seat", "local_rank": L|null}
                       {"op": "beat", "pid": P, "state": "serving", "gen": G, "in_flight": N, ...}
    daemon -> worker   {"op": "adopt", "local_rank": L, "after_gen": G, "api_port": N, "api_url_file": F}

A warm spare says hello and then waits for ``adopt``; the daemon hands it the seat of a failed
worker, which saves the replacement's interpreter start, ``import torch`` and CUDA set-up.
The daemon's end (``daemon.channel``) and the worker's (``worker.channel``) share only this module.
"""

from __future__ import annotations

import json
from typing import Any

HELLO, BEAT, ADOPT = "hello", "beat", "adopt"
SPARE, SEAT = "spare", "seat"  # a hello's role
MAX_LINE = 1 << 16  # a longer line is not a message: the daemon hangs up


def sockaddr(address: str) -> str:
    """The ``bind``/``connect`` address of a channel: ``@name`` is an abstract socket."""
    return "\0" + address[1:] if address.startswith("@") else address


def encode(msg: dict[str, Any]) -> bytes:
    """One message as the line sent on the socket."""
    return (json.dumps(msg) + "\n").encode()


def decode(raw: bytes) -> dict[str, Any]:
    """One line read from the socket as a message.

    Raises:
        ValueError: not a JSON object with a string ``op``.
    """
    msg = json.loads(raw)
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ValueError("not a message: a JSON object with a string 'op' is expected")
    return msg


def hello(pid: int, role: str, local_rank: int | None) -> dict[str, Any]:
    """A worker's first message: who it is, and its seat (None for a spare)."""
    return {"op": HELLO, "pid": pid, "role": role, "local_rank": local_rank}


def beat(pid: int, state: str, gen: int, local_rank: int | None, replica: int, driver: bool,
         waiting: int, in_flight: int, counts: dict[str, int], api: str | None,
         role: str = "colocated") -> dict[str, Any]:
    """A worker's heartbeat: what rallyd publishes in ``status/nodes/<node>``, routes requests by,
    and counts in its metrics. ``role``: ``prefill``, ``decode`` or ``colocated``."""
    return {"op": BEAT, "pid": pid, "state": state, "gen": gen, "local_rank": local_rank, "replica": replica,
            "driver": driver, "waiting": waiting, "in_flight": in_flight, "counts": counts, "api": api, "role": role}


def adopt(local_rank: int, after_gen: int, **seat: Any) -> dict[str, Any]:
    """The daemon hands a spare the seat ``local_rank``; it joins plans newer than ``after_gen``.
    ``seat`` carries the seat's API port and URL file (``WorkerCommand.seat_params``)."""
    return {"op": ADOPT, "local_rank": local_rank, "after_gen": after_gen, **seat}
