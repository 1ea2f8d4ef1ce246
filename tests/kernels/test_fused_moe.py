"""The fused-MoE kernel against its torch reference (TRITON_INTERPRET=1 on CPU, small shapes)."""

from __future__ import annotations

import os

import pytest
import torch

from llmql.kernels.fused_moe import align_block_size, fused_moe, group_by_expert, ref_fused_moe

_SHAPES = [dict(t=5, h=32, i=16, e=4, k=2, seed=1), dict(t=1, h=48, i=40, e=6, k=3, seed=2)]


def _case(t: int, h: int, i: int, e: int, k: int, seed: int, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen)
    w13 = torch.randn(e, 2 * i, h, generator=gen) / h**0.5
    w2 = torch.randn(e, h, i, generator=gen) / i**0.5
    logits = torch.randn(t, e, generator=gen)
    weights, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    return [a.to(device) for a in (x, w13, w2, weights, ids)]


def _dense(x, w13, w2, weights, ids):
    """Every expert on every token, masked: an independent check of the reference."""
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        gate, up = (x @ w13[e].T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w2[e].T
        out += y * (weights * (ids == e)).sum(-1, keepdim=True)
    return out


def test_reference_matches_dense_computation() -> None:
    args = _case(t=9, h=16, i=8, e=5, k=2, seed=0)
    torch.testing.assert_close(ref_fused_moe(*args), _dense(*args), atol=1e-5, rtol=1e-5)


def test_group_and_align() -> None:
    ids = torch.tensor([[3, 0], [0, 2], [3, 1]])
    order, experts, counts = group_by_expert(ids)
    assert experts == [0, 1, 2, 3] and counts == [2, 1, 1, 2]
    assert ids.reshape(-1)[order].tolist() == [0, 0, 1, 2, 3, 3]
    sorted_ids, block_expert, total = align_block_size(ids, num_experts=5, block_m=4)
    assert total == 16 and block_expert.tolist() == [0, 1, 2, 3]  # expert 4 has no block
    blocks = sorted_ids.reshape(-1, 4).tolist()
    assert blocks[0] == [1, 2, 6, 6] and blocks[3] == [0, 4, 6, 6]  # 6 = T*K marks padding


def _triton_case(device: str, dtype: torch.dtype = torch.float32, **shape) -> None:
    """float32: within 1e-4 of the reference (IEEE products, not tf32); bfloat16 (products
    on the 16-bit path): against the float32 reference on the same bf16-rounded weights and
    inputs, within bf16 rounding of the kernel's two bf16 outputs (gate/up, then down)."""
    args = _case(device=device, **shape)
    if dtype == torch.float32:
        torch.testing.assert_close(fused_moe(*args), ref_fused_moe(*args), atol=1e-4, rtol=1e-4)
        return
    low = [a.to(dtype) for a in args[:3]] + args[3:]
    want = ref_fused_moe(*[a.float() for a in low[:3]], *args[3:])
    got = fused_moe(*low)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def _check_triton_interpreter() -> None:
    """Runs in a fresh process with TRITON_INTERPRET=1 (see the test below)."""
    for shape in _SHAPES:
        _triton_case("cpu", **shape)
        _triton_case("cpu", torch.bfloat16, **shape)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check is for CPU-only machines")
def test_triton_interpreter_matches_reference() -> None:
    """The kernels in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 on
    CPU-only machines before any kernel is defined) against the torch path."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    _check_triton_interpreter()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 7, 64, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_matches_reference(t: int, dtype: torch.dtype) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 set: the GPU sweep needs the compiled kernel")
    _triton_case("cuda", dtype, t=t, h=256, i=128, e=8, k=2, seed=t)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the engine may use triton")
def test_cpu_engine_import_does_not_load_triton() -> None:
    """The CPU path never imports triton (libtriton alone adds ~65 MiB of RSS): every kernel
    builds its Triton body on first use."""
    import subprocess
    import sys

    code = "import sys, llmql.engine.engine, llmql.engine.moe; print('triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.strip() == "False"
