"""Paged attention: the CPU paths (llmql's C kernel and the vectorised torch path) against
the torch reference.

The Triton kernels are tested in test_triton_attention.py (interpreter on CPU, compiled on CUDA).
"""

from __future__ import annotations

import pytest
import torch

from llmql.kernels.attention import ref_paged_attention
from llmql.kernels.attention_cpu import c_paged_attention, cpu_paged_attention


@pytest.fixture(params=["auto", "avx2", "0"])
def kernels(request, monkeypatch) -> str:
    """Every CPU path: llmql's C kernel where it runs ("auto": AVX-512 where the CPU has it;
    "avx2": its AVX2 build) and the torch path ("0")."""
    monkeypatch.setenv("LLMQL_CPU_KERNELS", request.param)
    return request.param


@pytest.fixture
def kernel(c_build: str) -> str:
    """The C kernel build under test (tests/kernels/conftest.py: `c_build`)."""
    return c_build


def make_case(q_lens, kv_lens, hq=4, hkv=2, d=16, slots=None, dtype=torch.float32, device="cpu", seed=0):
    """Random q and pool, each sequence's KV at shuffled slots; returns the call args."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(kv_lens)
    slots = slots or n + 7
    q = torch.randn(sum(q_lens), hq, d, generator=gen)
    k = torch.randn(slots, hkv, d, generator=gen)
    v = torch.randn(slots, hkv, d, generator=gen)
    perm = torch.randperm(slots, generator=gen)[:n]
    qo = torch.tensor([0, *q_lens]).cumsum(0)
    kvp = torch.tensor([0, *kv_lens]).cumsum(0)
    to = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return to(q), to(k), to(v), qo.to(device), kvp.to(device), perm.to(device)


CASES = [
    ([1, 1, 1], [5, 1, 9]),  # decode
    ([7], [7]),  # fresh prefill
    ([3, 1, 4], [10, 6, 4]),  # prefill on cached prefixes mixed with decode
    ([33, 1], [40, 70]),  # multiple query blocks
    ([5, 6, 4], [5, 9, 4]),  # several prefills, padded into one batch
    ([5, 1, 6, 4], [8, 3, 6, 12]),  # padded prefills on cached prefixes, with a decode row
]


@pytest.mark.parametrize("q_lens,kv_lens", CASES)
@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (None, 5.0), (4, 2.0)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1), (6, 2)])
def test_cpu_path_matches_reference(q_lens, kv_lens, window, softcap, hq, hkv, kernels) -> None:
    args = make_case(q_lens, kv_lens, hq=hq, hkv=hkv)
    kw = dict(scale=0.3, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(cpu_paged_attention(*args, **kw), ref_paged_attention(*args, **kw))


def test_reference_single_sequence_matches_sdpa() -> None:
    """The oracle itself, against torch SDPA on one causal sequence."""
    q, k, v, qo, kvp, idx = make_case([6], [6], hq=2, hkv=2)
    got = ref_paged_attention(q, k, v, qo, kvp, idx, scale=0.25)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k[idx].transpose(0, 1), v[idx].transpose(0, 1), is_causal=True, scale=0.25
    ).transpose(0, 1)
    torch.testing.assert_close(got, want)


def shared_prefix_case(hq: int, hkv: int, d: int = 16, seed: int = 1):
    """Decode rows whose KV begins with slots shared through a prefix cache: rows 0-3 share
    20 slots, rows 1-2 share 45 of them, row 4 has its own, rows 5-6 share 17; then a
    prefill row on row 0's prefix. Returns the call args."""
    gen = torch.Generator().manual_seed(seed)
    pool = 400
    k, v = torch.randn(pool, hkv, d, generator=gen), torch.randn(pool, hkv, d, generator=gen)
    fresh = iter(torch.randperm(pool, generator=gen).tolist())
    take = lambda n: [next(fresh) for _ in range(n)]  # noqa: E731
    base, deeper, other = take(20), take(25), take(17)
    rows = [base + take(9), base + deeper + take(3), base + deeper + take(11), base + take(1),
            take(30), other + take(5), other + take(2), base + take(12)]
    q_lens = [1] * 7 + [6]
    q = torch.randn(sum(q_lens), hq, d, generator=gen)
    qo = torch.tensor([0, *q_lens]).cumsum(0)
    kvp = torch.tensor([0, *map(len, rows)]).cumsum(0)
    return q, k, v, qo, kvp, torch.tensor([s for r in rows for s in r])


@pytest.mark.parametrize("window,softcap", [(None, None), (512, None), (None, 5.0), (40, None)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1), (6, 2)])
def test_decode_rows_sharing_a_prefix_match_reference(window, softcap, hq, hkv, monkeypatch) -> None:
    from llmql.kernels import attention_cpu

    args = shared_prefix_case(hq, hkv)
    kw = dict(scale=0.3, sliding_window=window, softcap=softcap)
    attention_cpu._PLANS.last = None
    monkeypatch.setenv("LLMQL_CPU_KERNELS", "0")  # NOTE: the torch path's shared-prefix plan
    torch.testing.assert_close(cpu_paged_attention(*args, **kw), ref_paged_attention(*args, **kw))
    if window == 40:  # a row is longer than the window: the plain padded path
        assert attention_cpu._PLANS.last is None
        return
    # the shared path ran: rows 0-3 read their 20 shared slots once (better than {1, 2}'s 45)
    groups = {tuple(r for r in g.tolist() if r >= 0) for g in attention_cpu._PLANS.last[2].groups}
    assert groups == {(0, 1, 2, 3), (5, 6)}


def test_shared_prefix_groups_pick_the_larger_saving() -> None:
    from llmql.kernels.attention_cpu import _split

    # rows 0-3 share 20 slots; rows 1-2 share 45: one group of 4 saves 60 reads, {1, 2} 45
    assert _split([20, 45, 20], 0, 3) == (60, [(0, 3, 20)])
    # rows 0-5 share 16, pairs share 100: three pairs save 300 against 80
    assert _split([100, 16, 100, 16, 100], 0, 5) == (300, [(0, 1, 100), (2, 3, 100), (4, 5, 100)])
    assert _split([3, 5], 0, 2) == (0, [])  # below SHARED_MIN: no group


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 20])
def test_c_kernel_on_model_shapes(dtype, window, kernel) -> None:
    """The default model's heads (4 query heads on 1 KV head of 256) over a pool of each
    dtype: long prefills on cached prefixes (several 16-query tiles, several 16-key blocks,
    key blocks partly outside a sliding window), decode rows, a fresh one-token prompt."""
    q_lens, kv_lens = [40, 1, 1, 17, 1], [90, 91, 33, 17, 1]
    q, k, v, qo, kvp, idx = make_case(q_lens, kv_lens, hq=4, hkv=1, d=256, seed=5)
    k, v = k.to(dtype), v.to(dtype)
    got = c_paged_attention(q, k, v, qo, kvp, idx, scale=0.0625, sliding_window=window)
    want = ref_paged_attention(q, k, v, qo, kvp, idx, scale=0.0625, sliding_window=window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [48, 80])
def test_c_kernel_on_other_head_dims(dtype, d, kernel) -> None:
    """Head dims whose rows are not a whole number of the kernels' register blocks (AVX2: 8
    vectors of 8), 3 query heads per KV head, last key blocks of 1-16 keys."""
    q_lens, kv_lens = [12, 1, 1, 3], [27, 9, 16, 8]
    q, k, v, qo, kvp, idx = make_case(q_lens, kv_lens, hq=6, hkv=2, d=d, seed=d)
    k, v = k.to(dtype), v.to(dtype)
    got = c_paged_attention(q, k, v, qo, kvp, idx, scale=0.2)
    torch.testing.assert_close(got, ref_paged_attention(q, k, v, qo, kvp, idx, scale=0.2), atol=2e-5, rtol=1e-4)


def test_c_kernel_declines_shapes_it_does_not_take(kernel) -> None:
    """Head dims that are not a multiple of 16, or over 256, and more than 16 query heads per
    KV head: None, and `cpu_paged_attention` falls back to the torch path."""
    for hq, d in [(4, 8), (2, 320), (32, 16)]:
        args = make_case([3, 1], [5, 4], hq=hq, hkv=1, d=d)
        assert c_paged_attention(*args, scale=0.3) is None
        torch.testing.assert_close(cpu_paged_attention(*args, scale=0.3), ref_paged_attention(*args, scale=0.3))
    q, k, v, qo, kvp, idx = make_case([1], [3])
    with pytest.raises(ValueError, match="float32"):
        c_paged_attention(q.double(), k, v, qo, kvp, idx, scale=0.3)
