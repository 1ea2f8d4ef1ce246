"""Expert offload: MoE layers run their experts through the expert cache, with prefetch.

Per MoE layer L (one forward):
    1. group the (token, slot) pairs by expert; score layer L's prediction against them;
    2. pin the needed experts already resident (so nothing evicts them mid-step) and queue
       the missing ones on the background loading thread, ahead of any prefetch;
    3. predict layer L+1's experts by applying L+1's router to L's input (pre-gating: each
       token's first choice) and queue them as prefetches behind L's misses;
    4. compute the resident experts (releasing each) while the misses load, then each miss as
       it arrives. A miss that found no room (every entry pinned) is loaded, computed and
       released alone. On CUDA, a cold expert with at most `cpu_tokens` tokens is computed
       on the CPU from the pinned backing copy instead (Fiddler's rule).
With budget 0 (naive on-demand loading) there is no background thread: every expert is read
when its turn comes, with the same reads.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import nn

from llmql.engine.config import ModelConfig
from llmql.engine.layers.moe import SparseMoE, route
from llmql.engine.moe.cache import ExpertCache
from llmql.engine.moe.store import Expert, ExpertStore
from llmql.kernels.fused_moe import expert_mlp, group_by_expert

HALF_LIFE = 3.0


class ExpertOffload:
    """The offload controller of one model: backing store, expert cache, routers, predictions."""

    def __init__(self, store: ExpertStore, cache: ExpertCache, moes: list[SparseMoE],
                 device: torch.device, *, prefetch: bool = True, cpu_tokens: int = 2) -> None:
        self.store, self.cache, self.moes, self.device = store, cache, moes, device
        self.prefetch = prefetch and cache.budget_bytes > 0
        self.cpu_tokens = cpu_tokens if device.type == "cuda" else 0
        self._predicted: dict[int, set[int]] = {}
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def load(self, key: tuple[int, int], out: Expert | None = None) -> Expert:
        """Backing tier -> fast tier (into `out`, an evicted expert's buffers, when given): a copy
        in RAM, or on the device through a side stream."""
        if self._stream is None:
            return self.store.load(*key, out=out)
        w13, w2 = self.store.load(*key)
        with torch.cuda.stream(self._stream):
            if out is None:
                out = w13.to(self.device, non_blocking=True), w2.to(self.device, non_blocking=True)
            else:
                out[0].copy_(w13, non_blocking=True)
                out[1].copy_(w2, non_blocking=True)
        self._stream.synchronize()
        return out

    def run(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The MoE output of `layer` for x [T, H] routed to ids [T, K] with weights [T, K]."""
        order, experts, counts = group_by_expert(ids)
        self._score_prediction(layer, experts)
        self.cache.begin(layer)
        starts = [0, *itertools.accumulate(counts)]
        groups = {e: order[a:b] for e, a, b in zip(experts, starts, starts[1:])}
        hot = [e for e in experts if self.cache.pin_if_resident((layer, e))]
        cold = [e for e in experts if e not in hot]
        loading = [key[1] for key in self.cache.start_loads(
            (layer, e) for e in cold if counts[experts.index(e)] > self.cpu_tokens)]
        if self.prefetch and layer + 1 < len(self.moes):
            self._prefetch_next(layer + 1, x)
        out = torch.zeros_like(x)
        flat_w, k = weights.reshape(-1), ids.shape[1]
        for e in [*hot, *loading]:
            try:
                self._compute(out, x, flat_w, groups[e], k, self.cache.acquire_pinned((layer, e)))
            finally:
                self.cache.release((layer, e))
        for e in cold:
            if e not in loading:
                self._compute_cold(out, x, flat_w, groups[e], k, (layer, e))
        return out

    def stats(self) -> dict[str, float]:
        """The cache's counters (hits, misses, bytes moved, prefetch accuracy, ...)."""
        return self.cache.snapshot()

    def _compute_cold(self, out, x, flat_w, pairs, k, key) -> None:
        if pairs.numel() <= self.cpu_tokens:
            # NOTE: Fiddler: a few tokens cost less on the CPU than moving the expert.
            w13, w2 = self.store.load(*key)
            tokens = pairs // k
            y = expert_mlp(x[tokens].to("cpu", w13.dtype), w13, w2).to(x.device, x.dtype)
            out.index_put_((tokens,), y * flat_w[pairs, None].to(y.dtype), accumulate=True)
            self.cache.stats.cpu_computed += 1
            return
        try:
            self._compute(out, x, flat_w, pairs, k, self.cache.acquire(key))
        finally:
            self.cache.release(key)

    @staticmethod
    def _compute(out, x, flat_w, pairs, k, expert) -> None:
        tokens = pairs // k
        y = expert_mlp(x[tokens], *expert)
        out.index_put_((tokens,), y * flat_w[pairs, None].to(y.dtype), accumulate=True)

    def _prefetch_next(self, layer: int, x: torch.Tensor) -> None:
        moe = self.moes[layer]
        _, ids = route(moe.gate(x), moe.top_k, moe.renormalize)
        # NOTE: each token's first choice only: the later ones are often wrong, and a wasted
        # prefetch costs the same bandwidth as a miss and evicts a useful expert (on the
        # 16x16 bench, all k choices moved 31% more bytes at a 50% budget, 32% at 25%).
        experts, counts = torch.unique(ids[:, 0], return_counts=True)
        ranked = [int(e) for e in experts[torch.argsort(counts, descending=True)]]
        self._predicted[layer] = set(ranked)
        # NOTE: at most the layer's share of the budget, most-routed first; a bigger prefetch
        # would evict the experts it is meant to sit beside.
        share = max(1, self.cache.capacity // len(self.moes))
        self.cache.prefetch([(layer, e) for e in ranked[:share]])

    def _score_prediction(self, layer: int, experts: list[int]) -> None:
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:
            self.cache.record_prediction(predicted, set(experts))


class OffloadedExperts(nn.Module):
    """Drop-in for `ResidentExperts`: no parameters, experts through the offload controller."""

    def __init__(self, layer_id: int, controller: ExpertOffload) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.controller = controller

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.controller.run(self.layer_id, x, weights, ids)


def offload_experts(
    model: nn.Module, directory: Path, config: ModelConfig, *, budget_gib: float,
    dtype: torch.dtype, device: str, prefetch: bool = True,
) -> ExpertOffload:
    """Replace every MoE layer's experts of `model` by offloaded ones over `directory`'s files.

    Call before `load_weights` (expert tensors then stay out of it: `is_expert_tensor`).
    Raises ValueError for a missing, truncated or corrupt expert tensor, or a budget that holds
    no expert (other than 0: on-demand loading without a cache).
    """
    if budget_gib < 0:
        raise ValueError(f"expert_cache_gib must be >= 0, got {budget_gib}")
    dev = torch.device(device)
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    store = ExpertStore(directory, config, dtype, pin_memory=dev.type == "cuda")
    holder: list[ExpertOffload] = []
    # NOTE: keys are (layer, expert), the layers visited in a cycle; an expert's use count
    # halves every HALF_LIFE visits of its layer (forwards) without a use.
    cache = ExpertCache(lambda key, out: holder[0].load(key, out), store.expert_bytes,
                        int(budget_gib * 2**30), half_life=HALF_LIFE, groups=max(1, len(moes)),
                        advise=lambda key: store.will_need(*key))
    controller = ExpertOffload(store, cache, moes, dev, prefetch=prefetch)
    holder.append(controller)
    for moe in moes:
        moe.experts = OffloadedExperts(moe.layer_id, controller)
    model.expert_offload = controller
    return controller


def expert_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """{"experts": counters} for a model with offloaded experts, else {}."""
    controller = getattr(model, "expert_offload", None)
    return {"experts": controller.stats()} if isinstance(controller, ExpertOffload) else {}
