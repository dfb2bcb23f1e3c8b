"""Bad input, generated (hypothesis): nothing that can arrive from etcd, the local channel or an HTTP
client crashes its reader. Every etcd record parser returns a record or raises ``MalformedRecord``
naming the key; the channel's decoder returns a message or raises ``ValueError``; the API answers
a malformed body with a 400 whose message names what is wrong, never a 500."""

from __future__ import annotations

import json
import signal
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from rallypoint.comm.diagnosis import ProgressRecord
from rallypoint.errors import MalformedRecord
from rallypoint.protocol import channel
from rallypoint.protocol.orders import AbortOrder
from rallypoint.recovery.coordinator import parse_diagnosis, parse_kill_order
from rallypoint.recovery.events import Event
from rallypoint.rendezvous.records import ClusterSpec, NodeRecord, Plan
from rallypoint.worker.api import Frontend, build_app
from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.requests import RequestQueue
from rallypoint.worker.tokenizer import load_tokenizer

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def near(valid: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts like ``valid`` with one or two fields dropped or replaced by any JSON value (the rest
    valid, so the parser gets past them), plus a stray field now and then."""
    def build(hit: set[str], values: list[Any], drop: list[bool], extra: dict[str, Any]) -> dict[str, Any]:
        out = dict(valid)
        for name, value, gone in zip(sorted(hit), values, drop):
            if gone:
                out.pop(name)
            else:
                out[name] = value
        return {**out, **extra}

    return st.builds(build, st.sets(st.sampled_from(sorted(valid)), min_size=1, max_size=2),
                     st.lists(json_values, min_size=2, max_size=2), st.lists(st.booleans(), min_size=2, max_size=2),
                     st.dictionaries(st.text(max_size=6), json_values, max_size=1))


def raw(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Bytes a reader may meet: garbage, any JSON, or a near miss of a valid record."""
    return st.one_of(st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode()),
                     near(valid).map(lambda d: json.dumps(d).encode()))


def only_malformed(parse: Callable[[bytes], Any], key: str, data: bytes) -> None:
    try:
        parse(data)
    except MalformedRecord as exc:
        assert exc.key == key and repr(key) in str(exc) and exc.why.strip()


KEY = "/rallypoint/c/nodes/n1"
NODE = json.loads(NodeRecord("n1", "h", "10.0.0.1", 2, 2, "1", 42, 1.0, False, (1,)).to_json())
PLAN = json.loads(Plan(3, 2, 1, 1, (), ("a",), "test", "a", 1.0).to_json()) | {
    "ranks": [[0, "a", 0], [1, "a", 1]], "world_size": 2}
EVENT = {"gen": 3, "kind": "rank_failed", "at": 1.5, "by": "a", "detail": {"rank": 1}, "pid": 7}
PROGRESS = {"seat": "a/0", "gen": 3, "rank": 0, "pid": 7, "host": "h", "time": 1.0, "groups": {"tp": [4, 4]}}
DIAGNOSIS = {"gen": 3, "group": "tp[0,1]@g3", "trigger": "deadline", "suspects": [{"seat": "a/1", "kind": "slow"}]}


DIAGNOSIS_KEY = "/rallypoint/c/diagnosis/3/a/1"
RECORDS: dict[str, tuple[Callable[[bytes], Any], str, dict[str, Any]]] = {  # parse, the key it names, a valid one
    "node": (lambda d: NodeRecord.from_json(KEY, d), KEY, NODE),
    "cluster_spec": (lambda d: ClusterSpec.from_json(KEY, d), KEY,
                     {"tp": 2, "pp": 1, "dp": 0, "min_nodes": 1, "max_nodes": 0}),
    "plan": (lambda d: Plan.from_json(KEY, d), KEY, PLAN),
    "abort_order": (lambda d: AbortOrder.from_json(KEY, d), KEY, {"gen": 3, "ranks": [1], "reason": "peer died"}),
    "event": (lambda d: Event.from_json(KEY, d), KEY, EVENT),
    "progress": (lambda d: ProgressRecord.from_json(KEY, d), KEY, PROGRESS),
    "diagnosis": (lambda d: parse_diagnosis("a", DIAGNOSIS_KEY, d), DIAGNOSIS_KEY, DIAGNOSIS),
}


@pytest.mark.parametrize("record", sorted(RECORDS))
@SETTINGS
@given(data=st.data())
def test_records(record: str, data: st.DataObject) -> None:
    parse, key, valid = RECORDS[record]
    only_malformed(parse, key, data.draw(raw(valid), label="value"))


@pytest.mark.parametrize("record, field, value", [("plan", "members", [[]]), ("progress", "groups", None),
                                                   ("node", "bad_seats", 5)])
def test_the_crashes_generation_found_stay_fixed(record: str, field: str, value: Any) -> None:
    """Near misses the generator once found (or, for bad_seats, reading found) to crash a reader."""
    parse, key, valid = RECORDS[record]
    with pytest.raises(MalformedRecord, match=field):
        parse(json.dumps({**valid, field: value}).encode())


@SETTINGS
@given(st.text(alphabet=string.printable, max_size=12), st.binary(max_size=12) | st.sampled_from([b"KILL", b"sigstop"]))
def test_kill_orders(seat: str, data: bytes) -> None:
    key = f"/rallypoint/c/control/kill/a/{seat}"
    try:
        local, sig = parse_kill_order(key, data)
    except MalformedRecord as exc:
        assert exc.key == key and repr(key) in str(exc)
    else:
        assert isinstance(local, int) and isinstance(sig, signal.Signals)


@SETTINGS
@given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_channel_lines(data: bytes) -> None:
    try:
        msg = channel.decode(data)
    except ValueError:
        return
    assert isinstance(msg, dict) and isinstance(msg["op"], str)


# -- the API ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    """A replica's routes over a queue that refuses everything (draining): a body that passes
    validation gets a 503 at once, one that does not gets its 400."""
    tok = load_tokenizer(make_model(Path(tmp_path_factory.mktemp("m")) / "m", "tiny"))
    queue = RequestQueue()
    queue.close("replica 0 is draining: property test")
    fe = Frontend(queue=queue, tokenizer=tok, vocab_size=320, state=lambda: ("serving", 1), model="m")
    return TestClient(build_app(fe), raise_server_exceptions=False)


COMPLETION = {"model": "m", "prompt": "hi", "max_tokens": 4, "temperature": 0.0, "stream": False, "seed": 1,
              "top_p": 1.0, "stop": ["x"], "stream_options": {"include_usage": True}}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}


@SETTINGS
@given(near(COMPLETION) | json_values)
def test_completion_bodies(api: TestClient, body: Any) -> None:
    answer(api, "/v1/completions", body)


@SETTINGS
@given(near(CHAT) | json_values)
def test_chat_bodies(api: TestClient, body: Any) -> None:
    answer(api, "/v1/chat/completions", body)


def answer(api: TestClient, path: str, body: Any) -> None:
    r = api.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code in (400, 503), (r.status_code, body, r.text)
    message = r.json()["error"]["message"]
    assert message.strip()
    if r.status_code == 503:
        assert "draining" in message
