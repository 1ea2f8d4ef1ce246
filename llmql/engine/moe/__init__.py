"""Expert offload for mixture-of-experts models: backing store (experts read from the model
files), the byte-budgeted expert cache (fast tier), prefetch and the offloaded expert layer."""

from llmql.engine.moe.cache import CacheStats, ExpertCache
from llmql.engine.moe.offload import ExpertOffload, OffloadedExperts, expert_stats, offload_experts
from llmql.engine.moe.store import ExpertStore, is_expert_tensor

__all__ = [
    "CacheStats",
    "ExpertCache",
    "ExpertOffload",
    "ExpertStore",
    "OffloadedExperts",
    "expert_stats",
    "is_expert_tensor",
    "offload_experts",
]
