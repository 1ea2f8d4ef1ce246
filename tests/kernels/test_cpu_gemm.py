"""The grouped int8 kernel, its AVX-512 and AVX2 builds, against its torch reference
(dequantise, then matmul).

Kernel tests run once per build (`LLMQL_CPU_KERNELS` "auto": AVX-512 where the CPU has it;
"avx2": the AVX2 build, as on a CPU without AVX-512) and skip where that build does not run
(no such CPU, no C compiler): the engine then keeps the torch path, which
tests/kernels/test_quant_matmul.py covers.
"""

from __future__ import annotations

import pytest
import torch

from llmql.kernels.cpu_gemm import (
    grouped_gemm,
    pack_grouped,
    ref_grouped_gemm,
    unpack_grouped,
)
from llmql.kernels.cpu_lib import (
    AVX2,
    AVX512,
    cpu_kernels_available,
    kernel_available,
    kernel_library,
)
from llmql.kernels.quant_matmul import dequantize


@pytest.fixture
def kernel(c_build: str) -> str:
    """The C kernel build under test (tests/kernels/conftest.py: `c_build`)."""
    return c_build


def make_case(n: int, k: int, group: int, zeros: bool, seed: int = 0, bits: int = 8):
    gen = torch.Generator().manual_seed(seed)
    if bits == 4:
        q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    else:
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    s = (torch.rand(n, k // group, generator=gen) * 0.02).half()  # NOTE: GGUF scales are float16
    z = torch.randn(n, k // group, generator=gen) * 0.01 if zeros else None
    return q, s, z


# NOTE: (bits, group, offset, zeros) of Q6_K, Q4_K widened, Q8_0 / Q5_0, Q4_0 widened, Q4_0 and
# Q4_K as nibbles
LAYOUTS = [(8, 16, 0, False), (8, 32, 0, True), (8, 32, 0, False), (8, 32, 8, False), (4, 32, 8, False),
           (4, 32, 0, True)]


@pytest.mark.parametrize("bits,group,offset,zeros", LAYOUTS)
def test_packing_keeps_the_values(bits, group, offset, zeros) -> None:
    q, s, z = make_case(70, 96, group, zeros, bits=bits)
    w = pack_grouped(q, s, z, group=group, offset=offset, bits=bits)
    assert w.q.shape == (3, 96, 32 if bits == 8 else 16) and w.n == 70  # NOTE: 70 rows in 3 blocks
    torch.testing.assert_close(unpack_grouped(w), dequantize(q, s, z, bits=bits, group=group, offset=offset),
                               atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("bits,group,offset,zeros", LAYOUTS)
@pytest.mark.parametrize("m", [0, 1, 2, 3, 5, 6, 7, 8, 9, 13, 61, 64, 130])
@pytest.mark.parametrize("n", [96, 100])
def test_kernel_matches_reference(kernel, bits, group, offset, zeros, m, n) -> None:
    """Every row count a build splits differently (registers up to 6 rows; 8-row (AVX-512) or
    6-row (AVX2) tiles and their tails above), column counts that are and are not a multiple
    of 32 (the AVX2 build's two 16-column halves and masked tails), 8- and 4-bit."""
    q, s, z = make_case(n, 192, group, zeros, seed=m, bits=bits)
    w = pack_grouped(q, s, z, group=group, offset=offset, bits=bits)
    x = torch.randn(m, 192, generator=torch.Generator().manual_seed(1))
    got = grouped_gemm(x, w)
    assert got.shape == (m, n)
    torch.testing.assert_close(got, ref_grouped_gemm(x, w), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("m", [3, 9])
def test_strided_input_and_output_columns(kernel, m) -> None:
    """x with a row stride (a column slice of a wider tensor) and output written into the
    columns of a wider tensor (how packed parts of one layer fill one output), for rows
    multiplied in registers (3) and from the dequantised buffer (9)."""
    q, s, z = make_case(40, 64, 32, True)
    w = pack_grouped(q, s, z, group=32)
    wide = torch.randn(m, 100)
    x = wide[:, 10:74]
    out = torch.full((m, 50), 7.0)
    grouped_gemm(x, w, out[:, 5:45])
    torch.testing.assert_close(out[:, 5:45], ref_grouped_gemm(x, w), atol=2e-5, rtol=1e-5)
    assert (out[:, :5] == 7).all() and (out[:, 45:] == 7).all()  # nothing written outside


def test_threads_do_not_change_the_answer(kernel) -> None:
    q, s, z = make_case(256, 128, 32, False)
    w = pack_grouped(q, s, z, group=32)
    x = torch.randn(20, 128)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grouped_gemm(x, w)
        torch.set_num_threads(2)
        two = grouped_gemm(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # NOTE: blocks are split between threads, never a sum


def test_bad_input_is_refused() -> None:
    q, s, _ = make_case(32, 64, 32, False)
    with pytest.raises(ValueError, match="int8"):
        pack_grouped(q.float(), s, None, group=32)
    with pytest.raises(ValueError, match="bits 4"):
        pack_grouped(q, s, None, group=32, bits=4)  # NOTE: int8 values are not nibbles
    with pytest.raises(ValueError, match="scales"):
        pack_grouped(q, s[:, :1], None, group=32)
    if kernel_available("llmql_grouped_gemm"):
        w = pack_grouped(q, s, None, group=32)
        with pytest.raises(ValueError, match="float32"):
            grouped_gemm(torch.randn(3, 64).double(), w)
        with pytest.raises(ValueError, match="float32"):
            grouped_gemm(torch.randn(3, 65), w)


def test_disabled_by_setting(monkeypatch) -> None:
    """`LLMQL_CPU_KERNELS=0` turns the kernels off for new choices; a weight packed before
    keeps running on its kernel (it has no other form)."""
    runs = kernel_available("llmql_grouped_gemm")
    q, s, _ = make_case(32, 64, 32, False)
    w = pack_grouped(q, s, None, group=32)
    monkeypatch.setenv("LLMQL_CPU_KERNELS", "0")
    assert not cpu_kernels_available() and not kernel_available("llmql_grouped_gemm")
    if runs:
        x = torch.randn(2, 64)
        torch.testing.assert_close(grouped_gemm(x, w), ref_grouped_gemm(x, w), atol=2e-5, rtol=1e-5)
    monkeypatch.setenv("LLMQL_CPU_KERNELS", "yes")
    with pytest.raises(ValueError, match="LLMQL_CPU_KERNELS"):
        cpu_kernels_available()


def test_avx2_setting_picks_the_avx2_build(monkeypatch) -> None:
    """`LLMQL_CPU_KERNELS=avx2` simulates a CPU without AVX-512: the AVX-512 library is off
    and every kernel (each has an AVX2 build) runs on the AVX2 build; "auto" prefers the
    AVX-512 build."""
    monkeypatch.setenv("LLMQL_CPU_KERNELS", "avx2")
    assert not cpu_kernels_available()
    assert set(AVX2.exports) == set(AVX512.exports)
    if not kernel_available("llmql_grouped_gemm"):
        pytest.skip("no AVX2 CPU or C compiler")
    for name in AVX2.exports:
        assert kernel_available(name) and "llmql_avx2" in kernel_library(name)._name
    monkeypatch.setenv("LLMQL_CPU_KERNELS", "auto")
    for name in AVX2.exports:
        assert kernel_available(name)
        assert ("llmql_avx2" in kernel_library(name)._name) != cpu_kernels_available()
