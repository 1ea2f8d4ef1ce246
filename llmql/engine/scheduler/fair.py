"""`fair` (the default): the Virtual Token Counter across tenants ("Fairness in Serving
Large Language Models", arXiv 2401.00588), learned-length order within a tenant.

Each tenant (a query, a user, a server client: `GenerationRequest.tenant`) has a counter
of the service it received: `input_cost` per prompt token when a request is first
admitted, `output_cost` per generated token, divided by the tenant's weight. Admission
always serves the backlogged tenant with the smallest counter. When a tenant's queue goes
from empty to non-empty its counter is lifted to the smallest counter among backlogged
tenants, so idle time is not banked as credit. Inside a tenant requests keep `ltr`'s
order (bucketed SJF, arrival order inside a bucket): consecutive requests of one query
keep sharing their prefixes in the radix cache.

A step's time is shared by every request in it. While a tenant that received less
service is running, tenants ahead of it add one request or `shared_step_tokens` new prompt
tokens per step, so a large query's prefill does not slow each decode step of a small one (the
paper's setting, a GPU, runs extra prefill tokens nearly free; a CPU does not).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

from llmql.engine.scheduler.cache import CacheManager
from llmql.engine.scheduler.ltr import LTRPolicy
from llmql.engine.scheduler.request import Req, ScheduledBatch

DEFAULT_TENANT = ""


def tenant_of(req: Req) -> str:
    """The fairness group of a request ("" when unset)."""
    return req.params.tenant or DEFAULT_TENANT


class FairPolicy(LTRPolicy):
    """VTC across tenants; `weights[tenant]` (default 1) scales a tenant's share."""

    name = "fair"

    def __init__(self, weights: Mapping[str, float] | None = None, *, input_cost: float = 1.0,
                 output_cost: float = 2.0, shared_step_tokens: int = 64, **ltr: object) -> None:
        super().__init__(**ltr)  # type: ignore[arg-type]
        self.weights = dict(weights or {})
        self.input_cost, self.output_cost = input_cost, output_cost
        self.shared_step_tokens = shared_step_tokens
        self.counters: dict[str, float] = {}

    def admit(self, req: Req, picked: Sequence[Req], running: Sequence[Req]) -> bool:
        """Besides `ltr`'s predicted-KV check: while a tenant that received less service is
        running (or starting this step), tenants ahead of it add one request or at most
        `shared_step_tokens` new prompt tokens per step. Counters include this step's
        admissions (their prompts), so a tenant just lifted level with a large one is behind
        as soon as the large one's first request is picked. A step's time grows with its
        tokens (on a CPU, linearly): a full prefill budget of a large query would slow
        every decode step of a small one beside it."""
        if not super().admit(req, picked, running):
            return False
        tenant = tenant_of(req)
        pending: dict[str, float] = {}
        for r in (*picked, req):
            if not r.extra.get("charged"):
                t = tenant_of(r)
                pending[t] = pending.get(t, 0.0) + self.input_cost * r.prompt_len / self.weight(t)
        mine = self._level(tenant, pending)
        behind = {t for t in map(tenant_of, (*running, *picked))
                  if t != tenant and self._level(t, pending) < mine}
        if not behind:
            return True
        ahead = [r.seq_len - r.num_computed for r in picked if tenant_of(r) not in behind]
        return not ahead or sum(ahead) + req.seq_len - req.num_computed <= self.shared_step_tokens

    def _level(self, tenant: str, pending: Mapping[str, float]) -> float:
        return self.counters.get(tenant, 0.0) + pending.get(tenant, 0.0)

    def weight(self, tenant: str) -> float:
        return float(self.weights.get(tenant, 1.0))

    def on_add(self, req: Req, waiting: Sequence[Req], running: Sequence[Req]) -> None:
        """Counter lift when `req`'s tenant becomes backlogged."""
        tenant = tenant_of(req)
        backlogged = {tenant_of(r) for r in waiting} | {tenant_of(r) for r in running}
        counter = self.counters.setdefault(tenant, 0.0)
        if tenant not in backlogged and backlogged:
            self.counters[tenant] = max(counter, min(self.counters.get(t, 0.0) for t in backlogged))

    def order(self, waiting: Sequence[Req], kv: CacheManager) -> list[Req]:
        """Promoted requests first; then tenants interleaved by their counters as admitting
        each request would raise them (its prompt's input cost)."""
        ordered = super().order(waiting, kv)
        promoted = [r for r in ordered if r.extra.get("quantum", 0) > 0]
        queues: dict[str, list[Req]] = {}
        for req in ordered[len(promoted):]:
            queues.setdefault(tenant_of(req), []).append(req)
        heap = [(self.counters.get(t, 0.0), i, t) for i, t in enumerate(queues)]
        heapq.heapify(heap)
        out, pos = list(promoted), dict.fromkeys(queues, 0)
        while heap:
            counter, i, tenant = heapq.heappop(heap)
            req = queues[tenant][pos[tenant]]
            out.append(req)
            pos[tenant] += 1
            if pos[tenant] < len(queues[tenant]):
                cost = self.input_cost * req.prompt_len / self.weight(tenant)
                heapq.heappush(heap, (counter + cost, i, tenant))
        return out

    def on_step(self, batch: ScheduledBatch, waiting: Sequence[Req]) -> None:
        """Charge this step's service: prompts at first admission, one output token per
        sampled request."""
        super().on_step(batch, waiting)
        for req in batch.reqs:
            if not req.extra.get("charged"):
                req.extra["charged"] = True
                self._charge(req, self.input_cost * req.prompt_len)
        for req in batch.sampled_reqs:
            self._charge(req, self.output_cost)

    def victim(self, candidates: Sequence[Req]) -> Req:
        """Preempt from the tenant that received the most service."""
        top = max(self.counters.get(tenant_of(r), 0.0) for r in candidates)
        return super().victim([r for r in candidates if self.counters.get(tenant_of(r), 0.0) == top])

    def _charge(self, req: Req, cost: float) -> None:
        tenant = tenant_of(req)
        self.counters[tenant] = self.counters.get(tenant, 0.0) + cost / self.weight(tenant)
