"""Sparse mixture-of-experts feed-forward: a router, top-k routing, and the experts.

`SparseMoE.experts` is either `ResidentExperts` (every expert in two stacked parameters) or,
under expert offload, `llmql.engine.moe.OffloadedExperts` (experts through an expert cache);
both take `(x [T, H], topk_weights [T, K], topk_ids [T, K]) -> [T, H]`.

Checkpoint names the experts accept (`weight_loader` shard ids):
    experts.{e}.w1 / gate_proj -> ("gate", e); w3 / up_proj -> ("up", e); w2 / down_proj -> ("down", e)
    experts.gate_up_proj [E, 2I, H] and experts.down_proj [E, H, I] (transformers 5 stacked)
"""

from __future__ import annotations

import re

import torch
from torch import nn

from llmql.engine.config import ModelConfig
from llmql.engine.layers.linear import Linear, default_weight_loader
from llmql.engine.layers.mlp import GatedMLP
from llmql.kernels.fused_moe import fused_moe, ref_fused_moe

# NOTE: checkpoint expert sub-names -> our part names.
EXPERT_PARTS = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up",
                "w2": "down", "down_proj": "down"}
EXPERT_TENSOR = re.compile(r"^(.*)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts (float32), top-k, optionally renormalised to sum to 1.

    logits [T, E] -> (weights [T, K] float32, ids [T, K] int64).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class ResidentExperts(nn.Module):
    """All experts of a layer in memory: w13 [E, 2I, H] (gate then up), w2 [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate), requires_grad=False)
        self.w13.weight_loader = self.weight_loader
        self.w2.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[str, int] | None = None
    ) -> None:
        """A stacked tensor (shard None) or one expert's part (shard ("gate"|"up"|"down", e))."""
        if shard is None:
            default_weight_loader(param, loaded)
            return
        part, expert = shard
        target = param.data[expert]
        if part != "down":
            target = target.narrow(0, 0 if part == "gate" else self.intermediate, self.intermediate)
        default_weight_loader(target, loaded)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return fused_moe(x.contiguous(), self.w13, self.w2, weights, ids)
        return ref_fused_moe(x, self.w13, self.w2, weights, ids)


class SparseMoE(nn.Module):
    """Router (`gate`, HF name) + top-k routing + experts."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        c = config
        self.layer_id = layer_id
        self.top_k, self.renormalize = c.num_experts_per_tok, c.norm_topk_prob
        self.gate = Linear(c.hidden_size, c.num_experts)
        self.experts: nn.Module = ResidentExperts(c.num_experts, c.hidden_size, c.moe_intermediate_size)
        self.shared_expert: GatedMLP | None = None
        if c.shared_expert_intermediate_size:
            # NOTE: Qwen2-MoE: every token also goes through a dense expert, gated by a sigmoid.
            self.shared_expert = GatedMLP(c.hidden_size, c.shared_expert_intermediate_size, c.hidden_act)
            self.shared_expert_gate = Linear(c.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def expert_target(name: str) -> tuple[str, tuple[str, int]] | None:
    """(our parameter name, shard) of a per-expert checkpoint tensor; None for other tensors."""
    match = EXPERT_TENSOR.match(name)
    if match is None:
        return None
    prefix, expert, sub = match.groups()
    part = EXPERT_PARTS[sub]
    return f"{prefix}.experts.{'w2' if part == 'down' else 'w13'}", (part, int(expert))


def stacked_target(name: str) -> str | None:
    """Our parameter name of a stacked (transformers 5) expert tensor; None for other tensors."""
    for theirs, ours in ((".experts.gate_up_proj", ".experts.w13"), (".experts.down_proj", ".experts.w2")):
        if name.endswith(theirs):
            return name[: -len(theirs)] + ours
    return None
