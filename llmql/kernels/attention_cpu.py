"""Vectorised CPU paged attention, same signature and semantics as `ref_paged_attention`.

Decode rows (one new token per sequence) are batched into one padded matmul; prefill
sequences of similar lengths are padded into one batched scaled-dot-product attention with
an explicit causal/window mask (one call per sequence when padding would waste too much).
Shapes as in `llmql.kernels.attention`: q [T, Hq, D], k/v_cache [S, Hkv, D] -> [T, Hq, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """Paged attention over the pool (see `ref_paged_attention` for the contract)."""
    assert q.dim() == 3 and k_cache.dim() == 3 and k_cache.shape == v_cache.shape
    assert q.shape[1] % k_cache.shape[1] == 0, "query heads must be a multiple of kv heads"
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
            q[q0 : q0 + lq], k_cache[slots], v_cache[slots], scale, sliding_window, softcap
        )
    return out


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
    slots = kv_indices[(k0[:, None] + kcol).clamp(max=kv_indices.numel() - 1)]  # [B, Lk]
    pos = (lk - lq)[:, None] + qcol  # [B, Lq] absolute position of each query row
    visible = (kcol[:, None, :] <= pos[:, :, None]) & (kcol < lk[:, None])[:, None, :]
    if window:
        visible &= (pos[:, :, None] - kcol[:, None, :]) < window
    qh = q[q_rows].float().transpose(1, 2)  # [B, Hq, Lq, D]
    kh = k_cache[slots].float().transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    vh = v_cache[slots].float().transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    res = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=visible[:, None], scale=scale)
    out[q_rows[q_valid]] = res.transpose(1, 2)[q_valid].to(q.dtype)


def _decode(q, k_cache, v_cache, spans, kv_indices, scale, window, softcap) -> torch.Tensor:
    """q [B, Hq, D], one query per sequence at its last position -> [B, Hq, D]."""
    bsz, hq, d = q.shape
    hkv = k_cache.shape[1]
    starts = torch.tensor([s for s, _ in spans], dtype=torch.int64, device=q.device)
    lens = torch.tensor([e - s for s, e in spans], dtype=torch.int64, device=q.device)
    cols = torch.arange(int(lens.max()), device=q.device)[None, :]
    valid = cols < lens[:, None]  # [B, L]
    if window:
        valid &= (lens[:, None] - 1 - cols) < window
    slots = kv_indices[(starts[:, None] + cols).clamp(max=kv_indices.numel() - 1)]
    k = k_cache[slots].float().permute(0, 2, 3, 1)  # [B, Hkv, D, L]
    v = v_cache[slots].float().transpose(1, 2)  # [B, Hkv, L, D]
    qg = q.float().reshape(bsz, hkv, hq // hkv, d)
    scores = torch.matmul(qg, k) * scale  # [B, Hkv, G, L]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).reshape(bsz, hq, d).to(q.dtype)


def _prefill(q, k, v, scale, window, softcap) -> torch.Tensor:
    """One sequence: q [Lq, Hq, D] at the last Lq of Lk positions, k/v [Lk, Hkv, D]."""
    lq, hq, _ = q.shape
    lk, hkv = k.shape[0], k.shape[1]
    pos = torch.arange(lk - lq, lk, device=q.device)[:, None]
    key = torch.arange(lk, device=q.device)[None, :]
    visible = key <= pos
    if window:
        visible &= (pos - key) < window
    qh = q.float().transpose(0, 1)  # [Hq, Lq, D]
    kh = k.float().transpose(0, 1).repeat_interleave(hq // hkv, dim=0)  # [Hq, Lk, D]
    vh = v.float().transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
    if softcap:
        scores = torch.tanh(torch.matmul(qh, kh.transpose(1, 2)) * scale / softcap) * softcap
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        res = torch.matmul(probs, vh)
    else:
        res = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=visible, scale=scale)
    return res.transpose(0, 1).to(q.dtype)
