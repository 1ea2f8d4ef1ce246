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


def test_pack_linears_switches_our_linear_layers() -> None:
    from llmql.engine.layers.linear import Linear, pack_linears

    torch.manual_seed(0)
    model = nn.Sequential(Linear(16, 32, bias=True), nn.GELU(), Linear(32, 8))
    for m in model.modules():
        if isinstance(m, Linear):
            m.weight.data.normal_()
            if m.bias is not None:
                m.bias.data.normal_()
    x = torch.randn(2, 5, 16)
    want = model(x)
    assert pack_linears(model) == 2 and all(m.packed is not None for m in model if isinstance(m, Linear))
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-4)
    assert pack_linears(model) == 2  # idempotent
    assert pack_linears(nn.Sequential(Linear(4, 4).double())) == 0


def test_pack_linears_frees_float_weights_but_keeps_tied_ones() -> None:
    from llmql.engine.layers.linear import Linear, pack_linears

    torch.manual_seed(0)
    model = nn.Sequential(Linear(8, 8), Linear(8, 8), Linear(8, 8))
    for m in model:
        m.weight.data.normal_()
    model[2].weight = model[1].weight  # tied, as an LM head to its embedding
    x = torch.randn(3, 8)
    want = model(x)
    assert pack_linears(model) == 3
    assert model[0].weight.is_meta and model[0].weight.shape == (8, 8)
    assert not model[1].weight.is_meta and model[2].weight is model[1].weight
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-4)
    assert pack_linears(model) == 3  # idempotent after release
