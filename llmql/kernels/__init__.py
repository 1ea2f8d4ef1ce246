"""kernels."""

from __future__ import annotations

import torch


def dot_precision(*dtypes: torch.dtype) -> str:
    """`tl.dot`'s `input_precision` for operands of these dtypes: "ieee" when any is float32
    (Triton's default on CUDA, tf32, is ~1e-2 off a float32 reference), else "tf32" (16-bit
    values widen to tf32 exactly, so it is exact for them; Triton ignores it there)."""
    return "ieee" if torch.float32 in dtypes else "tf32"
