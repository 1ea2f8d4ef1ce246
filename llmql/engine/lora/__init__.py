"""Multi-LoRA serving (S-LoRA / Punica): PEFT adapters, the adapter pool, per-segment deltas."""

from llmql.engine.lora.adapter import AdapterError, LoraAdapter, adapter_fingerprint, load_adapter
from llmql.engine.lora.admission import AdapterAdmission
from llmql.engine.lora.pool import AdapterPool

__all__ = ["AdapterAdmission", "AdapterError", "AdapterPool", "LoraAdapter", "adapter_fingerprint",
           "load_adapter"]
