"""Dynamic-int8 linear (FBGEMM) against its torch reference and against float32."""

from __future__ import annotations

import pytest
import torch

from llmql.kernels.int8_linear import (
    int8_linear,
    int8_linear_available,
    pack_int8_weight,
    ref_int8_linear,
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
