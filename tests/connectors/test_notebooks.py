"""The DuckDB quickstart notebook runs top to bottom in a real kernel (default model, small
slices of tests/fixtures/data): %%llmql cells, EXPLAIN, the reordering plot."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "duckdb_quickstart.ipynb"


def _execute(path: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    # NOTE: the kernel imports this checkout's llmql, whatever is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    return nb


def _outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def test_duckdb_quickstart_executes(monkeypatch):
    nb = _execute(NOTEBOOK, monkeypatch)
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    texts = [str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs]
    assert sum("prefix_hit" in t for t in texts) >= 4  # a report under every LLM query
    assert any("llm_0: llm('Name the product type.')" in t for t in texts)  # EXPLAIN
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot
    table = next(t for t in texts if "previous prompt only" in t)
    counts = {m[0]: [int(x) for x in m[1:]]
              for m in re.findall(r"(table order|reordered)\s+(\d+)\s+(\d+)\s+(\d+)", table)}
    for total, engine, previous_only in counts.values():
        assert 0 < engine < total and 0 < previous_only <= total
    assert counts["reordered"][2] < counts["table order"][2]
