"""Chat requests a checkpoint cannot render get a 400 that says why, and nothing is queued.
(In-process API server over the tiny checkpoint's tokenizer, no model.)"""

from __future__ import annotations

from pathlib import Path

import httpx

from rallypoint.worker.api import ApiServer, Frontend
from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.requests import RequestQueue
from rallypoint.worker.tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG, load_tokenizer


def chat(model: Path, messages: list[dict]) -> tuple[httpx.Response, Frontend]:
    fe = Frontend(queue=RequestQueue(), tokenizer=load_tokenizer(model), vocab_size=320,
                  state=lambda: ("serving", 1), model="m")
    server = ApiServer(fe).serve_in_thread()
    try:
        return httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 4},
                          timeout=10), fe
    finally:
        server.stop()


def test_a_template_that_refuses_the_messages_is_a_400_naming_them(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", "tiny")
    (model / CHAT_TEMPLATE_FILE).write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages here') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}")
    r, fe = chat(model, [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("messages: ") and "no system messages here" in r.text
    assert fe.queue.waiting == 0


def test_a_checkpoint_without_a_chat_template_says_so(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", "tiny")
    cfg = model / TOKENIZER_CONFIG
    cfg.write_text(cfg.read_text().replace('"chat_template"', '"unused_template"'))
    r, fe = chat(model, [{"role": "user", "content": "hi"}])
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"], r.text
    assert fe.queue.waiting == 0
