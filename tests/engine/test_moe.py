"""MoE families (Mixtral, Qwen3-MoE) against transformers on tiny random models, resident and
with expert offload (a cache of 2 experts per layer), plus MoE GGUF files."""

from __future__ import annotations

import pytest
import torch

from llmql.engine.models import load_model
from tests.engine.test_models import forward, hf_logits, new_pool, sequence

ATOL = 1e-4
MOE_FAMILIES = ["mixtral", "qwen3_moe"]


def _greedy(lm, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decode through the paged pool: (new tokens, logits of every step stacked)."""
    pool = new_pool(lm)
    logits, (slots,) = forward(lm, pool, [(ids, torch.empty(0, dtype=torch.int64))])
    rows, out = [logits[-1]], []
    for _ in range(steps):
        out.append(int(rows[-1].argmax()))
        step, (slots,) = forward(lm, pool, [([out[-1]], slots)])
        rows.append(step[-1])
    return out, torch.stack(rows)


def _hf_greedy(hf, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    seq, rows = list(ids), []
    for _ in range(steps + 1):
        rows.append(hf_logits(hf, seq)[-1])
        seq.append(int(rows[-1].argmax()))
    return seq[len(ids):-1], torch.stack(rows)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_greedy_matches_transformers(family, tiny_model_dir, tiny_hf_model) -> None:
    directory = tiny_model_dir(family)
    lm, hf = load_model(str(directory)), tiny_hf_model(directory)
    assert lm.config.num_experts == 8 and lm.config.norm_topk_prob == (family == "mixtral")
    ids = sequence(9, seed=3)
    tokens, logits = _greedy(lm, ids, steps=6)
    want_tokens, want_logits = _hf_greedy(hf, ids, steps=6)
    assert want_logits.abs().max() > 0.5
    assert tokens == want_tokens
    torch.testing.assert_close(logits, want_logits, atol=ATOL, rtol=0)
