"""The embedded engine: `load()` and `EmbeddedEngine` (submit / generate / cancel / close).

Main path: submit → the service's engine thread (`llmql.engine.service`) → step
(Scheduler.schedule → ModelRunner.run → Sampler.sample → Scheduler.postprocess) →
each finished request's future.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from llmql.engine.chat import resolve_chat
from llmql.engine.constrained import ConstraintBuilder
from llmql.engine.kvcache.base import create_prefix_cache
from llmql.engine.kvcache.pool import KVPool
from llmql.engine.layers.quant_linear import quantized_nbytes
from llmql.engine.lora import AdapterAdmission, AdapterError, AdapterPool
from llmql.engine.models import LoadedModel, load_model
from llmql.engine.moe import expert_stats
from llmql.engine.runner import ModelRunner
from llmql.engine.sampler import OutputProcessor, Sampler
from llmql.engine.scheduler.cache import CacheManager
from llmql.engine.scheduler.policy import create_policy
from llmql.engine.scheduler.predictor import template_key
from llmql.engine.scheduler.request import Req, ScheduledBatch
from llmql.engine.scheduler.scheduler import Scheduler
from llmql.engine.service import StepLoop, run_batch
from llmql.engine.types import (
    REQUEST_POLICIES,
    EngineStats,
    ErrorKind,
    GenerationRequest,
    GenerationResult,
    TextCallback,
)
from llmql.settings import KV_DTYPE_NAMES, get_settings

CPU_BATCH_TOKENS = 512  # default step budget on CPU (see `EngineConfig.batch_tokens`)
GPU_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings (validated). `kv_tokens` 0 means: size the pool from `kv_gib`."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    kv_dtype: torch.dtype | None = None  # K/V pool element type; None: `dtype`
    kv_tokens: int = 0
    kv_gib: float = 1.0
    page_size: int = 1
    prefix_cache: bool = True
    chunk_size: int = 512
    max_batch_tokens: int = 0  # 0: by device (`batch_tokens`)
    max_running: int = 64
    policy: str = "fair"
    threads: int = 0
    packed_linears: bool = True  # CPU float32: oneDNN GEMMs on pre-packed weights
    max_loras_per_batch: int = 8  # LoRA adapters in one batch (device slots)
    max_loaded_loras: int = 32  # LoRA adapters kept in host memory (LRU)

    def __post_init__(self) -> None:
        if self.kv_tokens < 0 or self.kv_gib <= 0 or self.threads < 0:
            raise ValueError("kv_tokens and threads must be >= 0 and kv_gib > 0")
        if min(self.page_size, self.chunk_size, self.max_running) <= 0 or self.max_batch_tokens < 0:
            raise ValueError("page_size, chunk_size, max_running must be > 0 and max_batch_tokens >= 0")

    @property
    def batch_tokens(self) -> int:
        """Most tokens in one step: `max_batch_tokens`, or by device when 0.

        On a CPU a step's time grows with its tokens, and a newly arrived request waits for
        the step in flight: a 2048-token prefill step runs 5-15 s on 2 cores, 512 tokens
        1-2 s. `CPU_BATCH_TOKENS` bounds that wait (a 20-row query beside a 400-row one:
        7.5x sooner than first-come-first-served) at a cost to one large batch alone (a
        200-row prefill-heavy batch on 2 cores ran 13% slower with the prefix cache, 25%
        without, than at 2048; `max_batch_tokens=2048` takes it back for batch-only use).
        A GPU runs extra prefill tokens nearly free, so it keeps the larger budget.
        """
        if self.max_batch_tokens:
            return self.max_batch_tokens
        return CPU_BATCH_TOKENS if torch.device(self.device).type == "cpu" else GPU_BATCH_TOKENS

    @property
    def pool_dtype(self) -> torch.dtype:
        """Element type of the K/V pool: `kv_dtype`, else the parameter dtype."""
        return self.kv_dtype or self.dtype

    def pool_tokens(self, lm: LoadedModel) -> int:
        """KV pool size in tokens: `kv_tokens`, else as many as fit in `kv_gib`."""
        if self.kv_tokens:
            return self.kv_tokens
        c = lm.config
        per_token = KVPool.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, self.pool_dtype)
        return max(1, int(self.kv_gib * 2**30) // per_token)


class EmbeddedEngine:
    """In-process engine over one model: radix prefix cache and continuous batching."""

    def __init__(self, lm: LoadedModel, config: EngineConfig, model_name: str | None = None) -> None:
        self.lm, self.config = lm, config
        self.model_name = model_name or lm.name  # identity in result-cache keys
        c = lm.config
        self.pool = KVPool(config.pool_tokens(lm), c.num_layers, c.num_kv_heads, c.head_dim,
                           dtype=config.pool_dtype, device=config.device)
        cache = create_prefix_cache("radix" if config.prefix_cache else "none", self.pool,
                                    config.page_size)
        self.kv = CacheManager(self.pool, cache)
        self.adapters = AdapterPool(
            c, max_loras_per_batch=config.max_loras_per_batch,
            max_loaded_loras=config.max_loaded_loras, device=config.device, dtype=config.dtype,
        )
        self.scheduler = Scheduler(
            self.kv, create_policy(config.policy), chunk_size=config.chunk_size,
            max_batch_tokens=config.batch_tokens, max_running=config.max_running,
            checks=[AdapterAdmission(config.max_loras_per_batch)],
        )
        self.runner = ModelRunner(lm.model, self.pool, config.device,
                                  packed_linears=config.packed_linears, adapters=self.adapters)
        self.sampler = Sampler(lm.tokenizer.token_bytes)
        self.output = OutputProcessor(lm.tokenizer)
        self._ids = itertools.count()
        self.constraints = ConstraintBuilder(lm.tokenizer)
        self._stats = EngineStats()
        self._stats_lock = threading.Lock()
        self.service = StepLoop(self)

    @property
    def max_in_flight(self) -> int:
        """How many requests a streaming caller should keep submitted (4x max_running):
        enough waiting work for the policy to choose from, little to cancel on Ctrl-C."""
        return 4 * self.config.max_running

    def submit(
        self, request: GenerationRequest, *, on_text: TextCallback | None = None
    ) -> Future[GenerationResult]:
        """Queue one request (thread-safe); its future completes with its result.

        The prompt is tokenized in the calling thread. `on_text` receives output text
        deltas on the engine thread (it must not block).
        """
        return self.service.submit(self._make_reqs([request])[0], on_text)

    def generate(
        self, requests: Sequence[GenerationRequest], *, progress: bool = False
    ) -> list[GenerationResult]:
        """Complete every request; results in request order (thread-safe).

        Bad requests do not stop the batch: an empty prompt, a prompt that does not fit the
        model context or the KV pool, or an unsupported option (an adapter that cannot be
        loaded, a json_schema outside the supported subset) gives that request `finish_reason="error"` with a
        message in `error`. `choices` ignore `max_tokens` (the answer is always whole).
        A KeyboardInterrupt while waiting cancels these requests and is re-raised.
        """
        futures = [self.service.submit(req) for req in self._make_reqs(requests)]
        return self.service.wait(futures, progress=progress)

    def cancel(self, futures: Iterable[Future]) -> None:
        """Cancel requests by their futures; their KV memory and radix locks are freed."""
        self.service.cancel(futures)

    def close(self) -> None:
        """Cancel what is in flight and stop the engine thread."""
        self.service.close()

    def step(self, scheduler: Scheduler | None = None) -> list[Req]:
        """One forward over the next batch; returns the requests that finished.

        Called on the engine thread only. An exception after scheduling is raised as the
        service's `_BatchFailed` naming the batch's requests (see `llmql.engine.service`).
        """
        scheduler = scheduler or self.scheduler
        batch, failed = scheduler.schedule()
        if batch is None:
            if not failed and scheduler.has_work:
                raise RuntimeError("scheduler made no progress (KV pool too small?)")
            return failed
        done = run_batch(batch.reqs, lambda: self._forward(scheduler, batch), failed)
        self._stats.computed_tokens += batch.num_tokens
        return failed + done

    def _forward(self, scheduler: Scheduler, batch: ScheduledBatch) -> list[Req]:
        logits = self.runner.run(batch)
        tokens = self.sampler.sample(batch.sampled_reqs, logits)
        return scheduler.postprocess(batch, tokens, self.output)

    def predicted_tokens(self, request: GenerationRequest) -> float | None:
        """Mean predicted output tokens of requests of `request`'s call template (None: the
        policy has no predictor or too little data for that template)."""
        ids = [] if isinstance(request.prompt, str) else list(request.prompt)
        return self.scheduler.policy.predicted_tokens(template_key(request, ids))

    def stats(self) -> EngineStats:
        """Totals since the engine was created (a copy)."""
        extra = {"preemptions": self.scheduler.preemptions, "evicted_tokens": self.kv.evicted_tokens,
                 "kv_slots": self.pool.num_slots, "cached_size": self.kv.cache.cached_size,
                 **expert_stats(self.lm.model), **self.adapters.stats()}
        return dataclasses.replace(self._stats, extra=extra)

    def _make_reqs(self, requests: Sequence[GenerationRequest]) -> list[Req]:
        requests = [resolve_chat(self.lm.tokenizer, r) for r in requests]
        texts = [r.prompt for r in requests if isinstance(r.prompt, str)]
        encoded = iter(self.lm.tokenizer.encode_batch(texts) if texts else [])
        return [self._make_req(r, next(encoded) if isinstance(r.prompt, str) else list(r.prompt))
                for r in requests]

    def _make_req(self, request: GenerationRequest, ids: list[int]) -> Req:
        max_ctx = self.lm.config.max_context
        room = max_ctx - len(ids)
        req = Req(next(self._ids), ids, request, min(request.max_tokens, room))
        error = _check(request, ids, max_ctx, self.pool.num_slots)
        if error:
            req.finish("error", error[1], error[0])
        elif request.adapter is not None and not self._attach_adapter(req, request.adapter):
            pass
        elif request.choices is not None:
            req.max_new_tokens = room  # NOTE: choices ignore max_tokens: the answer is whole
            req.constraint = self.constraints.choices(request.choices)
        elif req.max_new_tokens <= 0:
            req.finish("length")
        elif request.json_schema is not None:
            try:
                req.constraint = self.constraints.json_schema(request.json_schema, req.max_new_tokens)
            except ValueError as exc:
                req.finish("error", str(exc), ErrorKind.BAD_REQUEST)
        return req

    def check_adapter(self, name: str) -> None:
        """Load and validate adapter `name` now; raises `AdapterError` (a ValueError) if it
        cannot be used with this model. Callers use it to fail before any model call."""
        self.adapters.get(name, self._busy_adapters())

    def _attach_adapter(self, req: Req, name: str) -> bool:
        try:
            req.extra["lora"] = self.adapters.get(name, self._busy_adapters())
        except AdapterError as exc:
            req.finish("error", str(exc), ErrorKind.BAD_REQUEST)
            return False
        return True

    def _busy_adapters(self) -> set[str]:
        # NOTE: called from callers' threads while the engine thread mutates the queues.
        for _ in range(8):
            try:
                reqs = [*self.scheduler.running, *self.scheduler.waiting]
                break
            except RuntimeError:  # deque mutated during iteration
                continue
        else:
            reqs = []
        return {r.extra["lora"].fingerprint for r in reqs if r.extra.get("lora") is not None}

    def _account(self, req: Req) -> None:
        """Add a finished request to the totals (engine thread, or the caller for rejects)."""
        with self._stats_lock:
            s = self._stats
            s.requests += 1
            s.prompt_tokens += req.prompt_len if req.finish_reason != "error" else 0
            s.cached_tokens += max(req.cached_tokens, 0)
            s.output_tokens += len(req.output_ids)


def _check(request: GenerationRequest, ids: list[int], max_ctx: int, slots: int) -> tuple[str, str] | None:
    """Why `request` cannot run, as (ErrorKind, message); None if it can."""
    if not ids or request.prompt == "":
        return ErrorKind.BAD_REQUEST, "empty prompt"
    if len(ids) >= max_ctx:
        return ErrorKind.CONTEXT_OVERFLOW, f"prompt has {len(ids)} tokens; the model context is {max_ctx}"
    if len(ids) + 1 > slots:
        return ErrorKind.CONTEXT_OVERFLOW, f"prompt has {len(ids)} tokens; the KV pool holds only {slots}"
    if request.choices is not None and not request.choices:
        return ErrorKind.BAD_REQUEST, "choices is empty"
    if request.logprobs is not None and not 0 <= request.logprobs <= 20:
        return ErrorKind.BAD_REQUEST, f"logprobs must be 0..20, got {request.logprobs}"
    if request.policy is not None and request.policy not in REQUEST_POLICIES:
        return ErrorKind.BAD_REQUEST, f"policy must be one of {REQUEST_POLICIES} or None, got {request.policy!r}"
    if request.cache_salt is not None and not isinstance(request.cache_salt, str):
        return ErrorKind.BAD_REQUEST, f"cache_salt must be a string or None, got {request.cache_salt!r}"
    if request.chat:
        return (ErrorKind.BAD_REQUEST,
                "chat=True needs a text prompt and a model with a chat template that renders it")
    return None


KV_DTYPES = {name: getattr(torch, name) for name in KV_DTYPE_NAMES}


def resolve_kv_dtype(kv_dtype: str | torch.dtype | None, lm: LoadedModel | None, device: str
                     ) -> torch.dtype | None:
    """The K/V pool's element type for `kv_dtype`: a torch dtype or one of `KV_DTYPES`'
    names; "auto" or None: float16 on CPU when the model runs quantized weights (as
    llama.cpp keeps its KV cache: half the pool's memory, and on these models the float16
    rounding is far below the weights' own), else None (the parameter dtype). With `lm`
    None only the name is checked (before a model is loaded)."""
    if isinstance(kv_dtype, torch.dtype):
        return kv_dtype
    name = (kv_dtype or "auto").lower()
    if name != "auto" and name not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be 'auto' or one of {sorted(KV_DTYPES)}, got {kv_dtype!r}")
    if name != "auto":
        return KV_DTYPES[name]
    quantized = lm is not None and quantized_nbytes(lm.model) > 0
    return torch.float16 if quantized and torch.device(device).type == "cpu" else None


def load(
    model: str | None = None, *, policy: str | None = None,
    expert_cache_gib: float | None = None, **settings: object
) -> EmbeddedEngine:
    """Load `model` (None: LLMQL_MODEL, "default": Gemma 3 270M) into an embedded engine.

    Args:
        model: "default", a GGUF file or a Hugging Face model directory.
        policy: scheduling policy: "fair" (VTC across tenants, learned-length order inside
            each), "ltr" (learned-length shortest first), "fcfs"; None = LLMQL_POLICY.
        expert_cache_gib: MoE models: GiB of experts kept in fast memory, the rest read
            from the model files when used (None: LLMQL_EXPERT_CACHE_GIB, unset = all
            resident; 0: no cache, each expert loaded when used). `expert_prefetch=False`
            turns prefetch off.
        **settings: `quantization` ("auto" | "none" | "int8" | "int4"; default
            LLMQL_QUANTIZATION, see `llmql.engine.models.load_model`), `kv_dtype` (see
            `resolve_kv_dtype`; default LLMQL_KV_DTYPE), and EngineConfig fields (device, dtype, kv_tokens, kv_gib, page_size,
            prefix_cache, chunk_size, max_batch_tokens, max_running, threads);
            unset ones come from `llmql.settings.get_settings()`.
    """
    base = get_settings()
    settings["policy"] = policy or base.policy
    prefetch = settings.pop("expert_prefetch", True)
    device = str(settings.pop("device", base.resolved_device()))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = settings.pop("dtype", torch.bfloat16 if device == "cuda" else torch.float32)
    quantization = str(settings.pop("quantization", base.quantization))
    kv_dtype = settings.pop("kv_dtype", base.kv_dtype)
    resolve_kv_dtype(kv_dtype, None, device)  # NOTE: a bad name fails before the model loads
    config = EngineConfig(device=device, dtype=dtype,  # type: ignore[arg-type]
                          kv_tokens=int(settings.pop("kv_tokens", base.kv_tokens)),  # type: ignore[call-overload]
                          kv_gib=float(settings.pop("kv_gib", base.kv_gib)),  # type: ignore[arg-type]
                          threads=int(settings.pop("threads", base.threads)),  # type: ignore[call-overload]
                          **settings)  # type: ignore[arg-type]
    if config.threads:
        torch.set_num_threads(config.threads)
    source = model or base.model
    gib = base.expert_cache_gib if expert_cache_gib is None else expert_cache_gib
    lm = load_model(source, dtype=config.dtype, device=device, cache_dir=base.cache_dir,
                    expert_cache_gib=gib, expert_prefetch=bool(prefetch), quantization=quantization)
    config = dataclasses.replace(config, kv_dtype=resolve_kv_dtype(kv_dtype, lm, device))
    # NOTE: the same identity the udfs use for `model := ...` and LLMQL_MODEL, so results
    # cached through either path are found through the other.
    return EmbeddedEngine(lm, config, model_name=source)
