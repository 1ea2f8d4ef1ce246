"""RMSNorm, the gated-MLP activation and q/k norm + RoPE in C (csrc/cpu_ops.c, AVX-512; csrc/avx2/cpu_ops.c,
AVX2 + FMA), with torch references.

Shapes: `rms_norm(x [..., D], scale [D], eps)` -> [..., D] = x * rsqrt(mean(x^2) + eps) *
scale (scale is the norm's weight, or 1 + weight for Gemma's variant), float32;
`gated_act(gate_up [..., 2I], act)` -> [..., I] = act(gate) * up, act "silu" or "gelu_tanh"
(GELU's tanh approximation), float32; `norm_rope(qkv [T, W], start, heads, head_dim, scale,
eps, cos, sin)` -> [T, heads, head_dim]: the heads at columns start.. of a packed QKV output,
RMS-normalised per head (when `scale` is given: Gemma 3's and Qwen 3's q/k norms) and
rotated by RoPE with the tables cos, sin [T, head_dim] (rotate-half form), in one pass.

Why: torch runs these as chains of elementwise ops, each a pass over memory with its own
output (RMSNorm: square, mean, rsqrt, two products), and its tanh-form GELU is slow on the
strided halves of a packed gate+up output: on a 60-prompt prefill-heavy batch of the
default model they took ~25% of the time (py-spy, 2026-12-04). Each kernel reads its input
once and writes its output once (the 512 x 4096 gated activation: ~1.3 ms in torch).
Values agree with the references to float32 rounding: the same products for RMSNorm (its
sum of squares in another order), and e^x by a polynomial (~1 ulp) in the activations.
Both builds do the same arithmetic (on 8- instead of 16-float vectors: RMSNorm's sum of
squares in another order). The default model's
shapes, 2 threads, median ms, AVX-512 / AVX2 / torch path (2026-12-04):
rms_norm 60 x 640: 0.013 / 0.016 / 0.025;
gated_act (GELU) 60 x 2048: 0.030 / 0.041 / 0.121;
norm_rope, q (4 heads) and k (1 head) of 256, 60 rows: 0.034 / 0.044 / 0.173.
`kernel_available("llmql_rms_norm")` (and so on; kernels/cpu_lib.py) says whether they run
here, and `kernel_library` picks the build.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmql.kernels.cpu_lib import kernel_library

ACTS = {"silu": 0, "gelu_tanh": 1}


def ref_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch reference (the formula of Hugging Face's RMSNorms, in float32)."""
    h = x.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * scale.float()


def ref_gated_act(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """Torch reference: act(gate) * up for gate_up = [gate | up] on the last dim."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    fn = F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")
    return fn * up


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] float32 (last dim contiguous), scale [D] float32 -> [..., D] float32."""
    d = x.shape[-1]
    if x.dtype != torch.float32 or scale.dtype != torch.float32 or scale.shape != (d,):
        raise ValueError(f"rms_norm needs float32 x [..., {d}] and scale [{d}], got {x.dtype} "
                         f"{tuple(x.shape)}, {scale.dtype} {tuple(scale.shape)}")
    flat = _rows(x)
    out = torch.empty(flat.shape, dtype=torch.float32)
    kernel_library("llmql_rms_norm").llmql_rms_norm(
        flat.data_ptr(), flat.shape[0], d, flat.stride(0), scale.contiguous().data_ptr(), eps, out.data_ptr(), d,
        torch.get_num_threads())
    return out.view(x.shape)


def gated_act(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """gate_up [..., 2I] float32 (last dim contiguous) -> act(gate) * up [..., I] float32."""
    if act not in ACTS:
        raise ValueError(f"gated_act: act must be one of {sorted(ACTS)}, got {act!r}")
    if gate_up.dtype != torch.float32 or gate_up.shape[-1] % 2:
        raise ValueError(f"gated_act needs float32 [..., 2I], got {gate_up.dtype} {tuple(gate_up.shape)}")
    flat = _rows(gate_up)
    d = flat.shape[1] // 2
    out = torch.empty(flat.shape[0], d, dtype=torch.float32)
    kernel_library("llmql_gated_act").llmql_gated_act(
        flat.data_ptr(), flat.shape[0], d, flat.stride(0), ACTS[act], out.data_ptr(), d, torch.get_num_threads())
    return out.view(*gate_up.shape[:-1], d)


def ref_norm_rope(qkv: torch.Tensor, start: int, heads: int, head_dim: int, scale: torch.Tensor | None,
                  eps: float, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """Torch reference: the layers' q/k RMSNorm, then `x * cos + rotate_half(x) * sin`."""
    x = qkv[:, start : start + heads * head_dim].float().reshape(-1, heads, head_dim)
    if scale is not None:
        x = ref_rms_norm(x, scale, eps)
    if cos is None or sin is None:
        return x
    half = head_dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.reshape(-1, 1, head_dim) + rotated * sin.reshape(-1, 1, head_dim)


def norm_rope(qkv: torch.Tensor, start: int, heads: int, head_dim: int, scale: torch.Tensor | None,
              eps: float, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """qkv [T, W] float32 (rows may be strided) -> [T, heads, head_dim] float32, contiguous
    (see the module docstring; cos and sin [T, head_dim] or broadcastable views of it)."""
    t, width = qkv.shape
    if (qkv.dtype != torch.float32 or qkv.stride(1) != 1 or start + heads * head_dim > width
            or head_dim % 2 or (cos is None) != (sin is None)):
        raise ValueError(f"norm_rope needs float32 [T, W] rows with unit stride holding "
                         f"{heads} x {head_dim} (even) from column {start}, and both tables or neither, got {qkv.dtype} "
                         f"{tuple(qkv.shape)}")
    tables = []
    for table in (cos, sin):
        if table is not None:
            table = table.reshape(t, head_dim).float().contiguous()
        tables.append(table)
    if scale is not None:
        scale = scale.float().contiguous()
    out = torch.empty(t, heads, head_dim, dtype=torch.float32)
    ptr = lambda x: None if x is None else x.data_ptr()  # noqa: E731
    kernel_library("llmql_norm_rope").llmql_norm_rope(
        qkv.data_ptr() + 4 * start, t, heads, head_dim, qkv.stride(0), ptr(scale), eps, ptr(tables[0]),
        ptr(tables[1]), out.data_ptr(), torch.get_num_threads())
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with a unit last stride (a copy only where a view cannot do it)."""
    if x.device.type != "cpu":
        raise ValueError(f"llmql's CPU kernels need CPU tensors, got {x.device}")
    flat = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return flat if flat.stride(-1) == 1 or flat.shape[-1] == 1 else flat.contiguous()
