"""LoRA-aware admission: a batch never holds more distinct adapters than the device slots."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmql.engine.scheduler.request import Req


def adapter_key(req: Req) -> str | None:
    """The content fingerprint of `req`'s adapter (None: the base model)."""
    adapter = req.extra.get("lora")
    return None if adapter is None else adapter.fingerprint


class AdapterAdmission:
    """Admission check the prefill admitter consults (see `PrefillAdmitter(checks=...)`).

    Every running request decodes in every step, so the adapters of the running requests,
    those picked this step and the candidate must fit `max_loras_per_batch` slots.
    """

    def __init__(self, max_loras_per_batch: int) -> None:
        self.max_loras_per_batch = max_loras_per_batch

    def allows(self, req: Req, picked: Sequence[Req], running: Sequence[Req]) -> bool:
        key = adapter_key(req)
        if key is None:
            return True
        keys = {adapter_key(r) for r in (*running, *picked)} - {None}
        return key in keys or len(keys) < self.max_loras_per_batch
