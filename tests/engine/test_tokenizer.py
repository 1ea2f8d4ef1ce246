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


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch(["", "a"], add_bos=False) == [[], tok.encode("a", add_bos=False)]


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


def test_byte_level_gguf_tokenizer_matches_transformers(tmp_path) -> None:
    """A Qwen2-style byte-level BPE GGUF tokenizer (merges in the file)."""
    import gguf
    from transformers import AutoTokenizer

    from llmql.engine.tokenizer import _bytes_to_unicode
    from llmql.engine.weights.gguf import GGUFFile

    alphabet = list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "a t", "Ġ c", "Ġc at", "1 2", "Ġ Ġ", "Ċ Ċ"]
    tokens = [*alphabet, *("".join(m.split()) for m in merges), "<|endoftext|>"]
    path = tmp_path / "bytes.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(merges)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(False)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    ours = Tokenizer.from_gguf(GGUFFile(path).metadata)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the cat sat on the mat 123", "ünïcode 😀\n\n  two  spaces<|endoftext|>", ""]:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False).input_ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert b"".join(ours.token_bytes()[i] for i in ids if i != len(tokens) - 1) == text.replace(
            "<|endoftext|>", ""
        ).encode()
    assert ours.bos_id is None and ours.eos_ids == frozenset({len(tokens) - 1})


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path) -> None:
    """A Llama-2-style SentencePiece BPE GGUF tokenizer: merges from scores, byte fallback."""
    import gguf
    from transformers import AutoTokenizer

    from llmql.engine.weights.gguf import GGUFFile

    pieces = ["\u2581", "t", "h", "e", "c", "a", "s", "o", "n", "m", "1", "2", "\u2581t", "he",
              "\u2581the", "at", "\u2581c", "\u2581cat", "\u2581s", "\u2581sat", "\u2581o",
              "\u2581on", "\u2581m", "\u2581mat", "\u2581\u2581", "12"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    path = tmp_path / "sp.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    ours = Tokenizer.from_gguf(GGUFFile(path).metadata)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the cat sat on the mat", "  the  cat\n", "hello wörld 123 😀", "</s>x", ""]:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.bos_id == 1 and ours.encode("the", add_bos=False) == [tokens.index("\u2581the")]
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi"


def test_hf_directory_tokenizer_matches_transformers(hf_default_tokenizer, tmp_path) -> None:
    """`Tokenizer.from_dir` on a tokenizer.json + tokenizer_config.json written by transformers."""
    hf_default_tokenizer.save_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.bos_id == 2 and 1 in ours.eos_ids and ours.add_bos
    for text in TEXTS[:8]:
        ids = ours.encode(text)
        assert ids == hf_default_tokenizer(text).input_ids
        assert ours.decode(ids) == hf_default_tokenizer.decode(ids, skip_special_tokens=True)


def test_eos_ids_from_config_and_generation_config(tiny_model_dir, tmp_path) -> None:
    import shutil

    directory = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = Tokenizer.from_dir(directory, eos_ids=[9])
    assert tok.eos_ids == frozenset({2, 7, 9})
