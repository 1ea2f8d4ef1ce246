"""Dynamic-int8 linears (FBGEMM's, oneDNN's) against their torch references and float32."""

from __future__ import annotations

import pytest
import torch

from llmql.kernels.int8_linear import (
    int8_linear,
    int8_linear_available,
    onednn_int8_available,
    onednn_int8_linear,
    pack_int8_weight,
    pack_onednn_int8,
    ref_int8_linear,
    ref_onednn_int8_linear,
)

pytestmark = pytest.mark.skipif(not int8_linear_available(), reason="no FBGEMM int8 linear on this CPU")


@pytest.mark.parametrize("m,n,k", [(1, 64, 32), (5, 300, 640), (24, 96, 128), (130, 40, 256)])
def test_matches_reference(m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, k, generator=gen) + 0.3
    w = torch.randn(n, k, generator=gen) * 0.05
    got = int8_linear(x, pack_int8_weight(w))
    ref = ref_int8_linear(x, w)
    # NOTE: FBGEMM and the reference may round an activation to the neighbouring step.
    x_step = float(x.max() - min(float(x.min()), 0.0)) / 127
    w_abs = w.abs().amax(dim=1)
    torch.testing.assert_close(got, ref, atol=float(4 * x_step * w_abs.max()), rtol=1e-4)
    # NOTE: and both stay within the quantization error of the exact product
    bound = x.abs().sum(-1, keepdim=True) * (w_abs / 254) + x_step / 2 * w.abs().sum(-1) + 1e-4
    assert ((got - x @ w.T).abs() <= 1.01 * bound + 4 * x_step * w_abs).all()


def test_leading_dims_and_zero_rows() -> None:
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    packed = pack_int8_weight(w)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    got = int8_linear(x, packed)
    assert got.shape == (2, 3, 16)
    torch.testing.assert_close(got.reshape(6, 16), int8_linear(x.reshape(6, 32), packed))
    assert int8_linear(torch.zeros(0, 32), packed).shape == (0, 16)


@pytest.mark.skipif(not onednn_int8_available(), reason="no oneDNN int8 linear in this torch build")
@pytest.mark.parametrize("m,n,k", [(0, 40, 64), (1, 64, 32), (17, 300, 640), (60, 96, 128)])
def test_onednn_int8_matches_reference(m: int, n: int, k: int) -> None:
    """oneDNN's int8 GEMM (the LM head's on AMX CPUs) = its torch reference (8-bit activations
    per tensor, per-channel int8 weights, exact integer sums), and within that rounding of
    the float product."""
    gen = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, k, generator=gen) * 3 + 0.3
    w = torch.randn(n, k, generator=gen) * 0.05
    got = onednn_int8_linear(x, pack_onednn_int8(w))
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref_onednn_int8_linear(x, w), atol=1e-4, rtol=1e-4)
    if m:
        x_step = float(x.max() - min(float(x.min()), 0.0)) / 255
        w_abs = w.abs().amax(dim=1)
        bound = x.abs().sum(-1, keepdim=True) * (w_abs / 254) + x_step / 2 * w.abs().sum(-1) + 1e-4
        assert ((got - x @ w.T).abs() <= 1.01 * bound).all()
