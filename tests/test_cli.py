"""The `llmql` command line (no model calls: plain SQL, explain, errors)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llmql import __version__
from llmql.cli import main

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "movies_sample.csv"


def test_version_and_help(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert __version__ in capsys.readouterr().out
    assert main([]) == 2


def test_query_prints_result_and_report(capsys):
    sql = "SELECT movie_title, count(*) AS n FROM movies GROUP BY 1 ORDER BY 1"
    assert main(["query", sql, "--table", f"movies={SAMPLE}"]) == 0
    out = capsys.readouterr().out
    assert "Anna Karenina" in out and "6 rows" in out and "no LLM calls" in out


def test_explain_shows_the_plan(capsys):
    sql = "SELECT * FROM movies WHERE llm_filter('Kids?', movie_info, review_content)"
    assert main(["explain", sql, "--table", f"movies={SAMPLE}"]) == 0
    assert "llm_filter" in capsys.readouterr().out


def test_errors_are_clear(capsys):
    assert main(["query", "SELECT 1", "--table", "movies=/nope.csv"]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["query", "SELECT llm(x, 1) FROM movies", "--table", f"movies={SAMPLE}"]) == 1


def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "llmql", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and __version__ in out.stdout
