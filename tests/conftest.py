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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
