"""llmql's own CPU kernels in C (csrc/*.c, AVX-512; csrc/avx2/*.c, AVX2), built on first use and loaded with ctypes.

The sources (and the headers they share) are compiled together with the system's C compiler (`$CC`, else `cc` or `gcc`)
into one shared library under `<cache>/kernels/`, keyed by the sources, the flags and the
compiler's version (about a second; atomic, so concurrent first uses are safe), and loaded
with ctypes: calls release the GIL, and their OpenMP threads are torch's own (the library
links the libgomp that torch has already loaded, so no second thread pool competes for the
cores). What each kernel computes: kernels/cpu_gemm.py, kernels/cpu_ops.py, kernels/attention_cpu.py
(`c_paged_attention`), kernels/lora_cpu.py (`c_lora_delta`).

Two builds of every kernel, with the same exports and values: `AVX512` (csrc/*.c) and `AVX2`
(AVX2 + FMA + F16C, csrc/avx2/*.c, for CPUs without AVX-512). `kernel_library(name)` is the
library whose `name` runs here: the AVX-512 one where it runs, else the AVX2 one where
torch's dispatch level is AVX2 or better; `kernel_available(name)` says whether one does
(False where neither runs: no such CPU, as torch's dispatch level says; no compiler;
`LLMQL_CPU_KERNELS=0`): callers then keep their torch paths. `LLMQL_CPU_KERNELS=avx2` turns
the AVX-512 library off and the AVX2 one on, as on a CPU without AVX-512.
`cpu_kernels_available()` says whether the AVX-512 library runs (engine/quantized.py's
choice of GEMM for large models).
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
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
AVX2_SRC = CSRC / "avx2"  # NOTE: a subfolder, so that the AVX-512 build's csrc/*.c leaves it out
SOURCES = tuple(sorted(CSRC.glob("*.c")))
HEADERS = tuple(sorted(CSRC.glob("*.h")))
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-ffp-contract=off",
         "-fopenmp", "-fPIC", "-shared")
AVX2_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared")
KERNEL_CHOICES = ("auto", "0", "avx2")  # LLMQL_CPU_KERNELS

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


class Build(NamedTuple):
    """One shared library: its sources and headers, compiler flags, exported functions, and
    the torch dispatch levels (`torch.backends.cpu.get_cpu_capability()`) it runs on."""

    name: str
    sources: tuple[Path, ...]
    headers: tuple[Path, ...]
    flags: tuple[str, ...]
    exports: tuple[str, ...]
    capabilities: tuple[str, ...]


AVX512 = Build("llmql_cpu", SOURCES, HEADERS, FLAGS, tuple(SIGNATURES), ("AVX512", "AMX"))
# NOTE: the AVX2 sources include csrc/'s ISA-independent drivers (*_driver.h): hashed with them
AVX2 = Build("llmql_avx2", tuple(sorted(AVX2_SRC.glob("*.c"))), (*HEADERS, *sorted(AVX2_SRC.glob("*.h"))), AVX2_FLAGS,
             tuple(SIGNATURES), ("AVX2", "AVX512", "AMX"))


def cpu_kernels_available() -> bool:
    """Whether llmql's AVX-512 library runs here: an x86 CPU with AVX-512, a C compiler that
    built it, and `LLMQL_CPU_KERNELS` "auto" (the default; "0" and "avx2" turn it off; read
    at each call: the layers ask at every forward, so the answer is cached per value of the
    variable)."""
    return _available(os.environ.get("LLMQL_CPU_KERNELS", ""))


def kernel_available(name: str) -> bool:
    """Whether the kernel `name` (an export, e.g. "llmql_rms_norm") runs here: on the AVX-512
    library where `cpu_kernels_available()`, else on the AVX2 one where it exports `name` (a
    CPU with AVX2, a C compiler, `LLMQL_CPU_KERNELS` not "0"; cached per value of the
    variable)."""
    raw = os.environ.get("LLMQL_CPU_KERNELS", "")
    return _kernel_mode(raw) != "0" and _kernel_library(raw, name) is not None


def kernel_library(name: str) -> ctypes.CDLL:
    """The library whose `name` runs here: the AVX-512 one where it loads, else the AVX2 one
    where it exports `name`; `LLMQL_CPU_KERNELS=avx2` forces the AVX2 one (a RuntimeError
    where neither has it). `LLMQL_CPU_KERNELS=0` governs the callers' choice of path
    (`kernel_available`), not this: weights already packed for a kernel keep running on it if
    the variable changes, and both builds read the same packed weights."""
    lib = _kernel_library(os.environ.get("LLMQL_CPU_KERNELS", ""), name)
    if lib is None:
        raise RuntimeError(f"llmql's CPU kernel {name} is not available here (see kernel_available)")
    return lib


@functools.cache
def _kernel_mode(raw: str) -> str:
    from llmql.settings import env_choice

    return env_choice("LLMQL_CPU_KERNELS", KERNEL_CHOICES, "auto")


@functools.cache
def _available(raw: str) -> bool:
    return _kernel_mode(raw) == "auto" and _load(AVX512) is not None


@functools.cache
def _kernel_library(raw: str, name: str) -> ctypes.CDLL | None:
    if _kernel_mode(raw) != "avx2" and (lib := _load(AVX512)) is not None:
        return lib
    return _load(AVX2) if name in AVX2.exports else None


@functools.cache
def _load(build: Build = AVX512) -> ctypes.CDLL | None:
    if torch.backends.cpu.get_cpu_capability() not in build.capabilities:
        return None
    try:
        lib = ctypes.CDLL(str(_build(build)))
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        log.warning("llmql's CPU kernels (%s) are unavailable (%s); using torch's paths", build.name, exc)
        return None
    for name in build.exports:
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int if name in RETURNS_INT else None
        fn.argtypes = SIGNATURES[name]
    return lib


def _build(build: Build = AVX512) -> Path:
    """Compile `build` once per (sources, flags, compiler) into the cache; return the path."""
    from llmql.settings import get_settings

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or $CC) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256(" ".join(build.flags).encode() + version.encode())
    for source in (*build.sources, *build.headers):
        digest.update(source.name.encode() + source.read_bytes())
    target = get_settings().cache_dir / "kernels" / f"{build.name}-{digest.hexdigest()[:12]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    done = subprocess.run([cc, *build.flags, "-o", str(tmp), *map(str, build.sources), "-lm"],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
    tmp.replace(target)  # NOTE: atomic; a concurrent build of the same key writes the same bytes
    return target
