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


def _expert_bytes(lm) -> int:
    c = lm.config
    return 3 * c.hidden_size * c.moe_intermediate_size * 4


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_offload_matches_resident(family, tiny_model_dir) -> None:
    """Unbounded cache and a cache of 2 experts per layer: the same tokens and logits."""
    directory = tiny_model_dir(family)
    resident = load_model(str(directory))
    ids = sequence(9, seed=4)
    want_tokens, want_logits = _greedy(resident, ids, steps=6)
    per_layer = 2 * _expert_bytes(resident) * resident.config.num_layers / 2**30
    for gib in (1.0, per_layer):
        lm = load_model(str(directory), expert_cache_gib=gib)
        tokens, logits = _greedy(lm, ids, steps=6)
        assert tokens == want_tokens
        torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
        stats = lm.model.expert_offload.stats()
        assert stats["resident_bytes"] <= stats["budget_bytes"]
        assert stats["peak_resident_bytes"] <= stats["budget_bytes"]
        assert stats["misses"] > 0 and stats["bytes_moved"] >= stats["misses"] * _expert_bytes(lm)
        if gib < 1.0:
            assert stats["evictions"] > 0  # NOTE: the small budget really did force eviction
        assert stats["prefetch_predicted"] > 0 and 0.0 <= stats["prefetch_accuracy"] <= 1.0
        lm.model.expert_offload.cache.close()
