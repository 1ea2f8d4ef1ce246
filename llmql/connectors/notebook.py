"""Notebook magics: SQL cells with LLM calls, shown as tables with the query's report.

    %load_ext llmql
    %%llmql -o kids
    SELECT movie_title FROM movies
    WHERE llm_filter('Is this movie suitable for kids?', movie_info) AND year > {min_year}

Options (before the SQL): `-o NAME` keeps the result DataFrame in NAME (its query report in
`NAME.attrs["llmql_report"]`); `--con NAME` runs
on the connection NAME (alone, `%llmql --con NAME` makes it the notebook's connection;
default: one `llmql.connect()` shared by the notebook); `--spark` runs with
`llmql.spark.run` on the namespace's `spark` session (else a local one); `--no-report`
hides the report (shown under the table when the query made LLM calls). `%llmql explain SELECT ...` shows the optimiser's EXPLAIN.

`{name}` is a parameter bound to the notebook variable `name` (a value, never SQL text).
pandas DataFrames (and Arrow or Spark tables) in the namespace are queryable by name: the
ones a query references and the catalog lacks are registered for that query only.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Any

from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.display import display

from llmql.connectors.notebook_progress import InterruptGuard
from llmql.udfs.progress import use_progress

__all__ = ["LLMQLMagics", "NotebookError", "load_ipython_extension"]

_FLAGS = {"--spark": "spark", "--no-report": "no_report"}
_VALUED = {"-o": "out", "--out": "out", "--con": "con"}


class NotebookError(Exception):
    """A query that failed for a reason the user can fix; IPython shows only its message."""

    def _render_traceback_(self) -> list[str]:
        return [f"llmql: {self}"]


@dataclass
class CellArgs:
    """A magic's parsed options and SQL."""

    sql: str = ""
    out: str | None = None
    con: str | None = None
    spark: bool = False
    no_report: bool = False
    explain: bool = False
    params: dict[str, Any] = field(default_factory=dict)


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext llmql`: register the `%llmql` / `%%llmql` magics."""
    import warnings

    from tqdm import TqdmWarning

    with warnings.catch_warnings():
        # NOTE: without ipywidgets, tqdm.auto warns on import in a kernel; we pick the text bar.
        warnings.simplefilter("ignore", TqdmWarning)
        import tqdm.auto  # noqa: F401
    ipython.register_magics(LLMQLMagics(ipython))


@magics_class
class LLMQLMagics(Magics):
    """`%llmql` (line) and `%%llmql` (cell): run SQL with LLM calls, show table + report."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.connection: Any = None

    @no_var_expand
    @line_cell_magic
    def llmql(self, line: str, cell: str | None = None) -> None:
        """Run the SQL of the line or cell; see the module docstring for the options."""
        args = parse_args(line, cell)
        if not args.sql.strip():
            if args.con:
                self.connection = self._lookup(args.con)
                return
            raise NotebookError("no SQL to run (write it after the options, or in the cell)")
        dialect = "spark" if args.spark else "duckdb"
        args.sql, args.params = bind_names(args.sql, self.shell.user_ns, dialect)
        if args.spark:
            from llmql.connectors.notebook_spark import run_spark

            frame, report = run_spark(args, self.shell.user_ns)
        else:
            frame, report = self._run_duckdb(args)
        if frame is not None:
            self._show(args, frame, report)

    def _run_duckdb(self, args: CellArgs) -> tuple[Any, Any]:
        con = self._lookup(args.con) if args.con else self._default_connection()
        names = _register_frames(con, args.sql, self.shell.user_ns)
        try:
            if args.explain:
                display(_Text(_guarded(lambda: _explain(con, args))))
                return None, None
            return _guarded(lambda: _execute(con, args))
        finally:
            for name in names:
                con.unregister(name)

    def _show(self, args: CellArgs, frame: Any, report: Any) -> None:
        if args.out:
            if report is not None and hasattr(frame, "attrs"):
                frame.attrs["llmql_report"] = report
            self.shell.user_ns[args.out] = frame
        display(frame)
        if report is not None and getattr(report, "calls", True) and not args.no_report:
            display(_Text(report.format() if hasattr(report, "format") else str(report)))

    def _default_connection(self) -> Any:
        if self.connection is None:
            from llmql.connectors.duckdb import connect

            self.connection = connect()
        return self.connection

    def _lookup(self, name: str) -> Any:
        if name not in self.shell.user_ns:
            raise NotebookError(f"--con {name}: no variable {name!r} in the notebook")
        return self.shell.user_ns[name]


def parse_args(line: str, cell: str | None) -> CellArgs:
    """Options from the start of `line`; the SQL is the rest of the line, or the cell."""
    args, rest = CellArgs(), line.strip()
    while rest.startswith("-"):
        option, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        if option in _FLAGS:
            setattr(args, _FLAGS[option], True)
        elif option in _VALUED:
            value, _, rest = rest.partition(" ")
            if not value:
                raise NotebookError(f"{option} needs a name")
            setattr(args, _VALUED[option], value)
            rest = rest.lstrip()
        else:
            raise NotebookError(f"unknown option {option}; known: {sorted({*_FLAGS, *_VALUED})}")
    sql = rest if cell is None else f"{rest}\n{cell}"
    match = re.match(r"\s*explain\b", sql, flags=re.IGNORECASE)
    if match:
        args.explain, sql = True, sql[match.end() :]
    args.sql = sql.strip().rstrip(";")
    return args


def bind_names(sql: str, namespace: dict[str, Any], dialect: str = "duckdb") -> tuple[str, dict]:
    """`{name}` outside string literals, valued from `namespace`, bound as data, never SQL.

    DuckDB: `{name}` becomes the named parameter `$name` and the values are returned for the
    engine to bind. Other dialects (Spark): each becomes a quoted literal of its value.

    >>> bind_names("SELECT * FROM t WHERE a = {x} AND b = '{x}'", {"x": "it's"})
    ("SELECT * FROM t WHERE a = $x AND b = '{x}'", {'x': "it's"})
    >>> print(bind_names("SELECT {x} AS v", {"x": "it's"}, dialect="spark")[0])
    SELECT 'it\\'s' AS v
    """
    from sqlglot import exp

    params: dict[str, Any] = {}
    for start, end, name in reversed(_placeholders(sql)):
        if name not in namespace:
            raise NotebookError(f"{{{name}}}: no variable {name!r} in the notebook")
        params[name] = namespace[name]
        text = f"${name}" if dialect == "duckdb" else exp.convert(params[name]).sql(dialect)
        sql = f"{sql[:start]}{text}{sql[end + 1 :]}"
    return sql, (params if dialect == "duckdb" else {})


def _placeholders(sql: str) -> list[tuple[int, int, str]]:
    """(start, end, name) of each `{name}` token triple (so never inside a string literal)."""
    import sqlglot
    from sqlglot.errors import TokenError

    try:
        tokens = sqlglot.Dialect.get_or_raise("duckdb").tokenize(sql)
    except TokenError as err:
        raise NotebookError(f"SQL does not parse: {err}") from None
    out = []
    for a, b, c in zip(tokens, tokens[1:], tokens[2:]):
        braces = (a.token_type.name, c.token_type.name) == ("L_BRACE", "R_BRACE")
        if braces and b.token_type.name != "STRING" and b.text.isidentifier():
            out.append((a.start, c.end, b.text))
    return out


def referenced_frames(
    sql: str, namespace: dict[str, Any], known: set[str], *, spark: bool = False
) -> dict[str, Any]:
    """Tables the query reads that the catalog lacks (`known`, lower case) and the namespace
    holds as a DataFrame (pandas, Arrow, polars; Spark DataFrames too when `spark`)."""
    import sqlglot
    from sqlglot import exp

    try:
        tree = sqlglot.parse_one(sql, read="spark" if spark else "duckdb")
    except sqlglot.errors.SqlglotError:
        return {}
    ctes = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    out = {}
    for table in tree.find_all(exp.Table):
        name = table.name
        if table.db or name.lower() in known | ctes or name not in namespace:
            continue
        if _is_frame(namespace[name], spark):
            out[name] = namespace[name]
    return out


def _register_frames(con: Any, sql: str, namespace: dict[str, Any]) -> list[str]:
    rows = con.execute("SELECT table_name FROM information_schema.tables").fetchall()
    frames = referenced_frames(sql, namespace, {r[0].lower() for r in rows})
    for name, frame in frames.items():
        con.register(name, frame)
    return list(frames)


def _is_frame(value: Any, spark: bool = False) -> bool:
    kind = type(value)
    package = kind.__module__.split(".")[0]
    if spark and package == "pyspark":
        return kind.__name__ == "DataFrame"
    return (package, kind.__name__) in {
        ("pandas", "DataFrame"), ("pyarrow", "Table"), ("polars", "DataFrame"),
    }


def _execute(con: Any, args: CellArgs) -> tuple[Any, Any]:
    """Run the query; the result as pandas and the connection's report (None if it has none)."""
    result = con.execute(args.sql, args.params or None)
    frame = result.df()
    report = con.last_report() if hasattr(con, "last_report") else None
    return frame, report


def _explain(con: Any, args: CellArgs) -> str:
    from llmql.optimizer.planner import bind_parameters

    sql = bind_parameters(args.sql, args.params or None)
    return con.explain(sql) if hasattr(con, "explain") else str(con.sql(f"EXPLAIN {sql}"))


def _guarded(run: Any, *, spark: bool = False) -> Any:
    """`run()` with live progress and clean interrupts; user errors as one-line messages.

    NOTE: on Spark, pyspark's own SIGINT handler stays: it cancels the running jobs.
    """
    guard = InterruptGuard()
    try:
        if spark:
            return run()
        with guard, use_progress(guard.progress):
            return run()
    except KeyboardInterrupt:
        if spark:
            raise NotebookError("interrupted: the Spark jobs were cancelled") from None
        raise NotebookError(
            f"interrupted: {guard.done} of {guard.total} prompts finished and are cached; "
            "run the cell again to resume"
        ) from None
    except Exception as err:
        if _is_user_error(err):
            raise NotebookError(one_line(err)) from err
        raise


def _is_user_error(err: Exception) -> bool:
    import duckdb

    from llmql.optimizer.errors import PlanError
    from llmql.udfs.types import OutputParseError, UDFError

    user = (duckdb.Error, PlanError, UDFError, OutputParseError, FileNotFoundError)
    return isinstance(err, user) or type(err).__module__.startswith("pyspark")


def one_line(err: BaseException) -> str:
    """`Kind: first line of the message` (DuckDB and Spark messages run over many lines)."""
    text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class _Text:
    """Preformatted text (a report, an EXPLAIN) for notebook display."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(self.text)}</pre>"
