"""Run the doctests of the optimizer and ordering modules (each public rule has a SQL-in/SQL-out
example)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import llmql.optimizer
import llmql.ordering

MODULES = sorted(
    m.name
    for package in (llmql.optimizer, llmql.ordering)
    for m in pkgutil.iter_modules(package.__path__, f"{package.__name__}.")
)


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest failures in {name}"
