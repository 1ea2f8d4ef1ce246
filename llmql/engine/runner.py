"""Model runner: builds the `ForwardBatch` of a scheduled batch, runs the model, returns
the logits of the rows to sample (one per request whose chunk reaches its end)."""

from __future__ import annotations

import torch

from llmql.engine.context import ForwardBatch, forward_context
from llmql.engine.kvcache.pool import KVPool
from llmql.engine.lora.batch import LoraBatch
from llmql.engine.lora.pool import AdapterPool
from llmql.engine.scheduler.request import ScheduledBatch


class ModelRunner:
    """Runs `model(input_ids, positions)` + `model.compute_logits` over the paged KV pool."""

    def __init__(
        self, model: torch.nn.Module, pool: KVPool, device: str | torch.device,
        *, packed_linears: bool = True, adapters: AdapterPool | None = None,
    ) -> None:
        self.model = model
        self.adapters = adapters
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
        return self.model.compute_logits(hidden)

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
            lora=self._lora(batch),
        )
        return torch.tensor(ids, dtype=torch.int64, device=dev), forward_batch

    def _lora(self, batch: ScheduledBatch) -> LoraBatch | None:
        """Segments and slots of the batch's adapters; None when every request is base."""
        adapters = [req.extra.get("lora") for req in batch.reqs]
        if self.adapters is None or all(a is None for a in adapters):
            return None
        slots = self.adapters.activate(adapters)
        return LoraBatch.build(self.adapters, list(batch.extend_lens), slots)
