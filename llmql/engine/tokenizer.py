"""The tokenizer: a `tokenizers` backend plus BOS/EOS handling and the chat template.

Built from a HF directory (`tokenizer.json` + `tokenizer_config.json`) or from GGUF metadata
(`llmql.engine.weights.gguf_tokenizer`), and saved as a HF directory for the model cache.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

_META_FILE = "tokenizer_config.json"


class Tokenizer:
    """Text <-> token ids for one model.

    Args:
        backend: the `tokenizers.Tokenizer` (no BOS post-processing is relied upon).
        bos_id: the BOS token id, or None if the vocabulary has none.
        eos_ids: ids that end generation.
        add_bos: whether the model expects BOS at the start of a prompt.
        chat_template: a Jinja2 chat template, or None.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bos_id: int | None,
        eos_ids: frozenset[int],
        add_bos: bool,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = frozenset(eos_ids)
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        self._token_bytes: list[bytes] | None = None

    @property
    def vocab_size(self) -> int:
        """Number of token ids (including added tokens)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, with BOS first if `add_bos` and the model uses BOS."""
        ids = self.backend.encode(text, add_special_tokens=False).ids if text else []
        return [self.bos_id, *ids] if add_bos and self.add_bos else ids  # type: ignore[list-item]

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = True) -> list[list[int]]:
        """`encode` of many texts at once (tokenized in parallel by the Rust backend)."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        prefix = [self.bos_id] if add_bos and self.add_bos else []
        return [prefix + e.ids for e in encodings]  # type: ignore[operator]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (special tokens dropped unless `skip_special_tokens=False`)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self) -> list[bytes]:
        """The exact bytes each token id contributes to decoded text (special tokens: their
        literal text), for constrained decoding. Computed once."""
        if self._token_bytes is None:
            self._token_bytes = _token_bytes(self.backend, self.vocab_size)
        return self._token_bytes

    def token_strings(self) -> list[str]:
        """Decoded text of each token id (`token_bytes` as UTF-8, invalid bytes as U+FFFD)."""
        return [b.decode("utf-8", errors="replace") for b in self.token_bytes()]

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """Render `messages` ([{"role", "content"}]) with the model's Jinja2 chat template.

        Raises ValueError if the model has no chat template.
        """
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass a plain prompt instead")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.bos_id),
            eos_token=self._token_text(min(self.eos_ids) if self.eos_ids else None),
        )

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.backend.id_to_token(token_id) or ""

    def save(self, directory: Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (readable by `from_dir`)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        meta = {
            "add_bos_token": self.add_bos,
            "bos_token": self._token_text(self.bos_id) or None,
            "eos_token": self._token_text(min(self.eos_ids)) if self.eos_ids else None,
            "llmql_eos_token_ids": sorted(self.eos_ids),
            "chat_template": self.chat_template,
        }
        (directory / _META_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def from_dir(cls, directory: Path, eos_ids: Sequence[int] = ()) -> Tokenizer:
        """From a HF model directory; `eos_ids` (from the model config) and those of
        `generation_config.json` add to the tokenizer's."""
        backend = Backend.from_file(str(directory / "tokenizer.json"))
        meta_path = directory / _META_FILE
        meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        _mark_special(backend, [meta.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")])
        bos_id = _token_id(backend, meta.get("bos_token"))
        eos = {*eos_ids, *meta.get("llmql_eos_token_ids", ()), *_generation_eos(directory)}
        if (eos_id := _token_id(backend, meta.get("eos_token"))) is not None:
            eos.add(eos_id)
        add_bos = meta.get("add_bos_token")
        if add_bos is None:
            add_bos = _post_processor_adds(backend, bos_id)
        template = meta.get("chat_template")
        if template is None and (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text()
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(backend, bos_id=bos_id, eos_ids=frozenset(eos), add_bos=bool(add_bos),
                   chat_template=template)

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """From GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`)."""
        from llmql.engine.weights.gguf_tokenizer import build_backend

        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        eos_id = meta.get("tokenizer.ggml.eos_token_id")
        eos = {eos_id} if eos_id is not None else set()
        if (eot := meta.get("tokenizer.ggml.eot_token_id")) is not None:
            eos.add(eot)
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = meta.get("tokenizer.ggml.model") == "llama"
        return cls(build_backend(meta), bos_id=bos_id, eos_ids=frozenset(eos), add_bos=add_bos,
                   chat_template=meta.get("tokenizer.chat_template"))


def _token_id(backend: Backend, token: Any) -> int | None:
    if isinstance(token, dict):  # AddedToken serialisation
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _generation_eos(directory: Path) -> list[int]:
    """EOS ids from `generation_config.json` (instruct models list end-of-turn tokens there)."""
    path = directory / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
    return [] if eos is None else eos if isinstance(eos, list) else [eos]


def _mark_special(backend: Backend, tokens: list[Any]) -> None:
    """Make the config's named special tokens special (skipped by decode), as transformers does."""
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    names = [t.get("content") if isinstance(t, dict) else t for t in tokens]
    new = [n for n in names if isinstance(n, str) and n not in special and backend.token_to_id(n) is not None]
    if new:
        backend.add_special_tokens([AddedToken(n, normalized=False, special=True) for n in new])


def _post_processor_adds(backend: Backend, bos_id: int | None) -> bool:
    """Whether the tokenizer.json post-processor prepends BOS (e.g. Llama 3)."""
    if bos_id is None:
        return False
    ids = backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id


def _token_bytes(backend: Backend, size: int) -> list[bytes]:
    byte_level = "ByteLevel" in repr(backend.decoder)
    unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    out = []
    for i in range(size):
        piece = backend.id_to_token(i) or ""
        if piece in special:
            out.append(piece.encode())
        elif byte_level:
            out.append(bytes(unicode_to_byte.get(c, 0) for c in piece))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
