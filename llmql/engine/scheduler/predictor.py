"""Learned output length: a per-template ranking model trained online with ListMLE.

"Efficient LLM Scheduling by Learning to Rank" (Fu et al., 2024) shows that the *rank* of
output lengths is what SJF needs and is easier to learn than the lengths. Rows of one LLM
call share a template (the instruction line, the constraint, `max_tokens`), so the
predictor keeps one small linear model per template over features the engine has for free:
hashed unigrams/bigrams of the prompt's last tokens, the prompt length and `max_tokens`.
Scores are turned into token counts by the lengths of finished requests of the same
template with the nearest scores, so predictions compare across templates.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from llmql.engine.types import GenerationRequest

DIM = 512  # hashed n-gram buckets
TAIL = 48  # prompt tokens (from the end) that feed the n-grams


@dataclass
class _Template:
    """One template's model and the finished requests it learned from."""

    weights: np.ndarray = field(default_factory=lambda: np.zeros(DIM + 3))
    feats: deque = field(default_factory=lambda: deque(maxlen=512))
    lengths: deque = field(default_factory=lambda: deque(maxlen=512))
    since_fit: int = 0

    @property
    def seen(self) -> int:
        return len(self.lengths)


class LengthPredictor:
    """Per-template ListMLE ranker of output length, with an FCFS fallback (None) until a
    template has `min_samples` finished requests.

    Args:
        min_samples: finished requests of a template before it predicts.
        refit_every: new samples between refits of a template's model.
        list_size: requests per ListMLE list; epochs: lists per refit.
    """

    def __init__(self, min_samples: int = 16, refit_every: int = 16, list_size: int = 16,
                 epochs: int = 32, lr: float = 1.0, seed: int = 0) -> None:
        self.min_samples, self.refit_every = min_samples, refit_every
        self.list_size, self.epochs, self.lr = list_size, epochs, lr
        self.templates: dict[str, _Template] = {}
        self._rng = np.random.default_rng(seed)

    def predict(self, key: str, x: np.ndarray) -> float | None:
        """Predicted output tokens of a request with features `x` (None: not enough data)."""
        t = self.templates.get(key)
        if t is None or t.seen < self.min_samples:
            return None
        feats = np.asarray(t.feats)
        scores = feats @ t.weights
        near = np.argsort(np.abs(scores - float(x @ t.weights)))[:8]
        return float(np.mean(np.asarray(t.lengths)[near]))

    def observe(self, key: str, x: np.ndarray, length: int) -> None:
        """Learn from a finished request: its features and its real output length."""
        t = self.templates.setdefault(key, _Template())
        t.feats.append(x)
        t.lengths.append(float(length))
        t.since_fit += 1
        if t.seen >= self.min_samples and t.since_fit >= self.refit_every:
            self._fit(t)
            t.since_fit = 0

    def mean_length(self, key: str) -> float | None:
        """The template's mean finished output length (None: not enough data)."""
        t = self.templates.get(key)
        return float(np.mean(t.lengths)) if t and t.seen >= self.min_samples else None

    def _fit(self, t: _Template) -> None:
        feats, lengths = np.asarray(t.feats), np.asarray(t.lengths)
        n = len(lengths)
        for _ in range(self.epochs):
            idx = self._rng.choice(n, size=min(self.list_size, n), replace=False)
            t.weights -= self.lr * listmle_grad(t.weights, feats[idx], lengths[idx])


def listmle_grad(w: np.ndarray, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Gradient of the ListMLE loss of scores `x @ w` for the order shortest-first.

    Loss = -sum_i [s_(i) - log sum_{j >= i} exp s_(j)] over the list sorted by length, so a
    higher score means a shorter answer. Ties in length are broken by position.
    """
    order = np.argsort(lengths, kind="stable")
    xs = x[order]
    s = xs @ w
    s = s - s.max()
    e = np.exp(s)
    tail = np.cumsum(e[::-1])[::-1]  # sum_{j >= i} e_j
    # d/ds_k of sum_i log tail_i = sum_{i <= k} e_k / tail_i
    coef = e * np.cumsum(1.0 / tail)
    grad_s = coef - 1.0
    return (grad_s @ xs) / len(lengths)


def listmle_loss(w: np.ndarray, x: np.ndarray, lengths: np.ndarray) -> float:
    """The ListMLE loss (for tests and diagnostics)."""
    s = x[np.argsort(lengths, kind="stable")] @ w
    tail = np.logaddexp.accumulate(s[::-1])[::-1]
    return float(np.sum(tail - s))


def template_key(request: GenerationRequest, ids: list[int]) -> str:
    """The call template of a request: its instruction line (or first tokens), constraint
    type and `max_tokens`."""
    if isinstance(request.prompt, str):
        head = request.prompt.split("\n", 1)[0][:200]
    else:
        head = ",".join(map(str, ids[:16]))
    kind = "choices" if request.choices else "json" if request.json_schema else "text"
    raw = f"{head}\x00{kind}\x00{request.max_tokens}\x00{request.adapter}"
    return hashlib.blake2b(raw.encode(), digest_size=8).hexdigest()


def features(ids: list[int], max_tokens: int) -> np.ndarray:
    """Hashed unigrams and bigrams of the prompt's last TAIL tokens (L2-normalised), plus
    log prompt length, log max_tokens and a bias."""
    x = np.zeros(DIM + 3)
    tail = ids[-TAIL:]
    for a in tail:
        x[(a * 2654435761) % DIM] += 1.0
    for a, b in itertools.pairwise(tail):
        x[(a * 40503 + b * 2654435761) % DIM] += 1.0
    norm = math.sqrt(float(x @ x)) or 1.0
    x /= norm
    x[DIM] = math.log1p(len(ids)) / 8
    x[DIM + 1] = math.log1p(max_tokens) / 8
    x[DIM + 2] = 1.0
    return x
