"""CPU paged attention, same signature and semantics as `ref_paged_attention`.

On x86 CPUs it runs llmql's C kernel (`c_paged_attention`: csrc/attention.c on AVX-512,
csrc/avx2/attention.c on AVX2 + FMA + F16C; `kernel_available("llmql_paged_attention")`);
the rest of this module is the vectorised torch path, used elsewhere, for logit softcapping
and for head shapes the kernel does not take. Decode rows (one new token per sequence) are
batched into one padded matmul; runs of consecutive decode rows whose KV starts with the
same slots (a prefix shared through the radix cache) attend to that prefix once per run, as
one matmul over the run's queries, and each row's own suffix separately; the two parts are
merged by their softmax maxima and sums (exact up to float rounding). Prefill sequences of
similar lengths are padded into one batched scaled-dot-product attention with an explicit
causal/window mask (one call per sequence when padding would waste too much).

The default model's heads (4 query heads on 1 KV head of 256), 2 threads, median ms,
AVX-512 / AVX2 kernel / torch path (2026-12-04, after the AVX-512 kernel's tiles: scores 2 rows
x 8 keys with one reduction tree, p V in 4 x 64 register blocks, up to 64 rows per task; it
took 36-38 / 0.84 / 0.59 before): a prefill of 60 sequences of 140-160 tokens 26 / 34 / 84;
60 decode rows over those keys, float32 pool 0.70 / 0.78 / 6.0, bfloat16 pool 0.47 / 0.61 /
4.9-6.2.
Shapes as in `llmql.kernels.attention`: q [T, Hq, D], k/v_cache [S, Hkv, D] -> [T, Hq, D].
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmql.kernels.cpu_lib import kernel_available, kernel_library


def cpu_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Paged attention over the pool (see `ref_paged_attention` for the contract): llmql's C
    kernel where it runs and takes the shapes (`c_paged_attention`), else the torch path."""
    assert q.dim() == 3 and k_cache.dim() == 3 and k_cache.shape == v_cache.shape
    assert q.shape[1] % k_cache.shape[1] == 0, "query heads must be a multiple of kv heads"
    if (not softcap and q.dtype == torch.float32 and k_cache.dtype in _C_DTYPES
            and kernel_available("llmql_paged_attention")):
        out = c_paged_attention(q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, scale=scale,
                                sliding_window=sliding_window)
        if out is not None:
            return out
    out = torch.empty_like(q)
    qo, kvp = qo_indptr.tolist(), kv_indptr.tolist()
    decode = [b for b in range(len(qo) - 1) if qo[b + 1] - qo[b] == 1]
    if decode:
        rows = torch.tensor([qo[b] for b in decode], dtype=torch.int64, device=q.device)
        out[rows] = _decode(q[rows], k_cache, v_cache, [(kvp[b], kvp[b + 1]) for b in decode],
                            kv_indices, scale, sliding_window, softcap)
    prefill = [(qo[b], qo[b + 1] - qo[b], kvp[b], kvp[b + 1] - kvp[b])
               for b in range(len(qo) - 1) if qo[b + 1] - qo[b] > 1]
    if len(prefill) > 1 and _padding_pays(prefill) and not softcap:
        _prefill_padded(out, q, k_cache, v_cache, prefill, kv_indices, scale, sliding_window)
        return out
    for q0, lq, k0, lk in prefill:
        slots = kv_indices[k0 : k0 + lk]
        out[q0 : q0 + lq] = _prefill(
            q[q0 : q0 + lq], _gather(k_cache, slots), _gather(v_cache, slots), scale, sliding_window, softcap
        )
    return out


_C_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def c_paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor, kv_indices: torch.Tensor, *, scale: float, sliding_window: int | None = None,
) -> torch.Tensor | None:
    """The contract of `ref_paged_attention` (no softcap) on llmql's C kernel (csrc/attention.c,
    or its AVX2 build csrc/avx2/attention.c: `kernel_library`): per sequence and KV head, up to 64
    rows on AVX-512, 16 on AVX2 (queries x the query heads of the KV head) stream their visible
    keys in blocks of 16, widened from the pool's dtype
    once per block, with an online softmax (running max and sum) into float32 accumulators,
    so no gathered K/V copy, mask or score matrix is built. None where the kernel declines the
    shapes (csrc/attention_driver.h: head dim not a multiple of 16 or over 256, more than 16
    query heads per KV head): the caller uses the torch path."""
    if k_cache.dtype not in _C_DTYPES or q.dtype != torch.float32:
        raise ValueError(f"c_paged_attention: float32 q and a float32/float16/bfloat16 pool, got "
                         f"{q.dtype} and {k_cache.dtype}")
    _, hq, d = q.shape
    hkv = k_cache.shape[1]
    q = q.contiguous()
    qo, kv, idx = (x.to(torch.int64).contiguous() for x in (qo_indptr, kv_indptr, kv_indices))
    out = torch.empty_like(q)
    rc = kernel_library("llmql_paged_attention").llmql_paged_attention(
        q.data_ptr(), k_cache.contiguous().data_ptr(), v_cache.contiguous().data_ptr(),
        _C_DTYPES[k_cache.dtype], hq, hkv, d, qo.data_ptr(), kv.data_ptr(), qo.numel() - 1,
        idx.data_ptr(), scale, sliding_window or 0, out.data_ptr(), torch.get_num_threads())
    return out if rc == 0 else None


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [S, Hkv, D] rows at `slots` (any shape) -> float32 [*slots.shape, Hkv, D].

    `index_select` on the [S, Hkv * D] view: advanced indexing (`cache[slots]`) ran 2-7x
    slower on CPU for the same rows (a [60, 300]-slot gather of one 256-wide head, 2
    threads, 2026-12-04: 3.9 ms against 0.5-2.2 ms)."""
    flat = cache.reshape(cache.shape[0], -1).index_select(0, slots.reshape(-1))
    return flat.view(*slots.shape, *cache.shape[1:]).float()


def _spans(kv_indices: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's `lens[b]` slots of `kv_indices` from `starts[b]`, padded to the longest:
    slots [B, L] (padding repeats a real slot, so gathers stay in bounds) and valid [B, L]."""
    cols = torch.arange(int(lens.max()), device=lens.device)[None, :]
    slots = kv_indices[(starts[:, None] + cols).clamp(max=kv_indices.numel() - 1)]
    return slots, cols < lens[:, None]


def _padding_pays(seqs: list[tuple[int, int, int, int]]) -> bool:
    """Pad into one batch when the padded score matrix is at most twice the real one."""
    max_q, max_k = max(s[1] for s in seqs), max(s[3] for s in seqs)
    return len(seqs) * max_q * max_k <= 2 * sum(s[1] * s[3] for s in seqs)


def _prefill_padded(out, q, k_cache, v_cache, seqs, kv_indices, scale, window) -> None:
    """All prefill sequences (q_start, q_len, kv_start, kv_len) in one padded SDPA call."""
    dev, hq, hkv = q.device, q.shape[1], k_cache.shape[1]
    q0, lq, k0, lk = (torch.tensor(c, dtype=torch.int64, device=dev) for c in zip(*seqs))
    qcol = torch.arange(int(lq.max()), device=dev)[None, :]
    kcol = torch.arange(int(lk.max()), device=dev)[None, :]
    q_valid = qcol < lq[:, None]  # [B, Lq]
    q_rows = (q0[:, None] + qcol).clamp(max=q.shape[0] - 1)
    slots, _ = _spans(kv_indices, k0, lk)  # [B, Lk]
    pos = (lk - lq)[:, None] + qcol  # [B, Lq] absolute position of each query row
    visible = (kcol[:, None, :] <= pos[:, :, None]) & (kcol < lk[:, None])[:, None, :]
    if window:
        visible &= (pos[:, :, None] - kcol[:, None, :]) < window
    qh = q[q_rows].float().transpose(1, 2)  # [B, Hq, Lq, D]
    kh = _gather(k_cache, slots).transpose(1, 2)  # [B, Hkv, Lk, D]
    vh = _gather(v_cache, slots).transpose(1, 2)
    res = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=visible[:, None], scale=scale,
                                         enable_gqa=hq != hkv)
    out[q_rows[q_valid]] = res.transpose(1, 2)[q_valid].to(q.dtype)


SHARED_MIN = 16  # shortest prefix a run of decode rows attends to once (tokens)
_PLANS = threading.local()


@dataclass
class _Shared:
    """Decode rows grouped by shared KV prefix: `groups` [Ng, Gmax] row ids (-1: padding),
    `prefix` [Ng, Pmax] slots of each group's prefix (`prefix_ok` marks real ones),
    `suffix` [B, Ls] each row's slots after its group's prefix (`suffix_ok`)."""

    groups: torch.Tensor
    prefix: torch.Tensor
    prefix_ok: torch.Tensor
    suffix: torch.Tensor
    suffix_ok: torch.Tensor


def _decode(q, k_cache, v_cache, spans, kv_indices, scale, window, softcap) -> torch.Tensor:
    """q [B, Hq, D], one query per sequence at its last position -> [B, Hq, D]."""
    bsz, hq, d = q.shape
    hkv = k_cache.shape[1]
    starts = torch.tensor([s for s, _ in spans], dtype=torch.int64, device=q.device)
    lens = torch.tensor([e - s for s, e in spans], dtype=torch.int64, device=q.device)
    longest = int(lens.max())
    if not window or longest <= window:
        shared = _shared_plan(spans, kv_indices, starts, lens, longest)
        if shared is not None:
            return _decode_shared(q, k_cache, v_cache, shared, scale, softcap)
    slots, valid = _spans(kv_indices, starts, lens)  # [B, L]
    if window:
        cols = torch.arange(longest, device=q.device)[None, :]
        valid &= (lens[:, None] - 1 - cols) < window
    k = _gather(k_cache, slots).permute(0, 2, 3, 1)  # [B, Hkv, D, L]
    v = _gather(v_cache, slots).transpose(1, 2)  # [B, Hkv, L, D]
    qg = q.float().reshape(bsz, hkv, hq // hkv, d)
    scores = torch.matmul(qg, k) * scale  # [B, Hkv, G, L]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).reshape(bsz, hq, d).to(q.dtype)


def _shared_plan(spans, kv_indices, starts, lens, longest) -> _Shared | None:
    """Group consecutive decode rows whose KV begins with >= SHARED_MIN identical slots;
    None when no two rows share that much. Every layer of a step asks with the same
    `kv_indices`, so the plan is built once per step (kept per thread)."""
    last = getattr(_PLANS, "last", None)
    if last is not None and last[0] is kv_indices and last[1] == spans:
        return last[2]
    plan = _build_plan(kv_indices, starts, lens, longest)
    _PLANS.last = (kv_indices, spans, plan)
    return plan


def _build_plan(kv_indices, starts, lens, longest) -> _Shared | None:
    bsz, dev = lens.numel(), lens.device
    if bsz < 2 or longest < SHARED_MIN:
        return None
    slots, valid = _spans(kv_indices, starts, lens)
    same = (slots[1:] == slots[:-1]) & valid[1:] & valid[:-1]
    common = same.int().cumprod(dim=1).sum(dim=1).tolist()  # row b and b + 1 share common[b]
    found = _split(common, 0, bsz - 1)[1]
    if not found:
        return None
    # NOTE: each row's own last slot is never shared, so every suffix keeps >= 1 token.
    cut = torch.zeros(bsz, dtype=torch.int64, device=dev)
    ids = torch.full((len(found), max(hi - lo + 1 for lo, hi, _ in found)), -1, dtype=torch.int64, device=dev)
    for n, (lo, hi, length) in enumerate(found):
        ids[n, : hi - lo + 1] = torch.arange(lo, hi + 1, device=dev)
        cut[lo : hi + 1] = length
    plen = torch.tensor([length for _, _, length in found], dtype=torch.int64, device=dev)
    prefix, prefix_ok = _spans(kv_indices, starts[ids[:, 0]], plen)
    suffix, suffix_ok = _spans(kv_indices, starts + cut, lens - cut)
    return _Shared(ids, prefix, prefix_ok, suffix, suffix_ok)


def _split(common: list[int], lo: int, hi: int) -> tuple[int, list[tuple[int, int, int]]]:
    """Rows lo..hi (row b and b + 1 share `common[b]` leading slots) -> (KV reads saved,
    groups (first, last, shared length)). A run shares the least of its `common`; splitting
    it where that least value occurs gives sub-runs that share more: whichever reads fewer
    KV rows wins (a group of n rows sharing P slots reads P once instead of n times)."""
    if hi <= lo:
        return 0, []
    least = min(common[lo:hi])
    saved, groups, start = 0, [], lo
    for b in [*(b for b in range(lo, hi) if common[b] == least), hi]:
        part_saved, part = _split(common, start, b)
        saved, groups, start = saved + part_saved, groups + part, b + 1
    whole = (hi - lo) * least
    if least >= SHARED_MIN and whole >= saved:
        return whole, [(lo, hi, least)]
    return saved, groups


def _partial(q, k, v, ok, scale, softcap):
    """q [N, Hkv, R, D], k/v [N, L, Hkv, D], ok [N, L] -> unnormalised output [N, Hkv, R, D],
    row maxima and sums [N, Hkv, R, 1] of the softmax over the valid keys."""
    scores = torch.matmul(q, k.permute(0, 2, 3, 1)) * scale  # [N, Hkv, R, L]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~ok[:, None, None, :], float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores - top)
    return torch.matmul(weights, v.transpose(1, 2)), top, weights.sum(dim=-1, keepdim=True)


def _decode_shared(q, k_cache, v_cache, plan: _Shared, scale, softcap) -> torch.Tensor:
    """Decode attention with each group's shared prefix read once (see `_build_plan`)."""
    bsz, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    qg = q.float().reshape(bsz, hkv, group, d)
    out, top, total = _partial(qg, _gather(k_cache, plan.suffix), _gather(v_cache, plan.suffix),
                               plan.suffix_ok, scale, softcap)
    ng, width = plan.groups.shape
    real = plan.groups >= 0
    rows = plan.groups.clamp(min=0)
    # NOTE: a group's queries side by side: [Ng, Hkv, width * G, D] against its prefix
    gq = qg[rows].permute(0, 2, 1, 3, 4).reshape(ng, hkv, width * group, d)
    p_out, p_top, p_total = _partial(gq, _gather(k_cache, plan.prefix), _gather(v_cache, plan.prefix),
                                     plan.prefix_ok, scale, softcap)
    unpack = lambda x: x.reshape(ng, hkv, width, group, -1).permute(0, 2, 1, 3, 4)[real]  # noqa: E731
    members = rows[real]
    p_out, p_top, p_total = unpack(p_out), unpack(p_top), unpack(p_total)
    own_top = top[members]
    both = torch.maximum(own_top, p_top)
    mine, theirs = torch.exp(own_top - both), torch.exp(p_top - both)
    out[members] = out[members] * mine + p_out * theirs
    total[members] = total[members] * mine + p_total * theirs
    return (out / total).reshape(bsz, hq, d).to(q.dtype)


def _prefill(q, k, v, scale, window, softcap) -> torch.Tensor:
    """One sequence: q [Lq, Hq, D] at the last Lq of Lk positions, k/v [Lk, Hkv, D].

    The g = Hq / Hkv query heads of each KV head are folded into one [g * Lq, D] matrix, so
    scores and output are one batched matmul per KV head, with no copies of K and V per
    query head: 2-3x faster than `scaled_dot_product_attention` for a sequence's share of a
    prefill step (4 query heads on 1 KV head, 30 queries over 165 keys: 0.14 against 0.45 ms
    with `enable_gqa`, 0.25 with expanded K/V; at parity with its causal kernel at 400 x 400,
    2 threads, 2026-12-04)."""
    lq, hq, d = q.shape
    lk, hkv = k.shape[0], k.shape[1]
    g = hq // hkv
    pos = torch.arange(lk - lq, lk, device=q.device)[:, None]
    key = torch.arange(lk, device=q.device)[None, :]
    visible = key <= pos
    if window:
        visible &= (pos - key) < window
    qf = q.float().transpose(0, 1).reshape(hkv, g * lq, d)  # query head h = kv head h // g
    scores = torch.bmm(qf, k.float().permute(1, 2, 0)).mul_(scale)  # [Hkv, g * Lq, Lk]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores.masked_fill_(~visible.repeat(g, 1), float("-inf"))
    res = torch.bmm(torch.softmax(scores, dim=-1), v.float().transpose(0, 1))  # [Hkv, g * Lq, D]
    return res.view(hq, lq, d).transpose(0, 1).to(q.dtype)
