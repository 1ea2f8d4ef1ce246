"""The Triton attention kernels (prefix-aware paged prefill, split-KV decode) against their
torch references.

On a machine without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1,
set by the `device` fixture before the kernels are first built) on tiny shapes that still
cover every code path: several query and key blocks, ragged batches, cached prefixes,
sliding windows (the skipped-blocks path), GQA, empty and one-token sequences, empty
splits. With CUDA the same cases run on the compiled kernels, plus the `gpu` sweeps.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from llmql.kernels.attention import ref_paged_attention
from llmql.kernels.decode_attention_triton import ref_decode_attention

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")
ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.fixture(scope="module")
def device():
    """"cuda" (compiled kernels) or "cpu" (TRITON_INTERPRET=1 for the kernels built here).

    NOTE: the kernels are built on first use and cached, so the interpreter choice made here
    holds for the rest of the process; without CUDA there is no other choice anyway.
    """
    if ON_CUDA:
        yield "cuda"
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield "cpu"


def paged_case(q_lens, kv_lens, *, hq, hkv, d=16, dtype=torch.float32, device="cpu", seed=0):
    """Random q and pool (each sequence's KV at shuffled slots) -> the kernel's call args."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(kv_lens)
    q = torch.randn(sum(q_lens), hq, d, generator=gen)
    k = torch.randn(n + 9, hkv, d, generator=gen)
    v = torch.randn(n + 9, hkv, d, generator=gen)
    slots = torch.randperm(n + 9, generator=gen)[:n]
    qo = torch.tensor([0, *q_lens]).cumsum(0)
    kvp = torch.tensor([0, *kv_lens]).cumsum(0)
    to = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return to(q), to(k), to(v), qo.to(device), kvp.to(device), slots.to(device)


def check_prefill(args, tol: float, **kw) -> None:
    from llmql.kernels.attention_triton import triton_paged_attention

    attn = {k: kw.pop(k) for k in ("scale", "sliding_window", "softcap")}
    want = ref_paged_attention(*(a.cpu().double() if a.is_floating_point() else a.cpu()
                                 for a in args), **attn)
    got = triton_paged_attention(*args, **attn, **kw)
    assert not got.isnan().any()
    torch.testing.assert_close(got.cpu().double(), want, atol=tol, rtol=tol)


def check_decode(kv_lens, tol: float, *, hq, hkv, d, dtype, device, **kw) -> None:
    from llmql.kernels.decode_attention_triton import triton_decode_attention

    q, k, v, _, kvp, idx = paged_case([1] * len(kv_lens), kv_lens, hq=hq, hkv=hkv, d=d,
                                      dtype=dtype, device=device, seed=len(kv_lens))
    attn = {key: kw.pop(key) for key in ("scale", "sliding_window", "softcap")}
    host = [x.cpu().double() if x.is_floating_point() else x.cpu() for x in (q, k, v, kvp, idx)]
    want = ref_decode_attention(*host, **attn)
    got = triton_decode_attention(q, k, v, kvp, idx, **attn, **kw)
    assert not got.isnan().any()
    torch.testing.assert_close(got.cpu().double(), want, atol=tol, rtol=tol)


# (q_lens, kv_lens): block_m = block_n = 16 below, so 40 query rows span 3 query blocks and
# 70 keys span 5 key blocks; 0 new rows is an empty sequence; (1, 1) a one-token prompt.
RAGGED = ([40, 1, 0, 1, 5, 17], [70, 33, 5, 1, 5, 17])
PREFILL_CASES = {
    "ragged-gqa": (RAGGED, dict(hq=4, hkv=2, d=16), dict(sliding_window=None, softcap=None)),
    "window-skips-blocks": (RAGGED, dict(hq=4, hkv=1, d=16), dict(sliding_window=8, softcap=5.0)),
    "mha-window-odd-dim": (([30, 3], [50, 20]), dict(hq=2, hkv=2, d=24),
                           dict(sliding_window=20, softcap=None)),
}


@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_kernel_matches_reference(device, name) -> None:
    (q_lens, kv_lens), heads, attn = PREFILL_CASES[name]
    args = paged_case(q_lens, kv_lens, **heads, device=device)
    check_prefill(args, 1e-4, scale=0.3, **attn, block_m=16, block_n=16)


def test_prefill_kernel_default_blocks_and_empty_batch(device) -> None:
    """The launcher's own tile sizes on several key blocks; a batch of no rows at all."""
    args = paged_case([20, 1], [100, 70], hq=4, hkv=2, device=device)
    check_prefill(args, 1e-4, scale=0.25, sliding_window=None, softcap=None)
    from llmql.kernels.attention_triton import triton_paged_attention

    q, k, v, _, _, idx = args
    zero = torch.zeros(3, dtype=torch.int64, device=device)
    out = triton_paged_attention(q[:0], k, v, zero, zero, idx[:0], scale=0.25)
    assert out.shape == (0, 4, 16)


# kv_lens: with block_n = 16 and 3 splits, 70 keys give 2 blocks per split, 17 keys a short
# last split and 1 key two empty splits; 0 keys is a sequence with nothing to attend to.
DECODE_CASES = {
    "gqa4-splits": (dict(hq=8, hkv=2, d=16), dict(sliding_window=None, softcap=None), 3),
    "window-softcap": (dict(hq=8, hkv=2, d=16), dict(sliding_window=10, softcap=5.0), 3),
    "mha-odd-dim-one-split": (dict(hq=2, hkv=2, d=24), dict(sliding_window=None, softcap=None), 1),
    "group6-window": (dict(hq=12, hkv=2, d=16), dict(sliding_window=40, softcap=None), 2),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_kernel_matches_reference(device, name) -> None:
    heads, attn, splits = DECODE_CASES[name]
    check_decode([70, 1, 17, 0, 33], 1e-4, **heads, dtype=torch.float32, device=device,
                 scale=0.3, **attn, num_splits=splits, block_n=16)


def test_decode_reference_matches_paged_reference() -> None:
    """The decode oracle equals the paged oracle on one-row sequences (window and softcap)."""
    q, k, v, qo, kvp, idx = paged_case([1, 1, 1], [9, 1, 30], hq=6, hkv=3)
    for window, softcap in [(None, None), (4, 3.0)]:
        kw = dict(scale=0.3, sliding_window=window, softcap=softcap)
        torch.testing.assert_close(ref_decode_attention(q, k, v, kvp, idx, **kw),
                                   ref_paged_attention(q, k, v, qo, kvp, idx, **kw))


def test_decode_default_splits_and_empty_batch(device) -> None:
    """Launcher defaults; a batch of no sequences."""
    check_decode([3, 50], 1e-4, hq=4, hkv=2, d=16, dtype=torch.float32, device=device,
                 scale=0.25, sliding_window=None, softcap=None)
    from llmql.kernels.decode_attention_triton import triton_decode_attention

    q, k, v, _, _, idx = paged_case([1], [4], hq=4, hkv=2, device=device)
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    assert triton_decode_attention(q[:0], k, v, zero, idx[:0], scale=0.3).shape == (0, 4, 16)


def random_lens(batch: int, max_kv: int, seed: int) -> tuple[list[int], list[int]]:
    """Ragged kv lengths in [1, max_kv]; every other sequence decodes, the rest prefill a
    random suffix (a cached prefix before it)."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randint(1, max_kv + 1, (batch,), generator=gen).tolist()
    q = [1 if i % 2 else int(torch.randint(1, n + 1, (1,), generator=gen)) for i, n in enumerate(kv)]
    return q, kv


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_interpreter_sweep(device, seed) -> None:
    """Bigger random ragged batches through both kernels (slow under the interpreter)."""
    q_lens, kv_lens = random_lens(6, 150, seed)
    window = [None, 7, 33, None][seed]
    args = paged_case(q_lens, kv_lens, hq=6, hkv=2, d=32, device=device, seed=seed)
    check_prefill(args, 1e-4, scale=0.2, sliding_window=window, softcap=None, block_m=16,
                  block_n=16)
    check_decode(kv_lens, 1e-4, hq=6, hkv=2, d=32, dtype=torch.float32, device=device,
                 scale=0.2, sliding_window=window, softcap=[None, 4.0][seed % 2], num_splits=4,
                 block_n=16)


# NOTE: bf16 operands land near 1e-2 relative error; float32 uses IEEE dots ("ieee").
CUDA_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA (compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 1, 256), (32, 8, 128), (8, 8, 64)])
@pytest.mark.parametrize("batch", [1, 33])
def test_cuda_sweep(dtype, hq, hkv, d, batch) -> None:
    """Both kernels with their CUDA default tiles and splits, ragged batches up to 1,200 keys."""
    q_lens, kv_lens = random_lens(batch, 1200, seed=batch + d)
    args = paged_case(q_lens, kv_lens, hq=hq, hkv=hkv, d=d, dtype=dtype, device="cuda")
    for window, softcap in [(None, None), (128, None), (None, 30.0)]:
        attn = dict(scale=d**-0.5, sliding_window=window, softcap=softcap)
        check_prefill(args, CUDA_TOL[dtype], **attn)
        check_decode(kv_lens, CUDA_TOL[dtype], hq=hq, hkv=hkv, d=d, dtype=dtype,
                     device="cuda", **attn)


def _tiny_engine(device: str) -> object:
    """Our engine over a 2-layer Gemma-3-shaped random model (sliding window 6, GQA, final
    soft-capping), no EOS (fixed output lengths)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from llmql.engine.config import ModelConfig
    from llmql.engine.engine import EmbeddedEngine, EngineConfig
    from llmql.engine.loader import build_model
    from llmql.engine.models import LoadedModel
    from llmql.engine.tokenizer import Tokenizer

    config = ModelConfig.from_hf(dict(
        model_type="gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        sliding_window=6, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16, final_logit_softcapping=5.0, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2))
    model = build_model(config, dtype=torch.float32, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5, generator=gen)
    backend = Backend(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(backend, bos_id=1, eos_ids=frozenset(), add_bos=True)
    lm = LoadedModel(model=model.eval(), config=config, tokenizer=tok, name="tiny-gemma3")
    return EmbeddedEngine(lm, EngineConfig(device=device, kv_tokens=256, chunk_size=64))


# NOTE: ~10 CPU seconds under the interpreter: slow there; on CUDA part of the gpu run.
@(pytest.mark.gpu if ON_CUDA else pytest.mark.slow)
def test_engine_generation_through_triton_kernels(device, monkeypatch) -> None:
    """The engine's real batches (ragged prefill over 2 query blocks, a cached prefix, then
    decode steps) through both Triton kernels give the same greedy text as the torch path."""
    from llmql.engine.layers import attention as layer
    from llmql.engine.types import GenerationRequest
    from llmql.kernels.attention_triton import triton_paged_attention
    from llmql.kernels.decode_attention_triton import triton_decode_attention

    calls = {"prefill": 0, "decode": 0}

    def triton_only(q, k, v, qo, kvp, idx, *, scale, sliding_window, softcap, is_decode):
        attn = dict(scale=scale, sliding_window=sliding_window, softcap=softcap)
        calls["decode" if is_decode else "prefill"] += 1
        if is_decode:
            return triton_decode_attention(q, k, v, kvp, idx, **attn, num_splits=2, block_n=16)
        return triton_paged_attention(q, k, v, qo, kvp, idx, **attn, block_m=16, block_n=16)

    gen = torch.Generator().manual_seed(3)
    first = [1, *torch.randint(4, 64, (21,), generator=gen).tolist()]
    prompts = [first, [1, 5, 9], [*first[:15], 7, 8]]
    reqs = [GenerationRequest(p, max_tokens=4) for p in prompts]

    def run(engine):  # NOTE: the third prompt comes after the first is cached
        return engine.generate(reqs[:2], progress=False) + engine.generate(reqs[2:], progress=False)

    want = [r.text for r in run(_tiny_engine(device))]
    monkeypatch.setattr(layer, "paged_attention", triton_only)
    engine = _tiny_engine(device)
    got = run(engine)
    assert [r.text for r in got] == want and all(r.output_tokens == 4 for r in got)
    assert calls["prefill"] > 0 and calls["decode"] > 0, calls
    assert engine.stats().cached_tokens > 0  # NOTE: the third prompt ran on a cached prefix
