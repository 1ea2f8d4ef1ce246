"""The %llmql / %%llmql magics in a real IPython InteractiveShell, on a real DuckDB connection
and the real embedded engine over a tiny random-weight Llama (greedy, so deterministic)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import llmql
from llmql.udfs.result_cache import ResultCache

IPython = pytest.importorskip("IPython")
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from IPython.utils.capture import capture_output  # noqa: E402

VOCAB = 64
NAMES = ["w5 w6", "w7", "w8 w9 w10", "w11"]


def _write_tiny_llama(directory: Path) -> None:
    """config.json, model.safetensors (random, seeded) and a word-level tokenizer."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    hidden, inter, layers = 32, 48, 2
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
              "tie_word_embeddings": False, "torch_dtype": "float32"}
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (VOCAB, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden),
                   p + "self_attn.k_proj.weight": (hidden // 2, hidden),
                   p + "self_attn.v_proj.weight": (hidden // 2, hidden),
                   p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter),
                   p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
    tensors = {k: torch.randn(s, generator=gen) * (1.0 if len(s) == 1 else s[-1] ** -0.5 * 2)
               for k, s in shapes.items()}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    meta = {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from llmql.engine import load

    directory = tmp_path_factory.mktemp("tiny_llama")
    _write_tiny_llama(directory)
    return load(str(directory))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    import llmql.udfs.executor as executor

    cache = ResultCache(tmp_path / "results.sqlite")
    monkeypatch.setattr(executor, "default_cache", lambda enabled=None: cache)
    return tmp_path / "results.sqlite"


@pytest.fixture
def shell(engine, cache):
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "llmql")
    con = llmql.connect(engine=engine, max_tokens=3)
    con.execute("CREATE TABLE t AS SELECT * FROM (VALUES (1, 'w5 w6'), (2, 'w7'), (3, 'w5 w6')) v(id, name)")
    shell.user_ns["con"] = con
    shell.run_line_magic("llmql", "--con con")
    yield shell
    con.close()
    for name in ("con", "out", "films", "v"):
        shell.user_ns.pop(name, None)


def _run(shell: InteractiveShell, cell: str):
    with capture_output() as captured:
        result = shell.run_cell(cell)
    return result, captured


def _texts(captured) -> list[str]:
    return [o.data.get("text/plain", "") for o in captured.outputs]


def test_cell_returns_table_keeps_it_and_shows_the_report(shell):
    sql = "SELECT id, name, llm('w9 w10', name) AS a FROM t ORDER BY id"
    result, captured = _run(shell, f"%%llmql -o out\n{sql}")
    assert result.success, captured.stdout
    out = shell.user_ns["out"]
    assert list(out.columns) == ["id", "name", "a"]
    assert out["id"].tolist() == [1, 2, 3] and out["name"].tolist() == ["w5 w6", "w7", "w5 w6"]
    expected = shell.user_ns["con"].sql(sql).df()  # NOTE: now from the result cache
    pd.testing.assert_frame_equal(out, expected)
    assert out["a"].iloc[0] == out["a"].iloc[2]
    assert out.attrs["llmql_report"].calls[0].report.distinct_inputs == 2
    table, report = _texts(captured)
    assert "w5 w6" in table
    assert "llm_0" in report and "prefix_hit" in report and "distinct" in report


def test_line_magic_plain_sql_and_no_report(shell):
    result, captured = _run(shell, "%llmql -o out --no-report SELECT count(*) AS n FROM t")
    assert result.success
    assert shell.user_ns["out"]["n"].tolist() == [3]
    assert len(captured.outputs) == 1


@pytest.mark.parametrize("value", ["it's", "x'); DROP TABLE t; --", "{v}", "$1 ?"])
def test_parameters_are_data_not_sql(shell, value):
    shell.user_ns["v"] = value
    cell = "%%llmql -o out\nSELECT {v} AS v, '{v}' AS literal, llm('w9', name) AS a FROM t WHERE name <> {v}"
    result, captured = _run(shell, cell)
    assert result.success, captured.stdout
    out = shell.user_ns["out"]
    assert out["v"].tolist() == [value] * 3 and out["literal"].tolist() == ["{v}"] * 3
    _run(shell, "%llmql -o out SELECT {v} AS v, count(*) AS n FROM t")
    assert shell.user_ns["out"].to_dict("records") == [{"v": value, "n": 3}]


def test_namespace_dataframe_is_queryable_by_name(shell):
    shell.user_ns["films"] = pd.DataFrame({"title": ["w5", "w7", "w5"], "year": [1990, 2000, 2010]})
    result, captured = _run(
        shell, "%%llmql -o out\nSELECT title, llm('w9', title) AS a FROM films WHERE year > 1995 ORDER BY year"
    )
    assert result.success, captured.stdout
    assert shell.user_ns["out"]["title"].tolist() == ["w7", "w5"]
    tables = shell.user_ns["con"].execute("SELECT table_name FROM information_schema.tables")
    assert "films" not in {r[0] for r in tables.fetchall()}  # registered for the query only


def test_explain(shell):
    result, captured = _run(shell, "%llmql explain SELECT llm('w9', name) FROM t WHERE id > 1")
    assert result.success, captured.stdout
    text = "\n".join(_texts(captured))
    assert "llm_0: llm('w9')" in text and "input: SELECT DISTINCT name" in text


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("%llmql SELECT * FROM no_such_table", "llmql: CatalogException: Catalog Error: Table with name no_such_table"),
        ("%llmql SELECT llm('w9', nope) FROM t", "llmql: "),
        ("%llmql SELECT {undefined_var}", "llmql: {undefined_var}: no variable 'undefined_var'"),
        ("%llmql --bogus SELECT 1", "llmql: unknown option --bogus"),
    ],
)
def test_bad_query_is_one_clear_line(shell, cell, message):
    result, captured = _run(shell, cell)
    assert not result.success
    lines = [ln for ln in captured.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), captured.stdout


def _cached(path: Path) -> int:
    try:
        with sqlite3.connect(path, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _interrupt_when_cached(path: Path, at_least: int) -> threading.Thread:
    def watch() -> None:
        deadline = time.time() + 60
        while _cached(path) < at_least and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_interrupt_stops_cleanly_and_the_engine_stays_healthy(shell, engine, cache):
    rows = ", ".join(f"('w{4 + i} w{5 + i}')" for i in range(12))
    sql = "SELECT name, llm('w9 w10 w11', name, max_tokens := 8) AS a FROM many ORDER BY name"
    reference = llmql.connect(engine=engine, result_cache=False)
    reference.execute(f"CREATE TABLE many AS SELECT * FROM (VALUES {rows}) v(name)")
    expected = reference.sql(sql).df()
    con = llmql.connect(engine=engine, chunk_size=1)  # NOTE: a safe point after every prompt
    con.execute(f"CREATE TABLE many AS SELECT * FROM (VALUES {rows}) v(name)")
    shell.user_ns["con"] = con

    watcher = _interrupt_when_cached(cache, 3)
    result, captured = _run(shell, f"%%llmql -o out --con con\n{sql}")
    watcher.join()
    assert not result.success and "out" not in shell.user_ns
    assert "llmql: interrupted:" in captured.stdout and "cached" in captured.stdout
    done = _cached(cache)
    assert 3 <= done < 12

    result, captured = _run(shell, f"%%llmql -o out --con con\n{sql}")
    assert result.success, captured.stdout
    pd.testing.assert_frame_equal(shell.user_ns["out"], expected)
    report = con.last_report().total
    assert report.cache_hits == done and report.llm_calls == 12 - done


def test_progress_bar_shows_hit_rate_and_tokens_per_second(shell):
    from llmql.settings import override

    with override(progress=True):
        result, captured = _run(shell, "%llmql SELECT llm('w12 w13', name) FROM t")
    assert result.success, captured.stdout
    assert "llm: 100%" in captured.stderr and "2/2" in captured.stderr
    assert "prefix hit" in captured.stderr and "tok/s" in captured.stderr
