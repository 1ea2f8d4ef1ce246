"""Model runner: builds the `ForwardBatch` of a scheduled batch, runs the model, returns
the logits of the rows to sample (one per request whose chunk reaches its end)."""

from __future__ import annotations

import itertools

import torch

from llmql.engine.context import ForwardBatch, forward_context
from llmql.engine.kvcache.pool import KVPool
from llmql.engine.layers.quant_linear import trim_heap
from llmql.engine.lora.batch import LoraBatch
from llmql.engine.lora.pool import AdapterPool
from llmql.engine.sampler import TopLogits, plain_greedy
from llmql.engine.scheduler.request import Req, ScheduledBatch
from llmql.settings import env_int

TRIM_EVERY = 8  # CPU forwards between heap trims (`LLMQL_TRIM_EVERY`; 0: never)


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
        # NOTE: on CPU, glibc keeps the activations a forward frees in its heap (~100 MiB
        # on a 60-prompt decode of the default model); trimming every `trim_every` forwards
        # bounds that at the cost of re-faulting those pages once per period, not per step.
        self.trim_every = env_int("LLMQL_TRIM_EVERY", TRIM_EVERY) if self.device.type == "cpu" else 0
        self._forwards = self._trimmed_at = 0
        if packed_linears and self.device.type == "cpu":
            from llmql.engine.layers.linear import pack_linears
            from llmql.engine.layers.quant_linear import cap_heap_reuse

            # NOTE: float32 CPU GEMMs through oneDNN with pre-packed weights (~2x MKL here)
            pack_linears(model)
            trim_heap()  # NOTE: the float weights freed by packing stay in the heap otherwise
            cap_heap_reuse()

    def idle(self) -> None:
        """The engine has no work left: give what the last forwards freed back to the OS
        (CPU), so one call's leftovers do not add to the next call's peak."""
        if self.trim_every > 0 and self._trimmed_at != self._forwards:
            self._trim()

    def _trim(self) -> None:
        trim_heap()
        self._trimmed_at = self._forwards

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor | TopLogits:
        """Forward `batch`; returns logits [len(batch.sampled_reqs), vocab] float32, or only
        each row's best tokens (`TopLogits`) when every sampled request is `plain_greedy`
        and the LM head gives them without full logits (an int8 head)."""
        self._forwards += 1
        if self.trim_every > 0 and self._forwards % self.trim_every == 0:
            self._trim()
        input_ids, forward_batch = self.prepare(batch)
        with forward_context(forward_batch):
            hidden = self.model(input_ids, forward_batch.positions)
        sampled = [r for r, s in zip(batch.reqs, batch.samples) if s]
        narrow = [i for i, r in enumerate(sampled) if _choice_only(r)]
        if not narrow:
            if sampled and all(plain_greedy(r) for r in sampled):
                top = self.model.compute_top_logits(hidden)
                if top is not None:
                    return TopLogits(*top)
            return self._full_logits(sampled, hidden)
        # NOTE: a `choices` request needs only the logits of the tokens its constraint allows
        # (the LM head is a third of a decode step): those rows get just the union of their
        # allowed tokens, the rest -inf (what the sampler's mask gives them anyway), even when
        # the batch also holds free-text rows (concurrent queries share steps).
        index = torch.tensor(sorted({t for i in narrow for t in sampled[i].constraint.allowed()}),
                             dtype=torch.int64, device=hidden.device)
        logits = torch.full((hidden.shape[0], self.model.config.vocab_size), float("-inf"),
                            device=hidden.device)
        if len(narrow) == len(sampled):
            logits[:, index] = self.model.compute_logits(hidden, index)
            return logits
        rows = torch.tensor(narrow, dtype=torch.int64, device=hidden.device)
        logits[rows.unsqueeze(1), index] = self.model.compute_logits(hidden[rows], index)
        wide = sorted(set(range(len(sampled))) - set(narrow))
        rows = torch.tensor(wide, dtype=torch.int64, device=hidden.device)
        logits[rows] = self._full_logits([sampled[i] for i in wide], hidden[rows])
        return logits

    def _full_logits(self, reqs: list, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary for the rows of `reqs`."""
        logits = self.model.compute_logits(hidden)
        if getattr(self.model.lm_head, "int8", None) is not None:
            self._exact_where_constrained(reqs, hidden, logits)
        return logits

    def _exact_where_constrained(self, reqs: list, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """An int8 LM head's full logits are exact only at each row's top tokens
        (layers/quant_linear.py): give the tokens a constraint lets a request pick from
        their exact values (all choice tokens; a grammar's best `RESCORE_TOP` allowed ones),
        so a constrained answer does not depend on what shares its batch."""
        from llmql.engine.constrained import ChoiceState
        from llmql.engine.layers.quant_linear import RESCORE_TOP

        choice_tokens = sorted({t for r in reqs if isinstance(r.constraint, ChoiceState)
                                for t in r.constraint.allowed()})
        if choice_tokens:
            index = torch.tensor(choice_tokens, dtype=torch.int64, device=hidden.device)
            logits[:, index] = self.model.compute_logits(hidden, index)
        for i, req in enumerate(reqs):
            if req.constraint is None or isinstance(req.constraint, ChoiceState):
                continue
            allowed = torch.as_tensor(req.constraint.allowed(), dtype=torch.int64, device=hidden.device)
            if allowed.numel() > RESCORE_TOP:
                allowed = allowed[logits[i, allowed].topk(RESCORE_TOP).indices]
            logits[i, allowed] = self.model.compute_logits(hidden[i : i + 1], allowed)[0]

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, ForwardBatch]:
        """Flatten the batch (layout in `llmql.engine.context`).

        Index math is vectorised over requests (no per-token Python work beyond gathering
        the new token ids), and everything reaches the device in one host-to-device copy.
        """
        lens = torch.tensor(batch.extend_lens, dtype=torch.int64)
        starts = torch.tensor(batch.starts, dtype=torch.int64)
        ends = starts + lens
        qo = torch.cat([_ZERO, lens.cumsum(0)])
        kv = torch.cat([_ZERO, ends.cumsum(0)])
        total = int(qo[-1])
        offsets = torch.repeat_interleave(starts - qo[:-1], lens, output_size=total)
        positions = torch.arange(total) + offsets  # [T]: start + i for row i of each chunk
        chunks = list(zip(batch.reqs, batch.starts, batch.extend_lens))
        ids = torch.tensor(list(itertools.chain.from_iterable(
            r.token_ids[s : s + n] for r, s, n in chunks)), dtype=torch.int64)
        out_loc = torch.cat([r.slots[s : s + n] for r, s, n in chunks])
        kv_indices = torch.cat([r.slots[:e] for r, e in zip(batch.reqs, ends.tolist())])
        # NOTE: sampled rows follow `batch.samples`, the rule engine.step pairs logits with.
        rows = (qo[1:] - 1)[torch.tensor(batch.samples, dtype=torch.bool)]
        parts = _to_device([ids, positions, qo, kv, kv_indices, out_loc, rows], self.device)
        ids, positions, qo, kv, kv_indices, out_loc, rows = parts
        forward_batch = ForwardBatch(
            positions=positions, qo_indptr=qo, kv_indptr=kv, kv_indices=kv_indices,
            out_cache_loc=out_loc, kv_pool=self.pool, is_decode=batch.is_decode,
            logits_indices=rows, lora=self._lora(batch),
        )
        return ids, forward_batch

    def _lora(self, batch: ScheduledBatch) -> LoraBatch | None:
        """Segments and slots of the batch's adapters; None when every request is base."""
        adapters = [req.extra.get("lora") for req in batch.reqs]
        if self.adapters is None or all(a is None for a in adapters):
            return None
        slots = self.adapters.activate(adapters)
        return LoraBatch.build(self.adapters, list(batch.extend_lens), slots)


_ZERO = torch.zeros(1, dtype=torch.int64)


def _to_device(parts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """int64 CPU tensors -> the same on `device`, through one copy of their concatenation."""
    if device.type == "cpu":
        return parts
    flat = torch.cat(parts)
    if torch.cuda.is_available():
        flat = flat.pin_memory()
    return list(flat.to(device, non_blocking=True).split([p.numel() for p in parts]))


def _choice_only(req: Req) -> bool:
    """Whether `req` samples from its `choices` alone (`logprobs` need the full distribution)."""
    from llmql.engine.constrained import ChoiceState

    return isinstance(req.constraint, ChoiceState) and req.params.logprobs is None
