"""The gateway as an OpenAI user meets it: the official ``openai`` client against one real rallyd
(etcd, a worker process serving the tiny checkpoint on CPU) with an API key.

Completions and chat, whole and streamed, ``stop`` strings, ``seed``/``temperature``/``top_p``,
``usage`` counted with the checkpoint's own tokenizer (BOS included), OpenAI-shaped errors that
name the field, and the key required on every route but ``/health`` (the driver's own API too).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from rallypoint.testing.daemons import DaemonProcess, daemon_args, wait_file, wait_for
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.tokenizer import load_tokenizer

KEY = "sk-rallypoint-test"


class Served:
    def __init__(self, gateway: str, driver: str, model: Path) -> None:
        self.gateway, self.driver, self.model = gateway, driver, model
        self.name = model.name
        self.client = openai.OpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0, timeout=60)
        self.tok = load_tokenizer(model)


@pytest.fixture(scope="module")
def served(etcd: EtcdCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("openai")
    model = make_model(tmp / "tiny-chat", "tiny", seed=4)
    args = daemon_args(etcd.endpoints, "openai-api", "--tp", "1", "--cpu-ranks", "1", "--state-dir", str(tmp / "a"),
                       "--worker-model", str(model), "--worker-max-seq", "256")
    daemon = DaemonProcess("a", args, tmp / "a.log", env={"RALLYPOINT_GATEWAY_API_KEY": KEY}).start()
    try:
        gateway = wait_file(tmp / "a" / "gateway.url").strip()
        driver = wait_file(tmp / "a" / "api-0.url").strip()
        wait_for("the gateway sees a serving driver", lambda: httpx.get(gateway + "/health").status_code == 200,
                 timeout=60, every=0.1)
        yield Served(gateway, driver, model)
    finally:
        daemon.stop()


def test_models_and_the_api_key(served: Served) -> None:
    assert [m.id for m in served.client.models.list().data] == [served.name]
    assert httpx.get(served.gateway + "/health").status_code == 200  # open, for load balancers
    wrong = openai.OpenAI(base_url=served.gateway + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=served.name, prompt="x", max_tokens=1)
    r = httpx.post(served.gateway + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and "no API key given" in r.json()["error"]["message"]
    assert r.headers["www-authenticate"] == "Bearer"
    # the driver's own API asks for the same key: the gateway is not the only way in
    assert httpx.post(served.driver + "/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.get(served.driver + "/health").status_code == 200


def test_completion_whole_and_streamed_agree_and_count_usage(served: Served) -> None:
    c = served.client
    whole = c.completions.create(model=served.name, prompt="Hello, rallypoint", max_tokens=12, temperature=0)
    again = c.completions.create(model=served.name, prompt="Hello, rallypoint", max_tokens=12, temperature=0)
    assert whole.choices[0].text == again.choices[0].text and whole.choices[0].finish_reason == "length"
    prompt_ids = served.tok.encode("Hello, rallypoint")
    assert prompt_ids[0] == served.tok.bos_id  # the tokenizer's post-processor adds BOS, and so do we
    assert whole.usage.prompt_tokens == len(prompt_ids) and whole.usage.completion_tokens == 12
    text, usage, finish = "", None, None
    for chunk in c.completions.create(model=served.name, prompt="Hello, rallypoint", max_tokens=12, temperature=0,
                                      stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    assert text == whole.choices[0].text and finish == "length"
    assert usage is not None and usage.total_tokens == len(prompt_ids) + 12
    ids = c.completions.create(model=served.name, prompt=prompt_ids, max_tokens=12, temperature=0)
    assert ids.choices[0].text == whole.choices[0].text  # token ids are used as they are


def test_chat_uses_the_checkpoints_template(served: Served) -> None:
    c = served.client
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a rally point?"}]
    whole = c.chat.completions.create(model=served.name, messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason == "length"
    rendered = served.tok.apply_chat_template(messages, add_generation_prompt=True)
    assert whole.usage.prompt_tokens == len(served.tok.encode(rendered, add_special_tokens=False))
    deltas = list(c.chat.completions.create(model=served.name, messages=messages, max_tokens=10, temperature=0,
                                            stream=True))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == whole.choices[0].message.content
    assert deltas[-1].choices[0].finish_reason == "length"
    assert len({d.id for d in deltas}) == 1 and deltas[0].id.startswith("chatcmpl-")


def test_stop_strings_end_the_text_before_them(served: Served) -> None:
    c = served.client
    full = c.completions.create(model=served.name, prompt="stop here", max_tokens=40, temperature=0).choices[0].text
    clean = [i for i in range(4, len(full) - 3) if "\ufffd" not in full[i:i + 2]]
    assert clean, f"no stop string candidate in {full!r}"
    stop = full[clean[len(clean) // 2]:clean[len(clean) // 2] + 2]
    expected = full[:full.find(stop)]
    got = c.completions.create(model=served.name, prompt="stop here", max_tokens=40, temperature=0, stop=[stop])
    assert got.choices[0].text == expected and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < 40
    streamed = list(c.completions.create(model=served.name, prompt="stop here", max_tokens=40, temperature=0,
                                         stop=stop, stream=True))
    assert "".join(s.choices[0].text for s in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_sampling_is_seeded_and_top_p_narrows_it(served: Served) -> None:
    c = served.client

    def make(**kw: object) -> str:
        return c.completions.create(model=served.name, prompt="sample me", max_tokens=16, **kw).choices[0].text

    greedy = make(temperature=0)
    assert make(temperature=1.0, seed=7) == make(temperature=1.0, seed=7)
    assert make(temperature=1.0, seed=7) != make(temperature=1.0, seed=8)
    assert make(temperature=1.0, seed=7, top_p=1e-6) == greedy  # only the most likely token is left


def test_errors_are_openai_shaped_and_name_the_field(served: Served) -> None:
    c = served.client
    cases = [(dict(prompt="x", max_tokens=10**6), "max_tokens"), (dict(prompt="x", n=2), "n: only 1"),
             (dict(prompt="x", temperature=5), "temperature"), (dict(prompt="", max_tokens=2), "prompt: must not be empty"),
             (dict(prompt=[1, 10**9]), "outside the vocabulary"), (dict(prompt="x", top_p=0), "top_p"),
             (dict(prompt=[1, "a"]), "prompt: expected a string or a list of token ids"),
             (dict(prompt="x", stop=[1]), "stop: expected a string or a list of strings"),
             (dict(prompt="x", max_tokens=4, extra_body={"frobnicate": 1}), "frobnicate")]
    for kw, words in cases:
        with pytest.raises(openai.BadRequestError) as info:
            c.completions.create(model=served.name, **kw)  # type: ignore[arg-type]
        assert words in info.value.message, (kw, info.value.message)
        assert info.value.status_code == 400 and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model=served.name, messages=[], max_tokens=1)
    r = httpx.post(served.gateway + "/v1/completions", content=b"{not json", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(served.gateway + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "no such endpoint: GET /v1/nothing" in r.json()["error"]["message"]
