"""Dequantising matmul: the chunked CPU path and the Triton kernel against dequantise-then-matmul.

The Triton kernel runs on CPU under TRITON_INTERPRET=1 (small shapes) and on CUDA in the
`gpu` sweep.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from llmql.kernels.quant_matmul import dequantize, ref_quant_matmul

HAS_TRITON = importlib.util.find_spec("triton") is not None
# NOTE: (bits, group, offset, with zeros): Q4_0, Q4_K / int4, Q6_K, Q5_K, Q8_0 / Q5_0
LAYOUTS = [(4, 32, 8, False), (4, 32, 0, True), (8, 16, 0, False), (8, 32, 0, True), (8, 32, 0, False)]


def make_case(n: int, k: int, bits: int, group: int, zeros: bool, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if bits == 4:
        q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    else:
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    s = torch.rand(n, k // group, generator=gen) * 0.02
    z = torch.randn(n, k // group, generator=gen) * 0.01 if zeros else None
    return [t if t is None else t.to(device) for t in (q, s, z)]


@pytest.mark.parametrize("bits,group,offset,zeros", LAYOUTS)
@pytest.mark.parametrize("m,chunk", [(1, 16), (7, None), (33, 40)])
def test_ref_matches_dequantise_then_matmul(bits, group, offset, zeros, m, chunk) -> None:
    q, s, z = make_case(100, 128, bits, group, zeros)
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m))
    w = dequantize(q, s, z, bits=bits, group=group, offset=offset)
    got = ref_quant_matmul(x, q, s, z, bits=bits, group=group, offset=offset, chunk=chunk)
    torch.testing.assert_close(got, x @ w.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits,group,offset,zeros", LAYOUTS)
def test_bfloat16_tiles_within_bfloat16_rounding(bits, group, offset, zeros) -> None:
    """dtype=bfloat16 (the engine's tiles on AMX CPUs): each product's operands (x, the
    tile's q * scale) and the sum rounded to bfloat16 (2^-9 relative each), so the error is
    within 2^-7 of sum |x| |q * scale| (the groups' shifts are added in float32)."""
    q, s, z = make_case(100, 128, bits, group, zeros)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(3))
    kw = dict(bits=bits, group=group, offset=offset)
    got = ref_quant_matmul(x, q, s, z, **kw, dtype=torch.bfloat16)
    exact = x.double() @ dequantize(q, s, z, **kw).double().T
    tile = dequantize(q, s, None, bits=bits, group=group).double()  # q * scale, as the tile holds it
    bound = 2**-7 * (x.abs().double() @ tile.abs().T) + 1e-5
    assert got.dtype == torch.float32 and ((got.double() - exact).abs() <= bound).all()
    assert not torch.equal(got, ref_quant_matmul(x, q, s, z, **kw))  # it did round


def test_four_bit_packing_is_low_nibble_first() -> None:
    q = torch.tensor([[0x21, 0x43]], dtype=torch.uint8)
    w = dequantize(q, torch.ones(1, 1), None, bits=4, group=4)
    assert w.tolist() == [[1.0, 2.0, 3.0, 4.0]]


def _check_triton_interpreter() -> None:
    """Runs in a fresh process with TRITON_INTERPRET=1 (see the test below)."""
    from llmql.kernels.quant_matmul import triton_quant_matmul

    for i, (bits, group, offset, zeros) in enumerate(LAYOUTS):
        q, s, z = make_case(40, 64, bits, group, zeros, seed=i)
        x = torch.randn(5, 64)
        kw = dict(bits=bits, group=group, offset=offset)
        got = triton_quant_matmul(x, q, s, z, **kw, block_m=16, block_n=32)
        torch.testing.assert_close(got, ref_quant_matmul(x, q, s, z, **kw), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check is for CPU-only machines")
def test_triton_interpreter_matches_reference() -> None:
    """The kernels in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 on
    CPU-only machines before any kernel is defined) against the torch path."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    _check_triton_interpreter()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("bits,group,offset,zeros", LAYOUTS)
@pytest.mark.parametrize("m,n,k", [(1, 4096, 640), (37, 1000, 2048), (512, 1536, 640)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_sweep(bits, group, offset, zeros, m, n, k, dtype) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 set: the GPU sweep needs the compiled kernel")
    from llmql.kernels.quant_matmul import triton_quant_matmul

    q, s, z = make_case(n, k, bits, group, zeros, device="cuda")
    x = torch.randn(m, k, device="cuda").to(dtype)
    kw = dict(bits=bits, group=group, offset=offset)
    want = ref_quant_matmul(x.float().cpu(), q.cpu(), s.cpu(), None if z is None else z.cpu(), **kw)
    got = triton_quant_matmul(x, q, s, z, **kw).cpu()
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
