"""Loading models with quantized weights (`quantization` "auto", "int8", "int4").

A GGUF file is read in place: its quantized tensors become `QuantWeight`s one at a time
(no float32 copy on disk or in memory); only the config and tokenizer are cached, in
`<cache>/models/<name>-<key>-meta/`. Float checkpoints are quantized as they stream in.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from llmql.engine.layers.quant_linear import (
    finalize_quantized,
    int8_gemm_wanted,
    quantized_nbytes,
    trim_heap,
)
from llmql.engine.models import LoadedModel
from llmql.engine.tokenizer import Tokenizer
from llmql.kernels.cpu_lib import cpu_kernels_available
from llmql.kernels.linear import amx_available
from llmql.settings import env_choice

log = logging.getLogger(__name__)


def load_gguf(path: Path, cache: Path, *, dtype: torch.dtype, device: str, quantization: str) -> LoadedModel:
    """A GGUF model with its quantized tensors kept quantized (see the module docstring)."""
    from llmql.engine.loader import build_model, read_config
    from llmql.engine.weights.gguf import GGUFFile
    from llmql.engine.weights.gguf_quant import iter_gguf

    start = time.perf_counter()
    gguf = GGUFFile(path)
    meta_dir = _meta_cache(path, cache, gguf)
    config = read_config(meta_dir)
    tokenizer = Tokenizer.from_dir(meta_dir, config.eos_token_ids)
    trim_heap()  # NOTE: the tokenizer's JSON parse leaves ~200 MiB free but held (262k vocab)
    model = build_model(config, dtype=dtype, device=device)
    in_file = str(device).startswith("cpu") and int8_gemm_wanted()  # NOTE: see FileQuantWeight
    model.load_weights(iter_gguf(gguf, config, quantization, embedding_in_file=in_file))
    layers = finalize_quantized(model, layers=layer_mode(gguf, quantization, device))
    trim_heap()
    log.info("loaded %s (%d quantized layers, %.0f MiB) in %.1fs", path.name, layers,
             quantized_nbytes(model) / 2**20, time.perf_counter() - start)
    return LoadedModel(model=model.eval(), config=config, tokenizer=tokenizer, name=path.stem.lower())


def load_quantized_weights(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]],
                           mode: str) -> None:
    """Load a float checkpoint stream, quantizing its 2-D weights ("int8"/"int4")."""
    from llmql.engine.weights.gguf_quant import quantize_stream

    model.load_weights(quantize_stream(tensors, mode))  # type: ignore[operator]
    finalize_quantized(model, layers="int8" if mode == "int8" and int8_gemm_wanted() else "exact")


def layer_mode(gguf: object, quantization: str, device: str) -> str:
    """How a GGUF's linears run (`finalize_quantized`'s `layers`).

    "int8": the int8 GEMM where it runs (approximate: about half to three quarters of the
    default model's 16-token greedy answers equal the float32 ones). "auto" on a CPU with the
    int8 GEMM: weight-only group-wise linears ("grouped": the GGUF values kept as int8 with
    their group scales, dequantised tile by tile into a reused float32 buffer at each matmul,
    or in cache by the C kernel of kernels/cpu_gemm.py where it runs, so the arithmetic
    is float32's) for a small model, whose float32 linears take at most
    1/16 of the machine's memory (the default 270M model: 383 MiB as float32, ~110 MiB
    grouped; "bf16", the same with bfloat16 tiles and GEMMs, where `LLMQL_CPU_BF16=1` opts
    in on a CPU with AMX: 2-4x faster linears, but bfloat16's rounding changes 20-30% of the
    default model's 16-token greedy answers), else the int8 GEMM (1B and up). Where llmql's
    AVX-512 kernels run (`cpu_kernels_available()`), "grouped" for every size: the kernel keeps
    4-bit values 4-bit, is exact and as fast as the int8 GEMM (a 1.1B Q4_0 Llama, 32 rows x 16
    tokens: 5.53 s against 5.92, 2026-12-04). Its AVX2 build (CPUs without AVX-512) runs the
    small models' grouped linears, but large models keep the int8 GEMM there: the AVX2 build
    matched it only at 1 row (a 1.1B gate+up, 2048 -> 5632, 1 thread, on the AVX-512 box:
    1.19 ms against 1.19 at 1 row, 10.2 against 3.4 at 32), and it was never measured on a
    CPU that has AVX2 alone. Otherwise the exact group-wise path.
    """
    from llmql.engine.loader import _physical_memory

    if not (str(device).startswith("cpu") and int8_gemm_wanted()) or quantization not in ("auto", "int8"):
        return "exact"
    if quantization == "int8":
        return "int8"
    small = gguf.linear_float32_bytes() <= _physical_memory() // 16  # type: ignore[attr-defined]
    if small and bf16_tiles_wanted():
        return "bf16"
    return "grouped" if small or cpu_kernels_available() else "int8"


def bf16_tiles_wanted() -> bool:
    """`LLMQL_CPU_BF16=1` (default 0) and a CPU with AMX: a small model's grouped linears
    multiply bfloat16 tiles ("bf16" in `layer_mode`)."""
    return env_choice("LLMQL_CPU_BF16", ("0", "1"), "0") == "1" and amx_available()


def _meta_cache(path: Path, cache: Path, gguf: object) -> Path:
    """Config and tokenizer of a GGUF file, written once (atomically) under `cache`."""
    from llmql.engine.loader import CONFIG_FILE, _file_key

    target = cache / "models" / f"{path.stem.lower()}-{_file_key(path)}-meta"
    if (target / CONFIG_FILE).exists():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    Tokenizer.from_gguf(gguf.metadata).save(tmp)  # type: ignore[attr-defined]
    (tmp / CONFIG_FILE).write_text(json.dumps(gguf.config().to_dict(), indent=1))  # type: ignore[attr-defined]
    try:
        tmp.rename(target)
    except OSError:  # NOTE: another process wrote the same files first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
