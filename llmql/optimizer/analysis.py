"""Shared analysis over sqlglot trees: LLM calls, their arguments and their SELECT scopes.

Every rule finds LLM calls through this module; no rule walks the tree on its own.
A *scope* is one `SELECT`: the nodes that belong to it, excluding nested queries.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlglot import exp

from llmql.optimizer.errors import PlanError

LLM_FUNCTIONS = ("llm", "llm_filter", "llm_classify", "llm_score", "llm_extract", "llm_agg")
OPTION_NAMES = ("model", "adapter", "max_tokens", "temperature", "seed", "calibrate", "reorder_fields",
                "tenant", "policy", "examples")
# NOTE: cheaper / more selective functions first; used to order LLM filters.
FUNCTION_COST = {"llm_filter": 0, "llm_classify": 1, "llm_score": 2, "llm": 3, "llm_extract": 4}
_QUERY_TYPES = (exp.Select, exp.SetOperation)


@dataclass(frozen=True)
class ParsedCall:
    """One LLM call as written in SQL: function, literal instruction, data arguments (sqlglot
    expressions), their field names, literal options. The plan's `LLMCall.spec()` turns it into
    the `llmql.udfs.CallSpec` that runs."""

    function: str
    instruction: str
    args: tuple[exp.Expression, ...]
    fields: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


def llm_function(node: exp.Expression) -> str | None:
    """The lower-case LLM function name if `node` is an LLM call, else None."""
    if isinstance(node, exp.Anonymous) and isinstance(node.this, str):
        name = node.this.lower()
        return name if name in LLM_FUNCTIONS else None
    return None


def is_prunable(node: exp.Expression, root: exp.Expression) -> bool:
    """True for nested queries below `root` (they form scopes of their own)."""
    return node is not root and isinstance(node, _QUERY_TYPES)


def scope_nodes(root: exp.Expression) -> Iterator[exp.Expression]:
    """Nodes of `root`'s scope in post-order (children first), skipping nested queries."""
    for child in root.iter_expressions():
        if not is_prunable(child, root):
            yield from scope_nodes(child)
    yield root


def scope_calls(root: exp.Expression, scope: exp.Expression | None = None) -> list[exp.Anonymous]:
    """LLM calls under `root` that belong to `scope` (default: `root`), inner calls first."""
    scope = root if scope is None else scope
    return [n for n in scope_nodes(root) if llm_function(n) and enclosing_scope(n) is scope]


def has_llm_call(node: exp.Expression) -> bool:
    """True if any LLM call occurs anywhere under `node` (nested queries included)."""
    return any(llm_function(n) for n in node.walk())


def enclosing_scope(node: exp.Expression) -> exp.Expression | None:
    """The nearest enclosing query (SELECT or set operation) of `node`."""
    parent = node.parent
    while parent is not None and not isinstance(parent, _QUERY_TYPES):
        parent = parent.parent
    return parent


def clause_of(node: exp.Expression, select: exp.Select) -> str:
    """The argument key of `select` under which `node` sits ("where", "expressions", ...)."""
    while node.parent is not select:
        node = node.parent
    return node.arg_key


def has_ancestor(node: exp.Expression, stop: exp.Expression, types: tuple) -> bool:
    """True if an ancestor of `node` strictly below `stop` is an instance of `types`."""
    parent = node.parent
    while parent is not None and parent is not stop:
        if isinstance(parent, types):
            return True
        parent = parent.parent
    return False


def inside_aggregate(node: exp.Expression, stop: exp.Expression) -> bool:
    """True if `node` is an argument of an aggregate function (llm_agg included) below `stop`."""
    parent = node.parent
    while parent is not None and parent is not stop:
        if isinstance(parent, exp.AggFunc) or llm_function(parent) == "llm_agg":
            return True
        parent = parent.parent
    return False


def selects_post_order(root: exp.Expression) -> list[exp.Select]:
    """Every SELECT under `root`, inner queries (CTEs, subqueries) before their parents."""
    out: list[exp.Select] = []

    def visit(node: exp.Expression) -> None:
        for child in node.iter_expressions():
            visit(child)
        if isinstance(node, exp.Select):
            out.append(node)

    visit(root)
    return out


def conjuncts(condition: exp.Expression | None) -> list[exp.Expression]:
    """The AND-ed parts of a condition (empty for None)."""
    if condition is None:
        return []
    if isinstance(condition, exp.Where):
        condition = condition.this
    return list(condition.flatten()) if isinstance(condition, exp.And) else [condition]


def source_names(select: exp.Select) -> list[str]:
    """Names (aliases) of the FROM and JOIN sources of `select`, in order."""
    sources = []
    if select.args.get("from_"):
        sources.append(select.args["from_"].this)
    sources.extend(j.this for j in select.args.get("joins") or [])
    return [s.alias_or_name for s in sources]


def is_aggregate_select(select: exp.Select) -> bool:
    """True if `select` groups rows (GROUP BY, or an aggregate in its select list / HAVING)."""
    if select.args.get("group") or select.args.get("having"):
        return True
    for node in scope_nodes(select):
        is_agg = isinstance(node, exp.AggFunc) or llm_function(node) == "llm_agg"
        if is_agg and not has_ancestor(node, select, (exp.Window,)):
            return True
    return False


def parse_call(node: exp.Anonymous) -> ParsedCall:
    """Validate an LLM call and split it into instruction, data arguments and options.

    Raises:
        PlanError: a non-literal instruction, a malformed parameter or an unknown option.
    """
    function = llm_function(node)
    if function is None:
        raise PlanError(f"not an LLM call: {node.sql()}")
    positional = [a for a in node.expressions if not isinstance(a, (exp.PropertyEQ, exp.Kwarg))]
    named = [a for a in node.expressions if isinstance(a, (exp.PropertyEQ, exp.Kwarg))]
    if not positional or not _is_string(positional[0]):
        raise PlanError(f"{function}: the instruction must be a string literal, in {node.sql()}")
    options = _leading_options(function, positional, node)
    options.update(_named_options(function, named))
    args = tuple(positional[1 + _LEADING[function] :])
    if not args:
        raise PlanError(f"{function}: needs at least one column argument, in {node.sql()}")
    if function == "llm_agg" and len(args) != 1:
        raise PlanError(f"llm_agg takes (instruction, column), got {node.sql()}")
    return ParsedCall(function, positional[0].name, args, field_names(args), options)


_LEADING = {"llm": 0, "llm_filter": 0, "llm_classify": 1, "llm_score": 2, "llm_extract": 1, "llm_agg": 0}


def field_names(args: tuple[exp.Expression, ...]) -> tuple[str, ...]:
    """Prompt field names: a column's name, `argN` (1-based) for any other expression."""
    names: list[str] = []
    for i, arg in enumerate(args, 1):
        base = arg.name if isinstance(arg, exp.Column) and arg.name else f"arg{i}"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return tuple(names)


def literal_value(node: exp.Expression) -> Any:
    """The Python value of a string/number/boolean literal (negative numbers included)."""
    if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal):
        return -literal_value(node.this)
    if isinstance(node, exp.Boolean):
        return node.this
    if isinstance(node, exp.Literal):
        if node.is_string:
            return node.name
        text = node.name
        return float(text) if any(c in text for c in ".eE") else int(text)
    raise PlanError(f"expected a literal, got {node.sql()}")


def _is_string(node: exp.Expression) -> bool:
    return isinstance(node, exp.Literal) and node.is_string


def _leading_options(function: str, positional: list, node: exp.Expression) -> dict[str, Any]:
    n = _LEADING[function]
    if len(positional) < 1 + n:
        raise PlanError(f"{function}: missing parameters, in {node.sql()}")
    params = positional[1 : 1 + n]
    if function == "llm_classify":
        labels = params[0]
        if not isinstance(labels, exp.Array) or not all(map(_is_string, labels.expressions)):
            raise PlanError(f"llm_classify: labels must be a list of string literals, in {node.sql()}")
        return {"labels": [lab.name for lab in labels.expressions]}
    if function == "llm_score":
        return {"lo": literal_value(params[0]), "hi": literal_value(params[1])}
    if function == "llm_extract":
        if not _is_string(params[0]):
            raise PlanError(f"llm_extract: the JSON schema must be a string literal, in {node.sql()}")
        try:
            json.loads(params[0].name)
        except ValueError as err:
            raise PlanError(f"llm_extract: the JSON schema is not valid JSON: {err}") from err
        return {"json_schema": params[0].name}
    return {}


def _named_options(function: str, named: list) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for arg in named:
        key = arg.this.name.lower()
        if key not in OPTION_NAMES:
            raise PlanError(f"{function}: unknown option {key!r}; expected one of {OPTION_NAMES}")
        options[key] = _examples(function, arg.expression) if key == "examples" else literal_value(arg.expression)
    return options


def _examples(function: str, node: exp.Expression) -> list[dict[str, Any]]:
    """`examples := [{'field': value, ..., 'answer': value}, ...]` (Spark: `array(named_struct(
    ...))`) as a list of dicts of literals."""
    if not isinstance(node, exp.Array) or not all(map(_is_struct, node.expressions)):
        raise PlanError(f"{function}: examples must be a list of struct literals "
                        f"[{{'field': value, ..., 'answer': value}}, ...], got {node.sql()}")
    out = []
    for struct in node.expressions:
        example = {}
        for key, value in _struct_items(function, struct):
            example[key] = literal_value(value) if not isinstance(value, exp.Null) else None
        out.append(example)
    return out


def _is_struct(node: exp.Expression) -> bool:
    # NOTE: sqlglot < 28.1 parses Spark's named_struct(...) as an anonymous function.
    return isinstance(node, exp.Struct) or (
        isinstance(node, exp.Anonymous) and node.name.lower() == "named_struct")


def _struct_items(function: str, struct: exp.Expression) -> list[tuple[str, exp.Expression]]:
    """(name, value expression) pairs of a struct literal."""
    if isinstance(struct, exp.Anonymous):
        args = struct.expressions
        if len(args) % 2 or not all(map(_is_string, args[::2])):
            raise PlanError(f"{function}: named_struct needs name/value pairs, got {struct.sql()}")
        return [(k.name, v) for k, v in zip(args[::2], args[1::2])]
    items = []
    for item in struct.expressions:
        if not isinstance(item, (exp.PropertyEQ, exp.Slice)):
            raise PlanError(f"{function}: an example must name its values, got {struct.sql()}")
        items.append((item.this.name, item.expression))
    return items
