"""The oneDNN packed CPU linear against its reference (`F.linear`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmql.kernels.linear import (
    cpu_packed_linear,
    onednn_available,
    pack_linear_weight,
    ref_linear,
    use_packed_linears,
)

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN ops")


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_matches_reference(rows: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 96, generator=gen), torch.randn(80, 96, generator=gen)
    b = torch.randn(80, generator=gen) if bias else None
    torch.testing.assert_close(cpu_packed_linear(x, pack_linear_weight(w), b), ref_linear(x, w, b),
                               rtol=1e-5, atol=1e-4)


def test_use_packed_linears_switches_modules() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8, bias=False))
    x = torch.randn(2, 5, 16)
    want = model(x)
    assert use_packed_linears(model, lambda m: isinstance(m, nn.Linear)) == 2
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert use_packed_linears(model, lambda m: isinstance(m, nn.Linear)) == 2  # idempotent
    assert use_packed_linears(nn.Linear(4, 4).double(), lambda m: isinstance(m, nn.Linear)) == 0
