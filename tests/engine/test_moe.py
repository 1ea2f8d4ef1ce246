"""MoE families (Mixtral, Qwen3-MoE) against transformers on tiny random models, resident and
with expert offload (a cache of 2 experts per layer), plus MoE GGUF files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmql.engine.models import load_model
from tests.engine.test_models import forward, hf_logits, new_pool, sequence

ATOL = 1e-4
MOE_FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe"]


def _greedy(lm, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decode through the paged pool: (new tokens, logits of every step stacked)."""
    pool = new_pool(lm)
    logits, (slots,) = forward(lm, pool, [(ids, torch.empty(0, dtype=torch.int64))])
    rows, out = [logits[-1]], []
    for _ in range(steps):
        out.append(int(rows[-1].argmax()))
        step, (slots,) = forward(lm, pool, [([out[-1]], slots)])
        rows.append(step[-1])
    return out, torch.stack(rows)


def _hf_greedy(hf, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    seq, rows = list(ids), []
    for _ in range(steps + 1):
        rows.append(hf_logits(hf, seq)[-1])
        seq.append(int(rows[-1].argmax()))
    return seq[len(ids):-1], torch.stack(rows)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_greedy_matches_transformers(family, tiny_model_dir, tiny_hf_model) -> None:
    directory = tiny_model_dir(family)
    lm, hf = load_model(str(directory)), tiny_hf_model(directory)
    assert lm.config.num_experts == 8 and lm.config.norm_topk_prob == (family == "mixtral")
    assert (lm.config.shared_expert_intermediate_size == 40) == (family == "qwen2_moe")
    ids = sequence(9, seed=3)
    tokens, logits = _greedy(lm, ids, steps=6)
    want_tokens, want_logits = _hf_greedy(hf, ids, steps=6)
    assert want_logits.abs().max() > 0.5
    assert tokens == want_tokens
    torch.testing.assert_close(logits, want_logits, atol=ATOL, rtol=0)


def _expert_bytes(lm) -> int:
    c = lm.config
    return 3 * c.hidden_size * c.moe_intermediate_size * 4


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_offload_matches_resident(family, tiny_model_dir) -> None:
    """Unbounded cache and a cache of 2 experts per layer: the same tokens and logits."""
    directory = tiny_model_dir(family)
    resident = load_model(str(directory))
    ids = sequence(9, seed=4)
    want_tokens, want_logits = _greedy(resident, ids, steps=6)
    per_layer = 2 * _expert_bytes(resident) * resident.config.num_layers / 2**30
    for gib in (1.0, per_layer):
        lm = load_model(str(directory), expert_cache_gib=gib)
        tokens, logits = _greedy(lm, ids, steps=6)
        assert tokens == want_tokens
        torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
        stats = lm.model.expert_offload.stats()
        assert stats["resident_bytes"] <= stats["budget_bytes"]
        assert stats["peak_resident_bytes"] <= stats["budget_bytes"]
        assert stats["misses"] > 0 and stats["bytes_moved"] >= stats["misses"] * _expert_bytes(lm)
        if gib < 1.0:
            assert stats["evictions"] > 0  # NOTE: the small budget really did force eviction
        assert stats["prefetch_predicted"] > 0 and 0.0 <= stats["prefetch_accuracy"] <= 1.0
        lm.model.expert_offload.cache.close()


def _write_moe_gguf(hf, path, arch: str):
    """`hf` as llama.cpp writes it: stacked ffn_*_exps experts, ffn_gate_inp routers."""
    import gguf

    from tests.engine.test_loader import _gguf_name, _permute

    cfg = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    for add, value in [(w.add_block_count, cfg.num_hidden_layers), (w.add_embedding_length, cfg.hidden_size),
                       (w.add_context_length, cfg.max_position_embeddings),
                       (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
                       (w.add_layer_norm_rms_eps, cfg.rms_norm_eps),
                       (w.add_rope_freq_base, cfg.rope_parameters["rope_theta"]),
                       (w.add_expert_count, cfg.num_local_experts if arch == "llama" else cfg.num_experts),
                       (w.add_expert_used_count, cfg.num_experts_per_tok)]:
        add(value)
    if arch == "qwen3moe":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<bos>", "<eos>", "<unk>"] + [f"\u2581w{i}" for i in range(4, 96)])
    w.add_token_scores([0.0] * 4 + [-float(i) for i in range(4, 96)])
    w.add_token_types([3, 3, 3, 2] + [1] * 92)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, tensor in hf.state_dict().items():
        data = tensor.float().numpy().copy()
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if name.endswith("mlp.gate.weight"):
            w.add_tensor(f"blk.{layer}.ffn_gate_inp.weight", data)
        elif name.endswith("experts.gate_up_proj"):
            gate, up = np.split(data, 2, axis=1)
            w.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", np.ascontiguousarray(gate))
            w.add_tensor(f"blk.{layer}.ffn_up_exps.weight", np.ascontiguousarray(up))
        elif name.endswith("experts.down_proj"):
            w.add_tensor(f"blk.{layer}.ffn_down_exps.weight", data)
        else:
            if arch == "llama" and ("q_proj.weight" in name or "k_proj.weight" in name):
                data = _permute(data, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
            w.add_tensor(_gguf_name(name, False), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family,arch", [("mixtral", "llama"), ("qwen3_moe", "qwen3moe")])
def test_gguf_stacked_experts_match_transformers(family, arch, tiny_model_dir, tiny_hf_model,
                                                 tmp_path) -> None:
    """A GGUF of stacked experts loads (resident and offloaded) and matches transformers."""
    directory = tiny_model_dir(family)
    hf = tiny_hf_model(directory)
    path = _write_moe_gguf(hf, tmp_path / f"tiny-{family}.gguf", arch)
    for module in hf.modules():
        if hasattr(module, "norm_topk_prob"):  # NOTE: llama.cpp always renormalises top-k
            module.norm_topk_prob = True
    ids = sequence(8, seed=5)
    want_tokens, want_logits = _hf_greedy(hf, ids, steps=4)
    for gib in (None, 2 * 3 * 3 * 64 * 32 * 4 / 2**30):
        lm = load_model(str(path), cache_dir=tmp_path, expert_cache_gib=gib)
        assert lm.config.architecture == hf.config.architectures[0]
        tokens, logits = _greedy(lm, ids, steps=4)
        assert tokens == want_tokens
        torch.testing.assert_close(logits, want_logits, atol=ATOL, rtol=ATOL)


def test_engine_reports_expert_cache_stats(tiny_model_dir) -> None:
    """The embedded engine on an offloaded MoE: same text as resident, counters in stats()."""
    from llmql.engine.engine import load
    from llmql.engine.types import GenerationRequest

    directory = str(tiny_model_dir("mixtral"))
    requests = [GenerationRequest(f"w{5 + i} w17 w33 w60", max_tokens=8) for i in range(3)]
    resident = load(directory, kv_tokens=256, device="cpu")
    offloaded = load(directory, kv_tokens=256, device="cpu", expert_cache_gib=0.0003)
    want = [r.text for r in resident.generate(requests, progress=False)]
    assert [r.text for r in offloaded.generate(requests, progress=False)] == want
    assert "experts" not in resident.stats().extra
    experts = offloaded.stats().extra["experts"]
    assert experts["hits"] + experts["misses"] > 0 and experts["bytes_moved"] > 0
    assert experts["peak_resident_bytes"] <= experts["budget_bytes"]


def test_query_report_shows_expert_cache_counters(tiny_model_dir) -> None:
    """`con.last_report()` of a query on an offloaded MoE carries the expert-cache counters of
    its generation (and a dense or fully cached query shows none)."""
    import llmql
    from llmql.engine.engine import load

    engine = load(str(tiny_model_dir("mixtral")), kv_tokens=256, device="cpu", expert_cache_gib=0.0003)
    con = llmql.connect(engine=engine, max_tokens=4, result_cache=False)
    con.execute("CREATE TABLE t AS SELECT 'w' || (i + 5) || ' w17' AS a FROM range(3) r(i)")
    before = engine.stats().extra["experts"]
    con.sql("SELECT llm('w9 w40', a) FROM t").fetchall()
    after = engine.stats().extra["experts"]
    total = con.last_report().total
    assert total.experts["misses"] == after["misses"] - before["misses"] > 0
    assert total.experts["hits"] == after["hits"] - before["hits"]
    assert total.experts["bytes_moved"] == after["bytes_moved"] - before["bytes_moved"] > 0
    assert 0.0 <= total.expert_hit_rate <= 1.0 and total.to_dict()["experts"]["misses"] > 0
    assert "experts:" in str(con.last_report()) and "GiB moved" in str(con.last_report())
    con.sql("SELECT 1").fetchall()
    assert "experts" not in con.last_report().total.to_dict()
    from llmql.cli import _engine_summary

    assert "expert cache:" in _engine_summary(engine) and "GiB moved" in _engine_summary(engine)
