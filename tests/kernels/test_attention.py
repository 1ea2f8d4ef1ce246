"""Paged attention: the vectorised CPU path and the Triton kernel against the reference.

The Triton kernel runs on CPU under TRITON_INTERPRET=1 (small shapes) and on CUDA in the
`gpu` sweep; both skip cleanly when triton is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from llmql.kernels.attention import ref_paged_attention
from llmql.kernels.attention_cpu import cpu_paged_attention

HAS_TRITON = importlib.util.find_spec("triton") is not None


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


def _check_triton_interpreter() -> None:
    """Runs in a fresh process with TRITON_INTERPRET=1 (see the test below)."""
    from llmql.kernels.attention_triton import triton_paged_attention

    for q_lens, kv_lens in CASES[:3]:
        for window, softcap in [(None, None), (3, 5.0)]:
            args = make_case(q_lens, kv_lens, hq=4, hkv=2)
            kw = dict(scale=0.3, sliding_window=window, softcap=softcap)
            got = triton_paged_attention(*args, **kw)
            torch.testing.assert_close(got, ref_paged_attention(*args, **kw), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check is for CPU-only machines")
def test_triton_interpreter_matches_reference() -> None:
    """NOTE: triton's interpreter must be chosen before triton is first imported, and other
    tests (transformers) may import it earlier, so the check runs in a fresh process."""
    code = (
        f"import importlib.util as u; s = u.spec_from_file_location('t', {__file__!r}); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); m._check_triton_interpreter()"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 1, 256), (8, 2, 64), (16, 16, 128)])
@pytest.mark.parametrize("batch", [1, 7, 32])
def test_triton_cuda_sweep(dtype, hq, hkv, d, batch) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 set: the GPU sweep needs the compiled kernel")
    from llmql.kernels.attention_triton import triton_paged_attention

    gen = torch.Generator().manual_seed(batch)
    kv_lens = torch.randint(1, 600, (batch,), generator=gen).tolist()
    q_lens = [1 if i % 2 else int(torch.randint(1, kv, (1,), generator=gen)) + 1 if kv > 1 else 1
              for i, kv in enumerate(kv_lens)]
    q_lens = [min(q, kv) for q, kv in zip(q_lens, kv_lens)]
    args = make_case(q_lens, kv_lens, hq=hq, hkv=hkv, d=d, dtype=dtype, device="cuda")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for window, softcap in [(None, None), (128, None), (None, 30.0)]:
        kw = dict(scale=d**-0.5, sliding_window=window, softcap=softcap)
        want = ref_paged_attention(*(a.cpu() for a in args), **kw).to(dtype)
        got = triton_paged_attention(*args, **kw).cpu()
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
