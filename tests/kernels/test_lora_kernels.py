"""LoRA shrink/expand (SGMV/BGMV): the torch path against a per-row oracle, and the Triton
kernels against the torch path (TRITON_INTERPRET=1 on CPU, compiled on CUDA)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from llmql.kernels.lora_cpu import (
    bmm_lora,
    c_lora_delta,
    gathered_lora,
    padded_rows,
    segment_lora,
    slot_order,
)
from llmql.kernels.lora_expand import ref_lora_expand
from llmql.kernels.lora_shrink import ref_lora_shrink

HAS_TRITON = importlib.util.find_spec("triton") is not None

# NOTE: (segment lengths, segment slots): prefill segments, decode rows (BGMV), base rows,
# empty segments, one slot in several segments (non-contiguous rows).
CASES = [
    ([5, 3, 7], [1, 0, 2]),
    ([1, 1, 1, 1, 1], [2, 0, 1, 2, 3]),
    ([0, 4, 0, 2, 3], [1, 2, 3, 0, 1]),
    ([17, 2], [3, 3]),
    ([3], [0]),
    ([26, 5, 1], [2, 0, 2]),
]




def make_case(lens, slots, k=40, outs=(24, 8, 8), stride=8, ranks=(0, 4, 8, 2), seed=0,
              device="cpu", dtype=torch.float32):
    """x, stacked A/B with zero padding beyond each slot's rank, and the segment tensors."""
    gen = torch.Generator().manual_seed(seed)
    n_sub, s = len(outs), len(ranks)
    x = torch.randn(sum(lens), k, generator=gen)
    a = torch.zeros(s, n_sub * stride, k)
    b = torch.zeros(s, sum(outs), stride)
    for slot, r in enumerate(ranks):
        for i in range(n_sub):
            a[slot, i * stride : i * stride + r] = torch.randn(r, k, generator=gen)
        b[slot, :, :r] = torch.randn(sum(outs), r, generator=gen)
    indptr = torch.tensor([0, *lens]).cumsum(0)
    offsets = [0, *torch.tensor(outs).cumsum(0).tolist()]
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return (to(x), to(a), to(b), indptr.to(device), torch.tensor(slots, device=device),
            torch.tensor(ranks, device=device), stride, offsets)


def oracle(x, a, b, indptr, slots, ranks, stride, offsets):
    """Row by row: (shrink output, delta) of every token."""
    bounds = indptr.tolist()
    xa = torch.zeros(x.shape[0], a.shape[1])
    delta = torch.zeros(x.shape[0], b.shape[1])
    for g, slot in enumerate(slots.tolist()):
        for t in range(bounds[g], bounds[g + 1]):
            xa[t] = a[slot] @ x[t]
            for i in range(len(offsets) - 1):
                lo, hi = offsets[i], offsets[i + 1]
                delta[t, lo:hi] = b[slot, lo:hi] @ xa[t, i * stride : (i + 1) * stride]
    return xa, delta


@pytest.mark.parametrize("lens,slots", CASES)
def test_torch_path_matches_oracle(lens, slots) -> None:
    x, a, b, indptr, seg, ranks, stride, offsets = make_case(lens, slots)
    want_xa, want_delta = oracle(x, a, b, indptr, seg, ranks, stride, offsets)
    xa = ref_lora_shrink(x, a, indptr, seg, ranks, stride)
    torch.testing.assert_close(xa, want_xa, atol=3e-5, rtol=1e-5)
    base = torch.randn(x.shape[0], b.shape[1])
    out = ref_lora_expand(xa, b, base.clone(), indptr, seg, ranks, offsets)
    # NOTE: float32 sums in another order (torch's matmul splits them by thread count)
    torch.testing.assert_close(out, base + want_delta, atol=3e-5, rtol=1e-5)
    base_rows = torch.repeat_interleave(seg, indptr.diff()) == 0
    assert torch.equal(out[base_rows], base[base_rows])  # NOTE: base rows untouched


@pytest.mark.parametrize("lens,slots", CASES)
@pytest.mark.parametrize("k", [40, 640])
@pytest.mark.parametrize("stride,ranks", [(8, (0, 4, 8, 2)), (32, (0, 19, 32, 5))])
@pytest.mark.parametrize("outs", [(24, 8, 8), (130, 64)])
def test_c_kernel_matches_oracle(c_build, lens, slots, k, stride, ranks, outs) -> None:
    """llmql's C kernel (each build): every adapter row of the batch in one call (mixed
    ranks, base rows untouched, empty segments, one slot's rows in several segments, runs
    over 24 rows and row blocks short of 6 or 4), a width with a vector tail (40) and the
    default model's (640), ranks over 16 and not multiples of 4 (remainders 1 to 3), output
    widths under, over and at the expand's blocks (64 columns on AVX-512, 24 on AVX2)."""
    x, a, b, indptr, seg, ranks, stride, offsets = make_case(lens, slots, k=k, outs=outs, stride=stride,
                                                             ranks=ranks)
    _, want_delta = oracle(x, a, b, indptr, seg, ranks, stride, offsets)
    rows, row_slots = slot_order(torch.repeat_interleave(seg, indptr.diff()))
    base = torch.randn(x.shape[0], b.shape[1])
    out = base.clone()
    assert c_lora_delta(x, a, b, out, offsets, ranks, rows, row_slots)
    # NOTE: float32 sums of k x r products in another order: within a millionth of the
    # largest delta (~600 at k 640, rank 32), as cancellations leave some entries small
    atol = 3e-5 + 1e-6 * float(want_delta.abs().max())
    torch.testing.assert_close(out, base + want_delta, atol=atol, rtol=1e-5)
    base_rows = torch.repeat_interleave(seg, indptr.diff()) == 0
    assert torch.equal(out[base_rows], base[base_rows])


@pytest.mark.parametrize("layout", ["out_major", "rank_major"])
def test_c_kernel_large_ranks_and_both_layouts(c_build, layout) -> None:
    """A rank stride of 80 (ranks 70 and 35: blocks of 4 rank rows plus 2 or 3), with B as
    given [S, N, R] (copied rank-major first) or as the CPU pool holds it (a [S, N, R] view
    of rank-major storage, read in place)."""
    x, a, b, indptr, seg, ranks, stride, offsets = make_case([3, 9], [1, 2], k=72, stride=80,
                                                             ranks=(0, 70, 35))
    _, want_delta = oracle(x, a, b, indptr, seg, ranks, stride, offsets)
    if layout == "rank_major":
        b = b.transpose(1, 2).contiguous().transpose(1, 2)
        assert b.transpose(1, 2).is_contiguous()
    rows, row_slots = slot_order(torch.repeat_interleave(seg, indptr.diff()))
    base = torch.randn(x.shape[0], b.shape[1])
    out = base.clone()
    assert c_lora_delta(x, a, b, out, offsets, ranks, rows, row_slots)
    atol = 3e-5 + 1e-6 * float(want_delta.abs().max())
    torch.testing.assert_close(out, base + want_delta, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("lens,slots", CASES)
@pytest.mark.parametrize("long_from", [1, 4, 100])
def test_cpu_paths_match_oracle(lens, slots, long_from) -> None:
    """Segments of >= `long_from` rows by segment matmuls, the rest by the padded bmm."""
    x, a, b, indptr, seg, ranks, stride, offsets = make_case(lens, slots)
    _, want_delta = oracle(x, a, b, indptr, seg, ranks, stride, offsets)
    bounds = indptr.tolist()
    long, rows, row_slots = [], [], []
    for slot, lo, hi in zip(slots, bounds, bounds[1:]):
        if slot and hi - lo >= long_from:
            long.append((slot, lo, hi))
        elif slot:
            rows += range(lo, hi)
            row_slots += [slot] * (hi - lo)
    base = torch.randn(x.shape[0], b.shape[1])
    out = segment_lora(x, a, b, base.clone(), offsets, ranks.tolist(), long)
    grid = padded_rows(torch.tensor(rows, dtype=torch.int64), torch.tensor(row_slots, dtype=torch.int64))
    assert (grid is None) == (not rows)
    if grid is not None:
        bmm_lora(x, a, b, out, offsets, grid)
    # NOTE: sums in another order than the oracle's: within 3e-5 (values ~1-10)
    torch.testing.assert_close(out, base + want_delta, atol=3e-5, rtol=1e-5)
    base_rows = torch.repeat_interleave(seg, indptr.diff()) == 0
    assert torch.equal(out[base_rows], base[base_rows])
    # NOTE: the short rows by slot, gathered apart (what a heavy slot takes instead of the grid)
    by_slot: dict[int, list[int]] = {}
    for row, slot in zip(rows, row_slots):
        by_slot.setdefault(slot, []).append(row)
    groups = [(slot, torch.tensor(r, dtype=torch.int64)) for slot, r in by_slot.items()]
    out = segment_lora(x, a, b, base.clone(), offsets, ranks.tolist(), long)
    gathered_lora(x, a, b, out, offsets, ranks.tolist(), groups)
    torch.testing.assert_close(out, base + want_delta, atol=3e-5, rtol=1e-5)
    assert torch.equal(out[base_rows], base[base_rows])


def _check_triton(device: str = "cpu", dtype=torch.float32, tol: float = 1e-4) -> None:
    from llmql.kernels.lora_expand import lora_expand
    from llmql.kernels.lora_shrink import lora_shrink

    for lens, slots in CASES[:3]:
        x, a, b, indptr, seg, ranks, stride, offsets = make_case(lens, slots, device=device,
                                                                 dtype=dtype)
        xa = lora_shrink(x, a, indptr, seg, ranks, stride)
        want_xa = ref_lora_shrink(x.float().cpu(), a.float().cpu(), indptr.cpu(), seg.cpu(),
                                  ranks.cpu(), stride)
        torch.testing.assert_close(xa.float().cpu(), want_xa, atol=tol, rtol=tol)
        base = torch.randn(x.shape[0], b.shape[1]).to(device, dtype)
        got = lora_expand(xa, b, base.clone(), indptr, seg, ranks, offsets)
        want = ref_lora_expand(xa.float().cpu(), b.float().cpu(), base.float().cpu(), indptr.cpu(),
                               seg.cpu(), ranks.cpu(), offsets)
        torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check is for CPU-only machines")
def test_triton_interpreter_matches_torch_path() -> None:
    """The kernels in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 on
    CPU-only machines before any kernel is defined) against the torch path."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    _check_triton()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_matches_torch_path(dtype) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 set: the GPU check needs the compiled kernel")
    _check_triton("cuda", dtype, tol=5e-2 if dtype == torch.bfloat16 else 1e-3)
    # NOTE: model-sized shapes: 64 decode rows over 8 adapters, a long prefill segment
    gen = torch.Generator().manual_seed(1)
    for lens in ([1] * 64, [700, 1, 300]):
        slots = torch.randint(0, 9, (len(lens),), generator=gen).tolist()
        args = make_case(lens, slots, k=640, outs=(1024, 256, 256), stride=32,
                         ranks=(0, 8, 16, 32, 8, 16, 32, 8, 16), device="cuda", dtype=dtype)
        x, a, b, indptr, seg, ranks, stride, offsets = args
        from llmql.kernels.lora_expand import lora_expand
        from llmql.kernels.lora_shrink import lora_shrink

        cpu = [t.cpu() if torch.is_tensor(t) else t for t in args]
        cpu[:3] = [t.float() for t in cpu[:3]]
        xa = lora_shrink(x, a, indptr, seg, ranks, stride)
        want_xa = ref_lora_shrink(*cpu[:2], *cpu[3:7])
        loose = dtype == torch.bfloat16
        torch.testing.assert_close(xa.float().cpu(), want_xa, atol=0.5 if loose else 1e-2,
                                   rtol=5e-2 if loose else 1e-3)
        out = lora_expand(xa, b, torch.zeros(x.shape[0], b.shape[1], device="cuda", dtype=dtype),
                          indptr, seg, ranks, offsets).float().cpu()
        want = ref_lora_expand(xa.float().cpu(), cpu[2], torch.zeros(out.shape), *cpu[3:6], offsets)
        torch.testing.assert_close(out, want, atol=0.5 if loose else 1e-2, rtol=5e-2 if loose else 1e-3)
