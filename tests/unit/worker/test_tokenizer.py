"""``load_tokenizer`` vs transformers' ``AutoTokenizer`` on the same directories: ids (the
post-processor's BOS; ``add_bos_token``/``add_eos_token`` ignored, as transformers 5 does), decoding, chat templates
(from ``chat_template.jinja`` or ``tokenizer_config.json``), stop tokens and the errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rallypoint.errors import CheckpointError
from rallypoint.testing.hf_models import BOS, CHAT_TEMPLATE, CHATS, EOT, EOT_ID, TEXTS, save_tokenizer
from rallypoint.worker.checkpoint import BOS_ID, EOS_ID, make_model
from rallypoint.worker.tokenizer import ChatTemplateError, NoChatTemplate, load_tokenizer

MORE_TEXTS = [*TEXTS, "", " leading space", "a\n\nb\t", f"{BOS}inline specials{EOT}", "\U0001f600 \u00e9\u0301"]


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama3-tok")
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"), "tiny")


def copy(src: Path, dst: Path, edit_config=None) -> Path:
    shutil.copytree(src, dst)
    if edit_config:
        file = dst / "tokenizer_config.json"
        file.write_text(json.dumps(edit_config(json.loads(file.read_text()))))
    return dst


def same_as_transformers(path: Path, chats: bool = True) -> None:
    tok, ref = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    for text in MORE_TEXTS:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    for chat in CHATS if chats else []:
        for gen in (True, False):
            assert tok.apply_chat_template(chat, gen) == ref.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=gen)


def test_llama3_style_tokenizer(llama3_dir: Path) -> None:
    same_as_transformers(llama3_dir)
    tok = load_tokenizer(llama3_dir)
    assert tok.encode("hi")[0] == tok.bos_id == 0 and tok.eos_ids == {EOT_ID} and tok.eos_id == EOT_ID


def test_byte_tokenizer_of_make_model(byte_dir: Path) -> None:
    same_as_transformers(byte_dir, chats=False)
    tok = load_tokenizer(byte_dir)
    text = "Hello, wörld ✓ — 日本\n"
    ids = tok.encode(text)
    assert ids[0] == BOS_ID and ids[1:] == list(text.encode()) and tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids + [EOS_ID, 300]) == text and tok.decode([0xE2, 0x9C]) == "\ufffd"
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (BOS_ID, {EOS_ID}, 258)
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat) == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    assert tok.encode_chat(chat)[:2] == [BOS_ID, ord("<")] and tok.encode_chat(chat).count(BOS_ID) == 1
    assert tok.apply_chat_template(chat) == AutoTokenizer.from_pretrained(byte_dir).apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)


def test_add_bos_and_eos_token_are_ignored_beside_tokenizer_json(llama3_dir: Path, tmp_path: Path) -> None:
    """transformers 5 drops them when tokenizer.json is there: its post-processor decides."""
    both = copy(llama3_dir, tmp_path / "both", lambda c: {**c, "add_bos_token": False, "add_eos_token": True})
    same_as_transformers(both, chats=False)
    ids = load_tokenizer(both).encode("hi")
    assert ids[0] == 0 and ids[-1] != EOT_ID


def test_chat_template_sources_and_errors(llama3_dir: Path, tmp_path: Path) -> None:
    in_config = copy(llama3_dir, tmp_path / "in_config", lambda c: {**c, "chat_template": CHAT_TEMPLATE})
    (in_config / "chat_template.jinja").unlink()
    same_as_transformers(in_config)
    both = copy(in_config, tmp_path / "both")
    (both / "chat_template.jinja").write_text("{{ bos_token }}jinja file wins")
    assert load_tokenizer(both).apply_chat_template(CHATS[0]) == f"{BOS}jinja file wins"
    with pytest.raises(ChatTemplateError, match="unknown role: tool") as info:
        load_tokenizer(llama3_dir).apply_chat_template([{"role": "tool", "content": "x"}])
    assert isinstance(info.value, ValueError) and str(llama3_dir) in str(info.value)
    for bad in ([], ["hi"]):
        with pytest.raises(ChatTemplateError, match="non-empty list of message objects"):
            load_tokenizer(llama3_dir).apply_chat_template(bad)
    none = copy(llama3_dir, tmp_path / "none")
    (none / "chat_template.jinja").unlink()
    with pytest.raises(NoChatTemplate, match=f"{none}: the checkpoint has no chat template") as info:
        load_tokenizer(none).apply_chat_template(CHATS[0])
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)
    (none / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(CheckpointError, match="chat template does not compile"):
        load_tokenizer(none)


def test_stop_tokens_from_generation_config_and_config(llama3_dir: Path, tmp_path: Path) -> None:
    path = copy(llama3_dir, tmp_path / "eos")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2], "bos_token_id": 0}))
    (path / "config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    tok = load_tokenizer(path)
    assert tok.eos_ids == frozenset({1, 2, 7}) and tok.eos_id == EOT_ID
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(CheckpointError, match="generation_config.json: eos_token_id must be a token id"):
        load_tokenizer(path)


def test_missing_or_bad_tokenizer_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json: not a tokenizers file"):
        load_tokenizer(tmp_path)
