"""Fixtures shared by the kernel tests."""

from __future__ import annotations

import pytest

from llmql.kernels.cpu_lib import kernel_available, kernel_library


@pytest.fixture(params=["auto", "avx2"])
def c_build(request, monkeypatch) -> str:
    """Each build of llmql's C kernels in turn (`LLMQL_CPU_KERNELS`): "auto" (AVX-512 where
    the CPU has it), "avx2" (the AVX2 build, as on a CPU without AVX-512, checked to be the
    library actually loaded); skipped where that build cannot run (no such CPU, no C
    compiler). Every kernel has both builds, so one export stands for all."""
    monkeypatch.setenv("LLMQL_CPU_KERNELS", request.param)
    if not kernel_available("llmql_rms_norm"):
        pytest.skip(f"no C kernel build for LLMQL_CPU_KERNELS={request.param} (CPU or C compiler)")
    if request.param == "avx2":  # NOTE: the AVX2 build itself, not the AVX-512 one again
        assert "llmql_avx2" in kernel_library("llmql_rms_norm")._name
    return request.param
