"""What a new user does first: save a model with ``transformers``, serve it with rallyd, and ask the
gateway with the ``openai`` client. Text prompts and chats must give the tokens ``generate()``
gives on what ``AutoTokenizer`` makes of them (a Llama 3 layout: ``rope_parameters`` with llama3
scaling, tied embeddings, a tokenizer whose post-processor adds BOS, a chat template)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from rallypoint.testing.daemons import DaemonProcess, daemon_args, wait_file, wait_for
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.testing.hf_models import CASES, CHATS, EOS_ID, EOT_ID, TEXTS, save_checkpoint

transformers = pytest.importorskip("transformers")
NEW = 16


@pytest.fixture(scope="module")
def deployment(etcd: EtcdCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, torch.nn.Module]]:
    tmp = tmp_path_factory.mktemp("hf-serving")
    case = next(c for c in CASES if c.name == "llama3-rope-tied")
    model_dir = tmp / "llama3-tiny"
    hf = save_checkpoint(case, model_dir)
    args = daemon_args(etcd.endpoints, "hf-serving", "--tp", "1", "--cpu-ranks", "1", "--state-dir", str(tmp / "a"),
                       "--worker-model", str(model_dir), "--worker-max-seq", "256")
    daemon = DaemonProcess("a", args, tmp / "a.log").start()
    try:
        gateway = wait_file(tmp / "a" / "gateway.url").strip()
        wait_for("a serving driver", lambda: httpx.get(gateway + "/health").status_code == 200, timeout=90, every=0.1)
        yield gateway, model_dir, hf
    finally:
        daemon.stop()


def generate(hf: torch.nn.Module, ids: list[int]) -> list[int]:
    """Greedy new tokens, stopping at the checkpoint's end-of-sequence ids as the server does."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=[EOS_ID, EOT_ID],
                          pad_token_id=EOS_ID, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def test_text_prompts_and_chats_give_the_tokens_of_generate(deployment) -> None:
    gateway, model_dir, hf = deployment
    auto = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    client = openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0, timeout=60)
    for text in TEXTS:
        ids = auto(text)["input_ids"]
        got = client.completions.create(model=model_dir.name, prompt=text, max_tokens=NEW, temperature=0)
        assert got.usage.prompt_tokens == len(ids)  # BOS included, as AutoTokenizer gives it
        assert got.choices[0].model_extra["token_ids"] == generate(hf, ids), text
    for chat in [CHATS[0], [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi!"}]]:
        ids = auto.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        got = client.chat.completions.create(model=model_dir.name, messages=chat, max_tokens=NEW, temperature=0)
        assert got.usage.prompt_tokens == len(ids)
        assert got.choices[0].model_extra["token_ids"] == generate(hf, ids), chat
