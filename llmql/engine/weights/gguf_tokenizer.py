"""A `tokenizers` backend from GGUF tokenizer metadata (`tokenizer.ggml.*`).

SentencePiece vocabularies ("llama") become a BPE with byte fallback whose merges are
recovered from the vocabulary (every split of a token into two tokens, best-ranked first);
byte-level vocabularies ("gpt2") use the merges the file carries. Control tokens become
special added tokens, user-defined ones plain added tokens, as transformers' converter does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

_CONTROL, _USER_DEFINED = 3, 4
_SPACE = "\u2581"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def build_backend(meta: Mapping[str, Any]) -> Backend:
    """The backend tokenizer the metadata describes; ValueError for unsupported kinds."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        backend = _sentencepiece(meta, str(meta.get("general.architecture", "")).startswith("gemma"))
    elif kind == "gpt2":
        backend = _byte_level(meta)
    else:
        raise ValueError(f"GGUF tokenizer {kind!r} is not supported (llama, gpt2)")
    _add_special_tokens(backend, meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type"))
    return backend


def _sentencepiece(meta: Mapping[str, Any], gemma: bool) -> Backend:
    tokens = list(meta["tokenizer.ggml.tokens"])
    if gemma:
        # NOTE: Gemma files spell whitespace-only tokens with real spaces and list tokens in
        # merge order (their scores do not follow it), so rank by position.
        tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        ranks = {t: -i for i, t in enumerate(tokens)}
    else:
        ranks = dict(zip(tokens, meta["tokenizer.ggml.scores"]))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _file_merges(meta) or generate_merges(vocab, ranks)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    backend = Backend(BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id], fuse_unk=True,
                          byte_fallback=True, dropout=None))
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        backend.normalizer = normalizers.Replace(" ", _SPACE)
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=_SPACE, prepend_scheme="first" if prefix else "never", split=False
        )
        steps += [decoders.Strip(content=" ", left=1)] if prefix else []
    backend.decoder = decoders.Sequence(steps)
    return backend


def _byte_level(meta: Mapping[str, Any]) -> Backend:
    from llmql.engine.tokenizer import _bytes_to_unicode

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
        for i, t in enumerate(meta["tokenizer.ggml.tokens"])
    }
    backend = Backend(BPE(vocab=vocab, merges=_file_merges(meta), dropout=None))
    split = _SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _file_merges(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]


def generate_merges(vocab: Mapping[str, int], ranks: Mapping[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary: every split of a token into two tokens, ordered by the
    merged token's rank (highest first), then by the lengths of the two parts."""
    found = []
    for merged, rank in ranks.items():
        local = [
            (merged[:i], merged[i:], rank)
            for i in range(1, len(merged))
            if merged[:i] in vocab and merged[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _add_special_tokens(backend: Backend, tokens: Sequence[str], types: Sequence[int] | None) -> None:
    if not types:
        return
    control = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, types) if kind == _CONTROL]
    backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user = [AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types) if kind == _USER_DEFINED and t in vocab]
    backend.add_tokens(user)
