"""Multi-LoRA serving against transformers + peft on tiny random models (float32, CPU):
mixed batches (base and several adapters) give each adapter's own peft greedy tokens and
logits; the prefix cache never shares K/V across adapters; the pool's LRU; bad adapters."""

from __future__ import annotations

import json
import shutil
from collections import deque
from pathlib import Path

import pytest
import torch

import llmql
from llmql.engine.context import ForwardBatch, forward_context
from llmql.engine.engine import EmbeddedEngine, EngineConfig
from llmql.engine.kvcache.base import create_prefix_cache
from llmql.engine.kvcache.pool import KVPool
from llmql.engine.lora import AdapterError, AdapterPool
from llmql.engine.lora.batch import HEAVY_SLOT, LONG_SEGMENT, LoraBatch
from llmql.engine.models import load_model
from llmql.engine.scheduler.cache import CacheManager
from llmql.engine.scheduler.policy import create_policy
from llmql.engine.scheduler.prefill import PrefillAdmitter
from llmql.engine.scheduler.request import Req
from llmql.engine.types import GenerationRequest
from llmql.kernels.cpu_lib import kernel_available
from llmql.optimizer.explain import explain
from llmql.settings import override

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# NOTE: (name, rank, alpha, rsLoRA, targets): mixed ranks, scalings and target subsets.
ADAPTERS = [("a1", 4, 8, False, ["q_proj", "v_proj", "o_proj", "down_proj"]),
            ("a2", 8, 4, True, ALL)]


def make_adapter(base_dir: Path, out: Path, rank: int, alpha: int, rslora: bool,
                 targets: list[str], seed: int) -> Path:
    """A random PEFT LoRA adapter (B != 0) of the HF model in `base_dir`, saved to `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                        init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, config)
    with torch.no_grad():  # NOTE: strong enough to change greedy answers of the tiny models
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    model.save_pretrained(out)
    return out


def peft_model(base_dir: Path, adapter: Path | None):
    """transformers (eager, float32) with `adapter` applied through peft (None: the base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


def peft_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(4, 96, (length - 1,), generator=gen).tolist()]


_BUILT: dict[str, tuple[Path, dict[str, Path]]] = {}


def _adapters(name: str, tiny_model_dir, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """(base dir, {adapter name: folder}) for tiny family `name`, built once per session."""
    if name not in _BUILT:
        base = tiny_model_dir(name)
        root = tmp_path_factory.mktemp(f"lora-{name}")
        _BUILT[name] = base, {a: make_adapter(base, root / a, r, alpha, rs, targets, seed=i)
                              for i, (a, r, alpha, rs, targets) in enumerate(ADAPTERS)}
    return _BUILT[name]


@pytest.fixture(scope="module", params=[
    pytest.param("gemma3", marks=pytest.mark.slow), "llama", pytest.param("qwen3", marks=pytest.mark.slow),
])
def family(request, tiny_model_dir, tmp_path_factory):
    """(base dir, {adapter name: folder}) for each supported tiny family."""
    return _adapters(request.param, tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tiny_model_dir, tmp_path_factory):
    """The same for tiny Llama only (engine-level behaviour that does not vary by family)."""
    return _adapters("llama", tiny_model_dir, tmp_path_factory)


def _engine(base: Path, **config) -> EmbeddedEngine:
    return EmbeddedEngine(load_model(str(base)), EngineConfig(kv_tokens=512, **config))


def test_mixed_batch_greedy_matches_peft(family) -> None:
    base, folders = family
    order = [None, "a1", "a2", "a1", None, "a2"]
    prompts = [prompt(5 + 4 * i, seed=i) for i in range(len(order))]  # NOTE: 5..25 tokens
    requests = [GenerationRequest(p, max_tokens=6, adapter=None if a is None else str(folders[a]))
                for p, a in zip(prompts, order)]
    refs = {a: peft_model(base, folders.get(a)) for a in set(order)}
    tokenizer = load_model(str(base)).tokenizer
    wants = [_expected_text(refs[a], p, 6, tokenizer) for p, a in zip(prompts, order)]
    # NOTE: each adapter's effect on the logits is checked in the logits test below
    for max_loras in (8, 1):  # NOTE: 1 slot: admission runs the adapters in turns
        engine = _engine(base, max_loras_per_batch=max_loras)
        results = engine.generate(requests, progress=False)
        assert [r.error for r in results] == [None] * len(order)
        assert [r.text for r in results] == wants
    engine = _engine(base, prefix_cache=False)
    assert [engine.generate([r], progress=False)[0].text for r in requests] == wants


def _expected_text(model, ids: list[int], n: int, tokenizer) -> str:
    """peft's greedy continuation as the engine reports it (stops at EOS, EOS not shown)."""
    out = peft_greedy(model, ids, n)
    stops = [i for i, t in enumerate(out) if t in tokenizer.eos_ids]
    return tokenizer.decode(out[: stops[0]] if stops else out)


def _forward(lm, pool: AdapterPool, kv: KVPool, seqs, adapters):
    """Prefill `seqs` (one segment each) under `adapters`; logits of every row."""
    ids, pos, loc, qo, kvp = [], [], [], [0], [0]
    for s in seqs:
        slots = kv.alloc(len(s))
        ids += s
        pos += range(len(s))
        loc.append(slots)
        qo.append(qo[-1] + len(s))
        kvp.append(kvp[-1] + len(s))
    lora = LoraBatch.build(pool, [len(s) for s in seqs], pool.activate(adapters))
    batch = ForwardBatch(torch.tensor(pos), torch.tensor(qo), torch.tensor(kvp), torch.cat(loc),
                         torch.cat(loc), kv, lora=lora)
    with torch.no_grad(), forward_context(batch):
        return lm.model.compute_logits(lm.model(torch.tensor(ids), batch.positions))


@pytest.mark.parametrize("kernels", ["auto", "avx2"])
def test_mixed_prefill_logits_match_peft(family, kernels, monkeypatch) -> None:
    """peft's logits from the CPU delta paths: llmql's LoRA kernel where it runs ("auto":
    its AVX-512 build where that runs; "avx2": its AVX2 build, as on a CPU without AVX-512),
    else torch's paths."""
    monkeypatch.setenv("LLMQL_CPU_KERNELS", kernels)
    if kernels == "avx2" and not kernel_available("llmql_lora_delta"):
        pytest.skip("no AVX2 CPU or C compiler")
    base, folders = family
    lm = load_model(str(base))
    c = lm.config
    pool = AdapterPool(c, max_loras_per_batch=2)
    names = ["a2", None, "a1", "a2", "a1", "a2", None, "a2", "a1"]
    adapters = [None if n is None else pool.get(str(folders[n])) for n in names]
    # NOTE: the CPU paths: one matmul per long segment (a1), a1's short rows in the padded
    # grid, a2's short rows (HEAVY_SLOT of them) gathered apart
    lengths = [6, 7, LONG_SEGMENT + 3, 3, LONG_SEGMENT, HEAVY_SLOT - 13, 2, 4, 3]
    slots = pool.activate(adapters)
    plan = LoraBatch.build(pool, lengths, slots)
    assert plan.long and plan.grid is not None and [s for s, _ in plan.gathered] == [slots[0]]
    assert (plan.c_rows is not None) == kernel_available("llmql_lora_delta")
    seqs = [prompt(n, seed=10 + i) for i, n in enumerate(lengths)]
    kv = KVPool(128, c.num_layers, c.num_kv_heads, c.head_dim)
    logits = _forward(lm, pool, kv, seqs, adapters).split([len(s) for s in seqs])
    for n, s, got in zip(names, seqs, logits):
        with torch.no_grad():
            want = peft_model(base, folders.get(n))(torch.tensor([s])).logits[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        plain = peft_model(base, None)(torch.tensor([seqs[0]])).logits[0]
    assert (logits[0] - plain).abs().max() > 0.1  # NOTE: the adapter changes the logits


def test_radix_cache_is_keyed_by_adapter(llama) -> None:
    base, folders = llama
    engine = _engine(base)
    p = prompt(24, seed=3)
    a1 = str(folders["a1"])
    first = engine.generate([GenerationRequest(p, max_tokens=4)], progress=False)[0]
    other = engine.generate([GenerationRequest(p, max_tokens=4, adapter=a1)], progress=False)[0]
    again = engine.generate([GenerationRequest(p, max_tokens=4, adapter=a1)], progress=False)[0]
    assert first.cached_tokens == 0 and other.cached_tokens == 0  # NOTE: base K/V not reused
    assert again.cached_tokens > 0 and again.text == other.text
    a2 = GenerationRequest(p, max_tokens=4, adapter=str(folders["a2"]))
    assert engine.generate([a2], progress=False)[0].cached_tokens == 0
    fresh = _engine(base, prefix_cache=False)
    assert fresh.generate([GenerationRequest(p, max_tokens=4, adapter=a1)],
                          progress=False)[0].text == other.text


def test_admission_defers_shared_prefixes_only_under_one_adapter(llama) -> None:
    """In one step, a request whose prefix another admitted request computes waits for the
    cache only if both use the same adapter (K/V never crosses adapters)."""
    base, folders = llama
    pool = AdapterPool(load_model(str(base)).config)
    a1, a2 = pool.get(str(folders["a1"])), pool.get(str(folders["a2"]))
    kv_pool = KVPool(512, num_layers=1, num_kv_heads=1, head_dim=2)
    admitter = PrefillAdmitter(CacheManager(kv_pool, create_prefix_cache("radix", kv_pool)),
                               create_policy("fcfs"), chunk_size=64, max_running=8)
    p = prompt(40, seed=7)
    reqs = [Req(i, list(p), GenerationRequest(p, max_tokens=2), 2) for i in range(4)]
    for req, adapter in zip(reqs, [a1, a2, None, a1]):
        req.extra["lora"] = adapter
    picked = admitter.admit(deque(reqs), [], budget=1024)
    assert [r.rid for r, _ in picked] == [0, 1, 2]  # NOTE: the second a1 request waits


def test_adapter_by_name_from_settings(llama) -> None:
    base, folders = llama
    engine = _engine(base)
    p = prompt(7, seed=5)
    with override(adapters=folders["a1"].parent):
        by_name = engine.generate([GenerationRequest(p, max_tokens=4, adapter="a1")], progress=False)
    by_path = engine.generate([GenerationRequest(p, max_tokens=4, adapter=str(folders["a1"]))],
                              progress=False)
    assert by_name[0].error is None and by_name[0].text == by_path[0].text


def test_pool_lru_never_evicts_what_the_batch_uses(llama, tmp_path) -> None:
    base, folders = llama
    lm = load_model(str(base))
    third = _scaled(folders["a1"], tmp_path / "a3", 2.0)
    pool = AdapterPool(lm.config, max_loras_per_batch=2, max_loaded_loras=2)
    a1, a2 = pool.get(str(folders["a1"])), pool.get(str(folders["a2"]))
    assert pool.activate([a1, None, a2, a1]) == [1, 0, 2, 1]
    with pytest.raises(AdapterError, match="max_loras_per_batch"):
        pool.activate([a1, a2, pool.get(str(third), busy={a1.fingerprint, a2.fingerprint})])
    assert len(pool.host) == 3  # NOTE: all three in use: none evicted
    a3 = pool.get(str(third))
    assert pool.activate([a2, a3]) == [2, 1]  # NOTE: a1 was least recently used
    assert a1.fingerprint not in pool.slots and a1.fingerprint not in pool.host
    assert len(pool.host) == 2 and pool.activate([a3, a2]) == [1, 2]


def _bad(folder: Path, tmp: Path, name: str, **changes) -> str:
    out = shutil.copytree(folder, tmp / name)
    meta = json.loads((out / "adapter_config.json").read_text())
    meta.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(meta))
    return str(out)


def test_bad_adapters_fail_before_any_model_call(llama, tmp_path, tiny_model_dir) -> None:
    base, folders = llama
    a1 = folders["a1"]
    other = "qwen3" if "llama" not in str(base) else "gemma3"
    foreign = make_adapter(tiny_model_dir(other), tmp_path / "foreign", 4, 8, False, ALL, seed=9)
    cases = {
        _bad(a1, tmp_path, "dora", use_dora=True): "DoRA",
        _bad(a1, tmp_path, "ia3", peft_type="IA3"): "IA3",
        _bad(a1, tmp_path, "prompt", peft_type="PROMPT_TUNING"): "PROMPT_TUNING",
        _bad(a1, tmp_path, "embed", target_modules=["embed_tokens"]): "embed_tokens",
        _bad(a1, tmp_path, "named", base_model_name_or_path="meta-llama/Llama-3.2-1B"
             if "llama" not in str(base) else "google/gemma-3-270m"): "trained for",
        _bad(foreign, tmp_path, "shapes", base_model_name_or_path="org/base"): "another base model",
        str(tmp_path / "missing"): "not found",
    }
    engine = _engine(base)
    computed = engine.stats().computed_tokens
    results = engine.generate([GenerationRequest(prompt(5, 1), adapter=a) for a in cases],
                              progress=False)
    for (adapter, message), result in zip(cases.items(), results):
        assert result.finish_reason == "error" and message in (result.error or ""), result.error
        with pytest.raises(AdapterError, match=message):
            engine.check_adapter(adapter)
    assert engine.stats().computed_tokens == computed  # NOTE: no forward ran


def _sql_con(base: Path):
    engine = _engine(base)
    con = llmql.connect(engine=engine, max_tokens=4, calibrate=False)
    con.execute("CREATE TABLE t AS SELECT * FROM (VALUES ('w5 w6 w7'), ('w8 w9'), ('w10 w11 w12'))"
                " AS v(x)")
    return con, engine


def _scaled(folder: Path, out: Path, factor: float) -> Path:
    """A copy of adapter `folder` with its weights times `factor` (a stronger adapter)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    w = out / "adapter_model.safetensors"
    save_file({k: v * factor for k, v in load_file(str(w)).items()}, str(w))
    return out


def test_sql_two_adapters_in_one_query_and_cache_keys(llama, tmp_path) -> None:
    base, folders = llama
    con, engine = _sql_con(base)
    names = tmp_path / "adapters"
    _scaled(folders["a1"], names / "a1", 3.0)
    _scaled(folders["a2"], names / "a2", 3.0)
    sql = ("SELECT x, llm('w4', x, adapter := 'a1') AS a, llm('w4', x, adapter := 'a2') AS b, "
           "llm('w4', x) AS c FROM t ORDER BY x")
    with override(cache_dir=tmp_path, adapters=names):
        frame = con.sql(sql).df()
        report = con.last_report()
        assert sorted(c.adapter or "-" for c in report.calls) == ["-", "a1", "a2"]
        assert report.total.cache_hits == 0 and report.total.llm_calls == 9
        assert (frame["a"] != frame["c"]).any() and (frame["b"] != frame["c"]).any()
        assert "adapter=a1" in explain(sql) and "adapter=a2" in explain(sql)
        base_only = con.sql("SELECT x, llm('w4', x) AS c FROM t ORDER BY x").df()
        assert con.last_report().total.cache_hits == 3 and base_only["c"].equals(frame["c"])
        again = con.sql(sql).df()
        assert con.last_report().total.llm_calls == 0 and again.equals(frame)
        from llmql.connectors.pandas import register_accessor

        register_accessor()
        df = frame[["x"]].copy()
        mapped = df.llm.map("w4", "x", engine=engine, adapter="a2", result_cache=False,
                            max_tokens=4, calibrate=False)
        assert mapped["llm"].tolist() == frame["b"].tolist()  # NOTE: the accessor's adapter=
        # NOTE: new files under the same name: the adapter's cached answers are not reused
        shutil.rmtree(names / "a1")
        _scaled(folders["a1"], names / "a1", 2.0)
        con.sql(sql).df()
        calls = {c.adapter: c.report for c in con.last_report().calls}
        assert calls["a1"].llm_calls == 3 and calls["a2"].llm_calls == 0
    con.close()


def test_sql_bad_adapter_fails_before_any_model_call(llama, tmp_path) -> None:
    base, folders = llama
    con, engine = _sql_con(base)
    bad = _bad(folders["a1"], tmp_path, "dora", use_dora=True)
    with override(cache_dir=tmp_path):
        for adapter, message in ((bad, "DoRA"), (str(tmp_path / "nope"), "not found")):
            with pytest.raises(Exception, match=message):
                con.sql(f"SELECT llm('w4', x, adapter := '{adapter}') FROM t").df()
    assert engine.stats().computed_tokens == 0
    con.close()
