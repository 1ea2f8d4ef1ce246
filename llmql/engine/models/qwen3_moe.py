"""Qwen3-MoE: the Mixtral block with q/k RMSNorm (config flag), the MoE under `mlp`, and
top-k weights renormalised only when `norm_topk_prob` says so. Qwen2-MoE: the same with q/k/v
biases and a sigmoid-gated shared expert (config flags)."""

from __future__ import annotations

from llmql.engine.models.mixtral import MoECausalLM


class Qwen3MoeForCausalLM(MoECausalLM):
    """`Qwen3MoeForCausalLM` (Qwen3-30B-A3B, Qwen3-235B-A22B; every layer sparse)."""

    moe_name = "mlp"


class Qwen2MoeForCausalLM(MoECausalLM):
    """`Qwen2MoeForCausalLM` (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B; every layer sparse)."""

    moe_name = "mlp"
