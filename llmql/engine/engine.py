"""The embedded engine: `load()` and `EmbeddedEngine.generate`.

Main path: generate → step (Scheduler.schedule → ModelRunner.run → Sampler.sample →
Scheduler.postprocess) until every request finished.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmql.engine.constrained import ConstraintBuilder
from llmql.engine.kvcache.base import create_prefix_cache
from llmql.engine.kvcache.pool import KVPool
from llmql.engine.models import LoadedModel, load_model
from llmql.engine.runner import ModelRunner
from llmql.engine.sampler import OutputProcessor, Sampler
from llmql.engine.scheduler.cache import CacheManager
from llmql.engine.scheduler.policy import create_policy
from llmql.engine.scheduler.request import Req
from llmql.engine.scheduler.scheduler import Scheduler
from llmql.engine.types import EngineStats, GenerationRequest, GenerationResult
from llmql.settings import get_settings


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings (validated). `kv_tokens` 0 means: size the pool from `kv_gib`."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    kv_tokens: int = 0
    kv_gib: float = 1.0
    page_size: int = 1
    prefix_cache: bool = True
    chunk_size: int = 512
    max_batch_tokens: int = 2048
    max_running: int = 64
    policy: str = "fcfs"
    threads: int = 0
    packed_linears: bool = True  # CPU float32: oneDNN GEMMs on pre-packed weights

    def __post_init__(self) -> None:
        if self.kv_tokens < 0 or self.kv_gib <= 0 or self.threads < 0:
            raise ValueError("kv_tokens and threads must be >= 0 and kv_gib > 0")
        if min(self.page_size, self.chunk_size, self.max_batch_tokens, self.max_running) <= 0:
            raise ValueError("page_size, chunk_size, max_batch_tokens, max_running must be > 0")

    def pool_tokens(self, lm: LoadedModel) -> int:
        """KV pool size in tokens: `kv_tokens`, else as many as fit in `kv_gib`."""
        if self.kv_tokens:
            return self.kv_tokens
        c = lm.config
        per_token = KVPool.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, self.dtype)
        return max(1, int(self.kv_gib * 2**30) // per_token)


class EmbeddedEngine:
    """In-process engine over one model: radix prefix cache and continuous batching."""

    def __init__(self, lm: LoadedModel, config: EngineConfig, model_name: str | None = None) -> None:
        self.lm, self.config = lm, config
        self.model_name = model_name or lm.name  # identity in result-cache keys
        c = lm.config
        self.pool = KVPool(config.pool_tokens(lm), c.num_layers, c.num_kv_heads, c.head_dim,
                           dtype=config.dtype, device=config.device)
        cache = create_prefix_cache("radix" if config.prefix_cache else "none", self.pool,
                                    config.page_size)
        self.kv = CacheManager(self.pool, cache)
        self.scheduler = Scheduler(
            self.kv, create_policy(config.policy), chunk_size=config.chunk_size,
            max_batch_tokens=config.max_batch_tokens, max_running=config.max_running,
        )
        self.runner = ModelRunner(lm.model, self.pool, config.device,
                                  packed_linears=config.packed_linears)
        self.sampler = Sampler()
        self.output = OutputProcessor(lm.tokenizer)
        self._ids = itertools.count()
        self.constraints = ConstraintBuilder(lm.tokenizer)
        self._stats = EngineStats()

    def generate(
        self, requests: Sequence[GenerationRequest], *, progress: bool = True
    ) -> list[GenerationResult]:
        """Complete every request; results in request order.

        Bad requests do not stop the batch: an empty prompt, a prompt that does not fit the
        model context or the KV pool, or an unsupported option (a LoRA adapter, a json_schema
        outside the supported subset) gives that request `finish_reason="error"` with a
        message in `error`. `choices` ignore `max_tokens` (the answer is always whole).
        """
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        texts = [r.prompt for r in requests if isinstance(r.prompt, str)]
        encoded = iter(self.lm.tokenizer.encode_batch(texts) if texts else [])
        reqs = [self._make_req(r, next(encoded) if isinstance(r.prompt, str) else list(r.prompt))
                for r in requests]
        for req in reqs:
            if not req.finished:
                self.scheduler.add(req)
        bar = tqdm(total=len(reqs), disable=not progress, desc="llmql", unit="req")
        bar.update(sum(r.finished for r in reqs))
        computed0, shown = self._stats.computed_tokens, 0.0
        with torch.inference_mode():
            while self.scheduler.has_work:
                bar.update(len(self.step()))
                if progress and time.perf_counter() - shown > 0.5:
                    shown = time.perf_counter()
                    _postfix(bar, reqs, self._stats.computed_tokens - computed0, shown - t0)
        bar.close()
        self._account(reqs, time.perf_counter() - t0)
        return [r.result() for r in reqs]

    def step(self) -> list[Req]:
        """One forward over the next batch; returns the requests that finished."""
        batch, failed = self.scheduler.schedule()
        if batch is None:
            if not failed and self.scheduler.has_work:
                raise RuntimeError("scheduler made no progress (KV pool too small?)")
            return failed
        logits = self.runner.run(batch)
        tokens = self.sampler.sample(batch.sampled_reqs, logits)
        done = self.scheduler.postprocess(batch, tokens, self.output)
        self._stats.computed_tokens += batch.num_tokens
        return failed + done

    def stats(self) -> EngineStats:
        """Totals since the engine was created (a copy)."""
        extra = {"preemptions": self.scheduler.preemptions, "evicted_tokens": self.kv.evicted_tokens,
                 "kv_slots": self.pool.num_slots, "cached_size": self.kv.cache.cached_size}
        return dataclasses.replace(self._stats, extra=extra)

    def _make_req(self, request: GenerationRequest, ids: list[int]) -> Req:
        max_ctx = self.lm.config.max_context
        room = max_ctx - len(ids)
        req = Req(next(self._ids), ids, request, min(request.max_tokens, room))
        error = _check(request, ids, max_ctx, self.pool.num_slots)
        if error:
            req.finish("error", error)
        elif request.choices is not None:
            req.max_new_tokens = room  # NOTE: choices ignore max_tokens: the answer is whole
            req.constraint = self.constraints.choices(request.choices)
        elif req.max_new_tokens <= 0:
            req.finish("length")
        elif request.json_schema is not None:
            try:
                req.constraint = self.constraints.json_schema(request.json_schema, req.max_new_tokens)
            except ValueError as exc:
                req.finish("error", str(exc))
        return req

    def _account(self, reqs: list[Req], seconds: float) -> None:
        s = self._stats
        s.requests += len(reqs)
        s.prompt_tokens += sum(r.prompt_len for r in reqs if r.finish_reason != "error")
        s.cached_tokens += sum(max(r.cached_tokens, 0) for r in reqs)
        s.output_tokens += sum(len(r.output_ids) for r in reqs)
        s.seconds += seconds


def _postfix(bar, reqs: list[Req], computed: int, elapsed: float) -> None:
    """Progress-bar postfix: computed tokens/s and the prefix-cache hit rate so far."""
    started = [r for r in reqs if r.cached_tokens >= 0]
    prompt = sum(r.prompt_len for r in started)
    hit = sum(r.cached_tokens for r in started) / prompt if prompt else 0.0
    bar.set_postfix(tok_s=f"{computed / max(elapsed, 1e-9):.0f}", hit=f"{hit:.0%}", refresh=False)


def _check(request: GenerationRequest, ids: list[int], max_ctx: int, slots: int) -> str | None:
    """Why `request` cannot run (None if it can)."""
    if not ids or request.prompt == "":
        return "empty prompt"
    if len(ids) >= max_ctx:
        return f"prompt has {len(ids)} tokens; the model context is {max_ctx}"
    if len(ids) + 1 > slots:
        return f"prompt has {len(ids)} tokens; the KV pool holds only {slots}"
    if request.choices is not None and not request.choices:
        return "choices is empty"
    if request.adapter is not None:
        return "LoRA adapters are not supported by the embedded engine yet"
    return None


def load(model: str | None = None, **settings: object) -> EmbeddedEngine:
    """Load `model` (None: LLMQL_MODEL, "default": Gemma 3 270M) into an embedded engine.

    Args:
        model: "default", a GGUF file or a Hugging Face model directory.
        **settings: `quantization` ("auto" | "none" | "int8" | "int4"; default
            LLMQL_QUANTIZATION, see `llmql.engine.models.load_model`), and
            EngineConfig fields (device, dtype, kv_tokens, kv_gib, page_size,
            prefix_cache, chunk_size, max_batch_tokens, max_running, policy, threads);
            unset ones come from `llmql.settings.get_settings()`.
    """
    base = get_settings()
    device = str(settings.pop("device", base.resolved_device()))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = settings.pop("dtype", torch.bfloat16 if device == "cuda" else torch.float32)
    quantization = str(settings.pop("quantization", base.quantization))
    config = EngineConfig(device=device, dtype=dtype,  # type: ignore[arg-type]
                          kv_tokens=int(settings.pop("kv_tokens", base.kv_tokens)),  # type: ignore[call-overload]
                          kv_gib=float(settings.pop("kv_gib", base.kv_gib)),  # type: ignore[arg-type]
                          threads=int(settings.pop("threads", base.threads)),  # type: ignore[call-overload]
                          **settings)  # type: ignore[arg-type]
    if config.threads:
        torch.set_num_threads(config.threads)
    source = model or base.model
    lm = load_model(source, dtype=config.dtype, device=device, cache_dir=base.cache_dir,
                    quantization=quantization)
    # NOTE: the same identity the udfs use for `model := ...` and LLMQL_MODEL, so results
    # cached through either path are found through the other.
    return EmbeddedEngine(lm, config, model_name=source)
