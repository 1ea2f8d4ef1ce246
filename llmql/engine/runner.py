"""Model runner: builds the `ForwardBatch` of a scheduled batch, runs the model, returns
the logits of the rows to sample (one per request whose chunk reaches its end)."""

from __future__ import annotations

import torch

from llmql.engine.context import ForwardBatch, forward_context
from llmql.engine.kvcache.pool import KVPool
from llmql.engine.scheduler.request import ScheduledBatch


class ModelRunner:
    """Runs `model(input_ids, positions)` + `model.compute_logits` over the paged KV pool."""

    def __init__(
        self, model: torch.nn.Module, pool: KVPool, device: str | torch.device,
        *, packed_linears: bool = True,
    ) -> None:
        self.model = model
        self.pool = pool
        self.device = torch.device(device)
        if packed_linears and self.device.type == "cpu":
            from llmql.engine.layers.linear import pack_linears

            # NOTE: float32 CPU GEMMs through oneDNN with pre-packed weights (~2x MKL here)
            pack_linears(model)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Forward `batch`; returns logits [len(batch.sampled_reqs), vocab] float32."""
        input_ids, forward_batch = self.prepare(batch)
        with forward_context(forward_batch):
            hidden = self.model(input_ids, forward_batch.positions)
        rows = _choice_tokens(batch)
        if rows is None:
            return self.model.compute_logits(hidden)
        # NOTE: every sampled request is a `choices` one: only the logits of the tokens their
        # constraints allow are computed (the LM head is a third of a decode step); the
        # others are -inf, which the sampler's masks would give them anyway.
        index = torch.tensor(rows, dtype=torch.int64, device=hidden.device)
        logits = torch.full((hidden.shape[0], self.model.config.vocab_size), float("-inf"),
                            device=hidden.device)
        logits[:, index] = self.model.compute_logits(hidden, index)
        return logits

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, ForwardBatch]:
        """Flatten the batch (layout in `llmql.engine.context`)."""
        ids: list[int] = []
        positions, out_loc, kv_indices = [], [], []
        qo, kv, rows = [0], [0], []
        # NOTE: sampled rows follow `batch.samples`, the rule engine.step pairs logits with.
        for req, start, n, sampled in zip(batch.reqs, batch.starts, batch.extend_lens, batch.samples):
            end = start + n
            ids.extend(req.token_ids[start:end])
            positions.append(torch.arange(start, end, dtype=torch.int64))
            out_loc.append(req.slots[start:end])
            kv_indices.append(req.slots[:end])
            qo.append(qo[-1] + n)
            kv.append(kv[-1] + end)
            if sampled:
                rows.append(qo[-1] - 1)
        dev = self.device
        forward_batch = ForwardBatch(
            positions=torch.cat(positions).to(dev),
            qo_indptr=torch.tensor(qo, dtype=torch.int64, device=dev),
            kv_indptr=torch.tensor(kv, dtype=torch.int64, device=dev),
            kv_indices=torch.cat(kv_indices).to(dev),
            out_cache_loc=torch.cat(out_loc).to(dev),
            kv_pool=self.pool,
            is_decode=batch.is_decode,
            logits_indices=torch.tensor(rows, dtype=torch.int64, device=dev),
        )
        return torch.tensor(ids, dtype=torch.int64, device=dev), forward_batch


def _choice_tokens(batch: ScheduledBatch) -> list[int] | None:
    """The union of allowed tokens when every sampled request is a `choices` request."""
    from llmql.engine.constrained import ChoiceState

    sampled = [r for r, s in zip(batch.reqs, batch.samples) if s]
    if not sampled or not all(isinstance(r.constraint, ChoiceState) for r in sampled):
        return None
    return sorted({t for r in sampled for t in r.constraint.allowed()})  # type: ignore[union-attr]
