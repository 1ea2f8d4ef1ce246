"""Sampling (greedy, temperature/top-p with a per-request seed, choices masks) and the
per-token finish checks (EOS, stop strings, max_tokens, choices)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from llmql.engine.constrained import ChoiceState
from llmql.engine.scheduler.request import Req
from llmql.engine.types import TokenLogprob


@dataclass(frozen=True)
class TopLogits:
    """Each row's best tokens, for a batch whose every request samples greedily with no
    logprobs and no constraint: what an int8 LM head gives without its [B, vocab] logits."""

    values: torch.Tensor  # [B, k] exact logits of those tokens
    ids: torch.Tensor  # [B, k] token ids

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], self.values.shape[1])

    def argmax(self) -> list[int]:
        """Each row's best token."""
        return self.ids.gather(1, self.values.argmax(dim=-1, keepdim=True)).flatten().tolist()


def plain_greedy(req: Req) -> bool:
    """Whether `req`'s next token is its highest logit's and nothing else of the logits is
    recorded (temperature 0, no logprobs, no constraint)."""
    return req.params.temperature <= 0 and req.params.logprobs is None and req.constraint is None


class Sampler:
    """Turns the logits of the sampled rows into one token per request.

    Args:
        token_bytes: the tokenizer's `token_bytes` (the bytes of each token id), needed to
            name the tokens of requests that ask for `logprobs`.
    """

    def __init__(self, token_bytes: Callable[[], Sequence[bytes]] | None = None) -> None:
        self._token_bytes = token_bytes

    def sample(self, reqs: list[Req], logits: torch.Tensor | TopLogits) -> list[int]:
        """logits [B, vocab] (row i belongs to reqs[i]) -> B token ids. `TopLogits` only
        for a batch of `plain_greedy` requests."""
        assert logits.shape[0] == len(reqs), (logits.shape, len(reqs))
        if isinstance(logits, TopLogits):
            assert all(plain_greedy(r) for r in reqs)
            return logits.argmax()
        logits = logits.float()
        raw = logits
        constrained = [i for i, r in enumerate(reqs) if r.constraint is not None]
        if constrained:
            _record_choice_logprobs(reqs, logits, constrained)
            logits = logits.clone()
            for i in constrained:
                logits[i] = _mask(logits[i], reqs[i].constraint.allowed())  # type: ignore[union-attr]
        tokens = logits.argmax(dim=-1).tolist()
        for i, req in enumerate(reqs):
            if req.params.temperature > 0:
                tokens[i] = _sample_row(logits[i], req)
        if any(r.params.logprobs is not None for r in reqs):
            self._record_logprobs(reqs, raw, tokens)
        return tokens

    def _record_logprobs(self, reqs: list[Req], logits: torch.Tensor, tokens: list[int]) -> None:
        """Append each sampled token's log-probability (and the top alternatives) to the
        requests that ask for them: a log-softmax of the raw logits."""
        rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        logprobs = torch.log_softmax(logits[rows], dim=-1)
        chosen = logprobs.gather(1, torch.tensor([[tokens[i]] for i in rows],
                                                 device=logprobs.device)).squeeze(1).tolist()
        k = max(reqs[i].params.logprobs or 0 for i in rows)
        top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0])
        top_lp, top_ids = top_lp.tolist(), top_ids.long().tolist()
        pieces = self._token_bytes() if self._token_bytes is not None else None
        for j, i in enumerate(rows):
            req, n = reqs[i], reqs[i].params.logprobs or 0
            top = tuple(_entry(pieces, t, lp) for t, lp in zip(top_ids[j][:n], top_lp[j][:n]))
            # NOTE: indexed by output position, so a step re-run after a failed batch
            # replaces its entry instead of adding a second one.
            del req.token_logprobs[len(req.output_ids):]
            req.token_logprobs.append(replace(_entry(pieces, tokens[i], chosen[j]), top=top))


def _entry(pieces: Sequence[bytes] | None, token: int, logprob: float) -> TokenLogprob:
    raw = pieces[token] if pieces is not None and token < len(pieces) else str(token).encode()
    return TokenLogprob(raw.decode("utf-8", errors="replace"), logprob, raw)


def _record_choice_logprobs(reqs: list[Req], logits: torch.Tensor, rows: list[int]) -> None:
    """First step of a `choices` request: keep each choice's first-token log-probability,
    a log-softmax over the distinct first tokens of the request's choices.

    NOTE: only those tokens' logits are needed, so the runner may compute no others
    (`ModelRunner.run`); contextual calibration subtracts a content-free prompt's values,
    which a per-prompt normaliser does not change.
    """
    for i in rows:
        state = reqs[i].constraint
        if isinstance(state, ChoiceState) and reqs[i].choice_logprobs is None and not reqs[i].output_ids:
            reqs[i].choice_logprobs = state.first_token_logprobs(logits[i])


def _mask(row: torch.Tensor, allowed: list[int] | torch.Tensor) -> torch.Tensor:
    out = torch.full_like(row, float("-inf"))
    idx = torch.as_tensor(allowed, dtype=torch.int64, device=row.device)
    out[idx] = row[idx]
    return out


def _sample_row(row: torch.Tensor, req: Req) -> int:
    """Temperature + nucleus (top-p) sampling with the request's own generator."""
    if req.generator is None:
        seed = req.params.seed if req.params.seed is not None else int(torch.seed() % 2**63)
        req.generator = torch.Generator(device=row.device).manual_seed(seed)
    probs = torch.softmax(row / req.params.temperature, dim=-1)
    top_p = req.params.top_p
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=req.generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=req.generator))


class Detokenizer(Protocol):
    eos_ids: frozenset[int]

    def decode(self, ids: list[int]) -> str: ...


class OutputProcessor:
    """Appends each sampled token to its request and decides whether it finished.

    Text excludes EOS and the stop string (and everything after it; stop strings are searched
    after the output's leading whitespace); a `choices` request
    ends with exactly the choice reached, a `json_schema` one with the generated JSON.
    """

    def __init__(self, tokenizer: Detokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, req: Req, token: int) -> None:
        req.token_ids.append(token)
        if req.constraint is not None:
            self._advance_constraint(req, token)
        elif token in self.tokenizer.eos_ids:
            req.text = self.tokenizer.decode(req.output_ids[:-1])
            req.finish("stop")
        elif req.params.stop and self._hit_stop(req):
            req.finish("stop")
        elif len(req.output_ids) >= req.max_new_tokens:
            req.text = self.tokenizer.decode(req.output_ids)
            req.finish("length")

    def _hit_stop(self, req: Req) -> bool:
        text = self.tokenizer.decode(req.output_ids)
        # NOTE: leading whitespace never stops a request (a "\n" stop must not end an answer
        # before it starts: models often open with a newline); the text keeps it.
        start = len(text) - len(text.lstrip())
        hits = [i for i in (text.find(s, start) for s in req.params.stop if s) if i >= 0]
        if hits:
            req.text = text[: min(hits)]
        return bool(hits)

    def _advance_constraint(self, req: Req, token: int) -> None:
        state = req.constraint
        assert state is not None
        state.advance(token)
        if state.done:
            req.text = state.text if state.text is not None else self._decode(req)
            req.finish("stop")
        elif len(req.output_ids) >= req.max_new_tokens:
            req.text = state.finish_now() or self._decode(req)
            req.finish("length")

    def _decode(self, req: Req) -> str:
        return self.tokenizer.decode([t for t in req.output_ids if t not in self.tokenizer.eos_ids])
