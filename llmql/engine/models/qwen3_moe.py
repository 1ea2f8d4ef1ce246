"""Qwen3-MoE: the Mixtral block with q/k RMSNorm (config flag), the MoE under `mlp`, and
top-k weights renormalised only when `norm_topk_prob` says so."""

from __future__ import annotations

from llmql.engine.models.mixtral import MoECausalLM


class Qwen3MoeForCausalLM(MoECausalLM):
    """`Qwen3MoeForCausalLM` (Qwen3-30B-A3B, Qwen3-235B-A22B; every layer sparse)."""

    moe_name = "mlp"
