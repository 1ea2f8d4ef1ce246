"""Paged attention: the vectorised CPU path against the torch reference.

The Triton kernels are tested in test_triton_attention.py (interpreter on CPU, compiled on CUDA).
"""

from __future__ import annotations

import pytest
import torch

from llmql.kernels.attention import ref_paged_attention
from llmql.kernels.attention_cpu import cpu_paged_attention


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
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1)])
def test_cpu_path_matches_reference(q_lens, kv_lens, window, softcap, hq, hkv) -> None:
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
