#!/usr/bin/env bash
# CI: the fast tests on the oldest sqlglot, duckdb, pyarrow and pyspark that pyproject.toml
# allows (pinned in .ci/min-constraints.txt), in a second venv, .venv-min.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-min
PY=$VENV/bin/python
test -x "$PY" || python3 -m venv "$VENV"
# NOTE: torch first and pinned, as in the Makefile: a bare requirement pulls a CUDA build.
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[dev,spark,serve,notebook]" -c .ci/min-constraints.txt
"$PY" - <<'PY'
import importlib.metadata as md
pins = [line.split("==") for line in open(".ci/min-constraints.txt") if "==" in line]
wrong = {name: (md.version(name), want.strip()) for name, want in pins if md.version(name) != want.strip()}
assert not wrong, f"not the minimum versions: {wrong}"
print("minimum versions:", ", ".join(f"{n}=={v.strip()}" for n, v in pins))
PY
# The tests that exercise those four libraries (SQL planning, ordering, udfs, connectors);
# the engine and kernel tests do not import them. Pass paths to run others.
if [ "$#" -eq 0 ]; then set -- tests/optimizer tests/ordering tests/udfs tests/connectors; fi
LLMQL_CACHE_DIR="$PWD/.cache/llmql" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" "$@"
