"""Plan types shared by the optimizer and the connectors (DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmql.udfs import CallOptions, CallSpec


@dataclass(frozen=True)
class LLMCall:
    """One LLM function call of a query, with the relation that feeds it.

    The connector runs `input_sql` (in the query's dialect; it may read the result tables
    of calls listed in `depends_on`), which yields the *distinct* argument rows with one
    column per name in `fields`. It computes one result per row and registers them as a
    table named `result_table` with the columns of `fields` plus `result`; `final_sql`
    reads it.
    """

    id: str  # "llm_0", "llm_1", ... unique within the plan
    function: str  # "llm" | "llm_filter" | "llm_classify" | "llm_score" | "llm_extract" | "llm_agg"
    instruction: str
    fields: tuple[str, ...]  # prompt field names (column names or aliases), in argument order
    input_sql: str
    result_table: str
    options: dict = field(default_factory=dict)  # labels, lo/hi, json_schema, model, max_tokens...
    depends_on: tuple[str, ...] = ()  # ids of calls that must finish first
    is_filter: bool = False

    def call_options(self, defaults: dict) -> dict:
        """`defaults` overlaid with this call's options, less the planner's own metadata."""
        own = {k: v for k, v in self.options.items() if k not in _PLAN_KEYS}
        return {**defaults, **own}

    def spec(self, defaults: dict | None = None) -> CallSpec:
        """The udfs call spec that runs this call, its options overlaid on `defaults`.

        Raises:
            UDFError: an unknown or invalid option.
        """
        options = CallOptions.from_dict(self.call_options(defaults or {}))
        return CallSpec(self.function, self.instruction, tuple(self.fields), options)


_PLAN_KEYS = ("aggregate", "group_keys")  # planner metadata in LLMCall.options


@dataclass(frozen=True)
class Source:
    """A relation the connector materialises once, before any call, as table `name`.

    Input relations and the final query read it, so they all see the same rows (e.g. the rows
    a LIMIT without ORDER BY picked).
    """

    name: str
    sql: str


@dataclass(frozen=True)
class LLMPlan:
    """Sources to materialise, calls in execution order, then the original query rewritten to
    look up their results."""

    sql: str  # the original query
    dialect: str
    calls: tuple[LLMCall, ...]
    final_sql: str
    sources: tuple[Source, ...] = ()
