"""`ltr`: shortest predicted job first, with a learned length predictor and the paper's
starvation guard ("Efficient LLM Scheduling by Learning to Rank", arXiv 2408.15792).

- Waiting requests run in order of predicted output length (`LengthPredictor`), bucketed
  in half-octaves so that requests of similar length keep their arrival order: the
  optimizer's send order, which shares prefixes in the radix cache.
- Templates the predictor has not learned yet go first, in arrival order (FCFS fallback,
  and they produce the training data).
- Starvation guard: a request left waiting `starve_steps` steps is promoted ahead of every
  other for a quantum of `quantum` steps it runs, then demoted back to its predicted place.
- KV admission reserves each running request's predicted remaining output (not
  `max_tokens`); preemption, longest predicted remaining first, stays the safety net.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from llmql.engine.scheduler.cache import CacheManager
from llmql.engine.scheduler.policy import SchedulingPolicy
from llmql.engine.scheduler.predictor import LengthPredictor, features, template_key
from llmql.engine.scheduler.request import Req, ScheduledBatch


class LTRPolicy(SchedulingPolicy):
    """Learned-length SJF with a starvation guard (defaults from the paper: 200 / 10)."""

    name = "ltr"
    inner = "ltr"

    def __init__(self, predictor: LengthPredictor | None = None, *, starve_steps: int = 200,
                 quantum: int = 10) -> None:
        self.predictor = predictor or LengthPredictor()
        self.starve_steps, self.quantum = starve_steps, quantum
        self.history: deque[tuple[float, int]] = deque(maxlen=100_000)  # (predicted, actual)

    # -- predictions ----------------------------------------------------------------------
    def info(self, req: Req) -> dict:
        """The request's template key, features and (cached) prediction."""
        info = req.extra.get("ltr")
        if info is None:
            prompt = req.token_ids[: req.prompt_len]
            info = {"key": template_key(req.params, prompt),
                    "x": features(prompt, req.params.max_tokens), "seen": -1, "pred": None}
            req.extra["ltr"] = info
        t = self.predictor.templates.get(info["key"])
        seen = t.seen if t is not None else 0
        if info["pred"] is None and seen != info["seen"]:  # NOTE: re-ask once new data came
            info["seen"], info["pred"] = seen, self.predictor.predict(info["key"], info["x"])
        return info

    def predicted(self, req: Req) -> float | None:
        """Predicted output tokens of `req` (None: its template has too little data)."""
        return self.info(req)["pred"]

    def predicted_tokens(self, template: str) -> float | None:
        return self.predictor.mean_length(template)

    # -- ordering ---------------------------------------------------------------------------
    def order(self, waiting: Sequence[Req], kv: CacheManager) -> list[Req]:
        promoted = [r for r in waiting if r.extra.get("quantum", 0) > 0]
        rest = [r for r in waiting if r.extra.get("quantum", 0) <= 0]
        return promoted + sorted(rest, key=self.sort_key)

    def sort_key(self, req: Req) -> tuple[int, int]:
        """Unknown lengths first (FCFS), then half-octave buckets of the predicted length;
        arrival order inside a bucket (prefix locality)."""
        pred = self.predicted(req)
        bucket = -1 if pred is None else int(2 * math.log2(pred + 1))
        return bucket, req.rid

    def admit(self, req: Req, picked: Sequence[Req], running: Sequence[Req]) -> bool:
        """Admit only if the predicted outputs of the running requests still fit."""
        if not running and not picked:
            return True
        reserve = sum(self._remaining(r) for r in (*running, *picked))
        need = req.seq_len - req.num_computed + self._remaining(req)
        return self.kv.available - reserve >= need

    def victim(self, candidates: Sequence[Req]) -> Req:
        """The running request with the longest predicted remaining output (never a
        promoted one while others remain)."""
        return max(candidates, key=lambda r: (r.extra.get("quantum", 0) <= 0,
                                              self._remaining(r, unknown=math.inf), r.rid))

    def order_running(self, running: Sequence[Req]) -> list[Req]:
        """Promoted requests, then shortest predicted remaining output first (unknown last):
        when memory runs short, the requests nearest their end keep their slots."""
        return sorted(running, key=lambda r: (r.extra.get("quantum", 0) <= 0,
                                              self._remaining(r, unknown=math.inf), r.rid))

    # -- hooks ------------------------------------------------------------------------------
    def on_step(self, batch: ScheduledBatch, waiting: Sequence[Req]) -> None:
        """Starvation guard: count idle steps of waiting requests; spend quanta of running
        promoted ones."""
        for req in waiting:
            idle = req.extra.get("idle", 0) + 1
            req.extra["idle"] = idle
            if idle >= self.starve_steps and req.extra.get("quantum", 0) <= 0:
                req.extra["quantum"] = self.quantum
        for req in batch.reqs:
            req.extra["idle"] = 0
            if req.extra.get("quantum", 0) > 0:
                req.extra["quantum"] -= 1

    def on_finish(self, req: Req) -> None:
        if req.finish_reason not in ("stop", "length") or req.error:
            return
        info = self.info(req)
        if info["pred"] is not None:
            self.history.append((info["pred"], len(req.output_ids)))
        self.predictor.observe(info["key"], info["x"], len(req.output_ids))

    def _remaining(self, req: Req, unknown: float = 0.0) -> float:
        """Predicted output tokens still to come (`unknown` without a prediction)."""
        pred = self.predicted(req)
        if pred is None:
            return unknown
        return max(min(pred, req.max_new_tokens) - len(req.output_ids), 1.0)
