"""Our tokenizer against transformers' reading of the same GGUF, plus BOS, decode, token
strings and chat templates."""

from __future__ import annotations

import json

import pytest

from llmql.engine.models import LoadedModel, load_model
from llmql.engine.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "  two leading spaces and trailing   ",
    "multiple\n\nnewlines\n\n\nand\r\nCRLF",
    "\ttabs\tand    runs of      spaces",
    "Unicode: café, naïve, Ünïcödé, 日本語のテキスト, 한국어, Ελληνικά, русский",
    "emoji 😀🚀👩‍💻 and symbols ©®™ ∑∫√ ½",
    "numbers 1234567890 3.14159 -42 1,000,000 2024-01-01",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "code: def f(x):\n    return x ** 2  # comment\n",
    "SELECT llm('Summarise', title) FROM movies WHERE year > 2000;",
    "zero\u200bwidth, ﬁ ligature, e\u0301 combining",
    "a" * 40 + " " + "ab" * 20,
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tok(default_model: LoadedModel) -> Tokenizer:
    return default_model.tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(tok: Tokenizer, hf_default_tokenizer, text: str) -> None:
    assert tok.encode(text) == hf_default_tokenizer(text).input_ids


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(tok: Tokenizer, hf_default_tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == hf_default_tokenizer.decode(ids, skip_special_tokens=True)


def test_bos_and_eos_from_metadata(tok: Tokenizer) -> None:
    assert tok.bos_id == 2 and tok.eos_ids == frozenset({1})
    assert tok.encode("") == [2] and tok.encode("", add_bos=False) == []
    assert tok.encode("hi", add_bos=False) == tok.encode("hi")[1:]
    assert tok.vocab_size == 262144


def test_token_strings(tok: Tokenizer) -> None:
    strings = tok.token_strings()
    assert len(strings) == tok.vocab_size
    ids = tok.encode("Hello world, café 日本", add_bos=False)
    assert "".join(strings[i] for i in ids) == "Hello world, café 日本"
    assert b"".join(tok.token_bytes()[i] for i in tok.encode("😀", add_bos=False)) == "😀".encode()


def test_no_chat_template_is_a_clear_error(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_from_tokenizer_config(tiny_model_dir, tmp_path) -> None:
    import shutil

    directory = tmp_path / "m"
    shutil.copytree(tiny_model_dir("qwen2"), directory)
    meta = json.loads((directory / "tokenizer_config.json").read_text())
    meta["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    (directory / "tokenizer_config.json").write_text(json.dumps(meta))
    tok = load_model(str(directory)).tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "w5 w6"}])
    assert text == "<bos><user>w5 w6\n<assistant>"
    assert tok.encode("w5 w6") == [1, 5, 6] and tok.decode([1, 5, 6]) == "w5 w6"
