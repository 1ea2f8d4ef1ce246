"""`llmql` command line: run or explain LLM SQL over CSV/Parquet files, and the demo.

llmql query "SELECT ... FROM movies" --table movies=examples/movies_sample.csv
llmql explain "SELECT ..." --table movies=movies.csv
llmql demo
llmql serve --model default --port 8000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import llmql

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEMO_QUERIES = (
    (
        "filter (60 rows, 6 distinct inputs)",
        "SELECT movie_title, COUNT(*) AS reviews FROM movies "
        "WHERE llm_filter('Is this movie suitable for kids?', movie_title, movie_info) "
        "GROUP BY movie_title ORDER BY movie_title",
    ),
    (
        "projection",
        "SELECT DISTINCT movie_title, llm('Name the genre of the movie in one or two words.', "
        "movie_title, movie_info, max_tokens := 6, examples := ["
        "{'movie_title': 'Boyhood', 'movie_info': 'A boy grows up in Texas, from his first day "
        "at school to his first day at college.', 'answer': 'coming-of-age drama'}, "
        "{'movie_title': 'Toy Story', 'movie_info': 'A cowboy doll feels threatened when a new "
        "space toy becomes the favourite of the boy who owns them.', 'answer': 'animation'}, "
        "{'movie_title': 'Pride and Prejudice', 'movie_info': 'A spirited young woman clashes "
        "with a proud wealthy gentleman in Georgian England.', 'answer': 'romance'}, "
        "{'movie_title': 'The Conjuring', 'movie_info': 'Paranormal investigators help a family "
        "terrorised by a dark presence in their farmhouse.', 'answer': 'horror'}]) AS genre "
        "FROM movies ORDER BY movie_title",
    ),
    (
        "aggregation (a score per review, averaged per movie)",
        "SELECT movie_title, AVG(llm_score('Rate the review from 1 to 5.', 1, 5, movie_title, "
        "review_content)) AS avg_score, COUNT(*) AS reviews FROM movies GROUP BY movie_title "
        "ORDER BY avg_score DESC",
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llmql` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    import duckdb

    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError, duckdb.Error) as exc:
        print(f"llmql: error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmql", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"llmql {llmql.__version__}")
    sub = parser.add_subparsers(dest="command")
    for name, run, text in (
        ("query", _query, "run a SQL query and print the result and its report"),
        ("explain", _explain, "print the optimiser's plan of a SQL query"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("sql", help="the SQL query")
        p.add_argument(
            "--table",
            action="append",
            default=[],
            metavar="NAME=PATH",
            help="load a .csv or .parquet file as table NAME (repeatable)",
        )
        p.add_argument("--max-rows", type=int, default=40, help="rows to print (default 40)")
        p.add_argument("--no-cache", action="store_true", help="disable the result cache")
        p.set_defaults(run=run)
    demo = sub.add_parser("demo", help="filter, projection and aggregation on sample movies")
    demo.add_argument("--data", default=str(EXAMPLES / "movies_sample.csv"), help="movies CSV")
    demo.add_argument("--no-cache", action="store_true", help="disable the result cache")
    demo.set_defaults(run=_demo, max_rows=20)
    _serve_parser(sub)
    return parser


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    text = "serve a model over an OpenAI-compatible HTTP API (docs/serve.md)"
    p = sub.add_parser("serve", help=text, description=text)
    p.add_argument("--model", default=None, help="model to serve (default: LLMQL_MODEL)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer)")
    p.add_argument("--policy", default=None, help="scheduling policy (fcfs, ltr, fair)")
    p.add_argument("--max-queue", type=int, default=512, help="requests in flight before 429")
    p.add_argument("--served-name", default=None, help="model id clients name (default: the model's)")
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from llmql.engine.server import ServerConfig
    from llmql.engine.serving import run_server

    config = ServerConfig(api_key=args.api_key, max_queue=args.max_queue,
                          served_name=args.served_name)
    run_server(args.model, host=args.host, port=args.port, policy=args.policy, config=config)
    return 0


def _connect(args: argparse.Namespace) -> llmql.connectors.duckdb.LLMConnection:
    options = {"result_cache": False} if args.no_cache else {}
    con = llmql.connect(**options)
    for spec in args.table:
        name, sep, path = spec.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"--table expects NAME=PATH with NAME an identifier, got {spec!r}")
        load_table(con.con, name, path)
    return con


def load_table(con, name: str, path: str) -> None:
    """Create table `name` from a .csv/.tsv or .parquet file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    reader = "read_parquet" if file.suffix.lower() in (".parquet", ".pq") else "read_csv_auto"
    con.execute(f'CREATE OR REPLACE TABLE "{name}" AS SELECT * FROM {reader}(?)', [str(file)])


def _query(args: argparse.Namespace) -> int:
    with _connect(args) as con:
        _run_and_print(con, args.sql, args.max_rows)
    return 0


def _explain(args: argparse.Namespace) -> int:
    with _connect(args) as con:
        print(con.explain(args.sql))
    return 0


def _run_and_print(con, sql: str, max_rows: int) -> None:
    t0 = time.perf_counter()
    frame = con.sql(sql).df()
    elapsed = time.perf_counter() - t0
    import pandas as pd

    with pd.option_context("display.max_colwidth", 60, "display.width", 160):
        print(frame.to_string(max_rows=max_rows))
    print(f"\n({len(frame)} rows in {elapsed:.1f}s)")
    print(con.last_report().format())


def _demo(args: argparse.Namespace) -> int:
    from llmql.udfs.engines import get_engine

    args.table = [f"movies={args.data}"]
    print(f"llmql {llmql.__version__} demo on {args.data}\n")
    with _connect(args) as con:
        try:
            engine = get_engine()
        except (ImportError, FileNotFoundError) as exc:  # NOTE: no model package or file
            print(f"(no inference engine available: {exc}; showing the plans only)\n")
            for title, sql in DEMO_QUERIES:
                print(f"== {title}\n{sql}\n{con.explain(sql)}\n")
            return 0
        for title, sql in DEMO_QUERIES:
            print(f"== {title}\n{sql}\n")
            _run_and_print(con, sql, args.max_rows)
            print()
        print(f"engine: {_engine_summary(engine)}")
    return 0


def _engine_summary(engine) -> str:
    s = engine.stats()
    experts = s.extra.get("experts")
    moe = (f"; expert cache: {experts['hit_rate']:.1%} hit rate, "
           f"{experts['bytes_moved'] / 2**30:.2f} GiB moved, "
           f"prefetch accuracy {experts['prefetch_accuracy']:.1%}") if experts else ""
    return (
        f"{s.requests} requests, {s.prompt_tokens} prompt tokens "
        f"({s.cache_hit_rate:.1%} from the prefix cache), {s.output_tokens} output tokens, "
        f"{s.seconds:.1f}s{moe}"
    )


if __name__ == "__main__":
    sys.exit(main())
