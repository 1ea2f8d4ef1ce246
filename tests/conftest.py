"""Suite-wide configuration: GPU tests skip cleanly without CUDA; a private cache dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# NOTE: tests share one cache dir (dequantised weights, tokenizers) so the model is
# converted once per checkout; the Makefile sets the same default.
os.environ.setdefault(
    "LLMQL_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "llmql")
)
os.environ.setdefault("LLMQL_PROGRESS", "0")


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


# NOTE: Triton kernels run in its interpreter on CPU-only machines. This must be set before
# any test module imports triton or defines a kernel, or `@triton.jit` builds compiled
# (CUDA-only) functions for the rest of the session.
if _no_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
