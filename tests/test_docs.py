"""Run the doctests of the optimizer modules (each public rule has a SQL-in/SQL-out example)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import llmql.optimizer

MODULES = sorted(
    m.name for m in pkgutil.iter_modules(llmql.optimizer.__path__, "llmql.optimizer.")
)


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest failures in {name}"
