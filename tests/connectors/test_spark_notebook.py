"""The Spark quickstart notebook runs top to bottom (real model, ~20 rows)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("pyspark")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = [pytest.mark.spark, pytest.mark.slow]
NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "spark_quickstart.ipynb"


def test_quickstart_notebook_executes(monkeypatch):
    # NOTE: the kernel imports this checkout's llmql (%load_ext llmql), whatever is installed.
    root = str(NOTEBOOK.parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(str(o.get("text", "")) + str(o.get("data", {})) for o in outputs)
    assert "prefix_hit_rate" in text
    assert "llm_0: llm_filter('Is this movie suitable for kids?')" in text  # %llmql --spark explain
