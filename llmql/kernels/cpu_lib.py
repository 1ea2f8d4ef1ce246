"""llmql's own CPU kernels in C (csrc/*.c, AVX-512), built on first use and loaded with ctypes.

The sources (and the headers they share) are compiled together with the system's C compiler (`$CC`, else `cc` or `gcc`)
into one shared library under `<cache>/kernels/`, keyed by the sources, the flags and the
compiler's version (about a second; atomic, so concurrent first uses are safe), and loaded
with ctypes: calls release the GIL, and their OpenMP threads are torch's own (the library
links the libgomp that torch has already loaded, so no second thread pool competes for the
cores). `cpu_kernels_available()` is False where this cannot run (a CPU without AVX-512, as
torch's dispatch level says; no compiler; `LLMQL_CPU_KERNELS=0`): callers then keep their
torch paths. What each kernel computes: kernels/cpu_gemm.py, kernels/cpu_ops.py, kernels/attention_cpu.py
(`c_paged_attention`), kernels/lora_cpu.py (`c_lora_delta`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(sorted(CSRC.glob("*.c")))
HEADERS = tuple(sorted(CSRC.glob("*.h")))
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-ffp-contract=off",
         "-fopenmp", "-fPIC", "-shared")

_long, _ptr, _int, _float = ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "llmql_grouped_gemm": [_ptr, _long, _long, _long, _ptr, _int, _ptr, _ptr, _long, _long, _ptr, _long, _int],
    "llmql_rms_norm": [_ptr, _long, _long, _long, _ptr, _float, _ptr, _long, _int],
    "llmql_gated_act": [_ptr, _long, _long, _long, _int, _ptr, _long, _int],
    "llmql_norm_rope": [_ptr, _long, _long, _long, _long, _ptr, _float, _ptr, _ptr, _ptr, _int],
    "llmql_paged_attention": [_ptr, _ptr, _ptr, _int, _long, _long, _long, _ptr, _ptr, _long, _ptr, _float,
                              _long, _ptr, _int],
    "llmql_lora_delta": [_ptr, _long, _long, _ptr, _ptr, _long, _ptr, _ptr, _long, _long, _ptr, _long, _ptr,
                         _ptr, _long, _int],
}
RETURNS_INT = ("llmql_grouped_gemm", "llmql_paged_attention", "llmql_lora_delta")


def cpu_kernels_available() -> bool:
    """Whether llmql's C kernels run here: an x86 CPU with AVX-512, a C compiler that built
    them, and `LLMQL_CPU_KERNELS` not "0" (default "auto"; read at each call: the layers ask
    at every forward, so the answer is cached per value of the variable)."""
    return _available(os.environ.get("LLMQL_CPU_KERNELS", ""))


@functools.cache
def _available(raw: str) -> bool:
    from llmql.settings import env_choice

    if env_choice("LLMQL_CPU_KERNELS", ("auto", "0"), "auto") == "0":
        return False
    return _load() is not None


def library() -> ctypes.CDLL:
    """The loaded library (a RuntimeError where it cannot be built or loaded here).
    `LLMQL_CPU_KERNELS` governs the callers' choice of path (`cpu_kernels_available`), not
    this: weights already packed for a kernel keep running on it if the variable changes."""
    lib = _load()
    if lib is None:
        raise RuntimeError("llmql's CPU kernels are not available here (see cpu_kernels_available)")
    return lib


@functools.cache
def _load() -> ctypes.CDLL | None:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        log.warning("llmql's CPU kernels are unavailable (%s); using torch's paths", exc)
        return None
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int if name in RETURNS_INT else None
        fn.argtypes = argtypes
    return lib


def _build() -> Path:
    """Compile the sources once per (sources, flags, compiler) into the cache; return the path."""
    from llmql.settings import get_settings

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or $CC) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256(" ".join(FLAGS).encode() + version.encode())
    for source in (*SOURCES, *HEADERS):
        digest.update(source.name.encode() + source.read_bytes())
    target = get_settings().cache_dir / "kernels" / f"llmql_cpu-{digest.hexdigest()[:12]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    done = subprocess.run([cc, *FLAGS, "-o", str(tmp), *map(str, SOURCES), "-lm"],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
    tmp.replace(target)  # NOTE: atomic; a concurrent build of the same key writes the same bytes
    return target
