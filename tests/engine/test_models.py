"""Our model families against transformers on tiny random models: prefill, decode, prefill on a
cached prefix, and ragged batches, all through the paged KV pool (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from llmql.engine.context import ForwardBatch, forward_context
from llmql.engine.kvcache.pool import KVPool
from llmql.engine.models import LoadedModel, load_model
from llmql.kernels.cpu_lib import kernel_available

ATOL = 1e-4
# NOTE: the keys of conftest.TINY_FAMILIES (conftest modules are not importable here).
FAMILIES = ["gemma3", "llama", "llama3", "mistral", "qwen2", "qwen3"]
VOCAB = 96


def forward(
    lm: LoadedModel,
    pool: KVPool,
    chunks: list[tuple[list[int], torch.Tensor]],
    logits_indices: list[int] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward over several sequences: each chunk is (new token ids, slots of its cached
    prefix). Returns (logits of all rows or of `logits_indices`, each sequence's slots)."""
    ids, positions, out_loc, kv_indices, seq_slots = [], [], [], [], []
    qo, kv = [0], [0]
    for new, prefix in chunks:
        loc = pool.alloc(len(new))
        assert loc is not None
        slots = torch.cat([prefix, loc])
        ids += new
        positions += range(len(prefix), len(slots))
        out_loc.append(loc)
        kv_indices.append(slots)
        seq_slots.append(slots)
        qo.append(qo[-1] + len(new))
        kv.append(kv[-1] + len(slots))
    batch = ForwardBatch(
        positions=torch.tensor(positions), qo_indptr=torch.tensor(qo),
        kv_indptr=torch.tensor(kv), kv_indices=torch.cat(kv_indices),
        out_cache_loc=torch.cat(out_loc), kv_pool=pool,
        is_decode=all(len(new) == 1 for new, _ in chunks),
        logits_indices=None if logits_indices is None else torch.tensor(logits_indices),
    )
    with torch.no_grad(), forward_context(batch):
        hidden = lm.model(torch.tensor(ids), batch.positions)
        return lm.model.compute_logits(hidden), seq_slots


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def new_pool(lm: LoadedModel, slots: int = 128) -> KVPool:
    c = lm.config
    return KVPool(slots, c.num_layers, c.num_kv_heads, c.head_dim)


def sequence(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(4, VOCAB, (length - 1,), generator=gen).tolist()]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tiny_model_dir, tiny_hf_model):
    """(our LoadedModel, transformers model) of one tiny family."""
    directory = tiny_model_dir(request.param)
    return load_model(str(directory)), tiny_hf_model(directory)


def test_prefill_matches_transformers(pair) -> None:
    lm, hf = pair
    ids = sequence(11, seed=1)
    logits, _ = forward(lm, new_pool(lm), [(ids, torch.empty(0, dtype=torch.int64))])
    expected = hf_logits(hf, ids)
    assert logits.shape == (len(ids), lm.config.vocab_size) and logits.dtype == torch.float32
    assert expected.abs().max() > 0.5  # NOTE: the comparison below must not be trivially small
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=1e-4)


def test_decode_step_by_step_matches_transformers(pair) -> None:
    lm, hf = pair
    ids = sequence(10, seed=2)
    pool, slots = new_pool(lm), torch.empty(0, dtype=torch.int64)
    rows = []
    for token in ids:
        logits, (slots,) = forward(lm, pool, [([token], slots)])
        rows.append(logits[0])
    torch.testing.assert_close(torch.stack(rows), hf_logits(hf, ids), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("k", [3, 7])
def test_prefill_on_cached_prefix_matches_transformers(pair, k: int) -> None:
    lm, hf = pair
    ids = sequence(12, seed=3)
    pool = new_pool(lm)
    _, (prefix,) = forward(lm, pool, [(ids[:k], torch.empty(0, dtype=torch.int64))])
    logits, _ = forward(lm, pool, [(ids[k:], prefix)])
    torch.testing.assert_close(logits, hf_logits(hf, ids)[k:], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("kernels", ["0", "avx2"])
def test_other_cpu_paths_match_transformers(pair, kernels, monkeypatch) -> None:
    """With llmql's C kernels off (`LLMQL_CPU_KERNELS=0`: what CPUs without AVX2 or a C
    compiler run) the torch paths give transformers' logits too, and so do the kernels' AVX2
    builds ("avx2": what CPUs without AVX-512 run): a prefill, then a continuation on its
    cached prefix and a decode step."""
    monkeypatch.setenv("LLMQL_CPU_KERNELS", kernels)
    if kernels == "avx2" and not kernel_available("llmql_paged_attention"):
        pytest.skip("no AVX2 CPU or C compiler")
    lm, hf = pair
    ids = sequence(12, seed=7)
    pool, empty = new_pool(lm), torch.empty(0, dtype=torch.int64)
    first, (prefix,) = forward(lm, pool, [(ids[:5], empty)])
    rest, (slots,) = forward(lm, pool, [(ids[5:11], prefix)])
    last, _ = forward(lm, pool, [(ids[11:], slots)])
    torch.testing.assert_close(torch.cat([first, rest, last]), hf_logits(hf, ids), atol=ATOL, rtol=1e-4)


def test_ragged_batch_matches_transformers(pair) -> None:
    lm, hf = pair
    a, b, c = sequence(9, seed=4), sequence(5, seed=5), sequence(8, seed=6)
    pool = new_pool(lm)
    _, (c_prefix,) = forward(lm, pool, [(c[:6], torch.empty(0, dtype=torch.int64))])
    empty = torch.empty(0, dtype=torch.int64)
    logits, _ = forward(lm, pool, [(a, empty), (b, empty), (c[6:], c_prefix)])
    expected = torch.cat([hf_logits(hf, a), hf_logits(hf, b), hf_logits(hf, c)[6:]])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=1e-4)


def test_logits_indices_select_rows(pair) -> None:
    lm, hf = pair
    a, b = sequence(7, seed=7), sequence(4, seed=8)
    empty = torch.empty(0, dtype=torch.int64)
    logits, _ = forward(lm, new_pool(lm), [(a, empty), (b, empty)], logits_indices=[10, 6])
    expected = torch.stack([hf_logits(hf, b)[-1], hf_logits(hf, a)[-1]])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=1e-4)


def test_sliding_window_is_exercised(tiny_model_dir) -> None:
    """The tiny Gemma 3 has window 4 on sliding layers: sequences above prove it is honoured."""
    lm = load_model(str(tiny_model_dir("gemma3")))
    windows = [lm.config.layer_window(i) for i in range(lm.config.num_layers)]
    assert windows == [4, 4, None, 4]
    assert lm.config.layer_rope(0) == (1e4, None) and lm.config.layer_rope(2)[0] == 1e6


def test_unknown_architecture_lists_supported(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}')
    with pytest.raises(ValueError, match=r"GPTNeoXForCausalLM.*Gemma3ForCausalLM.*LlamaForCausalLM"):
        load_model(str(tmp_path))


def test_missing_source_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"not a \.gguf file"):
        load_model(str(tmp_path / "nope.gguf"))


def test_sharded_checkpoint_loads(tiny_model_dir, tiny_hf_model, tmp_path) -> None:
    import shutil

    hf = tiny_hf_model(tiny_model_dir("qwen3"))
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_model(str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir("qwen3") / name, tmp_path / name)
    lm = load_model(str(tmp_path))
    ids = sequence(6, seed=9)
    logits, _ = forward(lm, new_pool(lm), [(ids, torch.empty(0, dtype=torch.int64))])
    torch.testing.assert_close(logits, hf_logits(hf, ids), atol=ATOL, rtol=1e-4)


def test_rotary_tables_shared_within_a_forward() -> None:
    """Inside a forward, layers with the same tables share one cos/sin computation for the
    batch's positions; other positions, and calls outside a forward, compute their own; all
    equal a fresh computation."""
    from llmql.engine.layers.rotary import RotaryEmbedding

    a, b, other = RotaryEmbedding(8, 10000.0), RotaryEmbedding(8, 10000.0), RotaryEmbedding(8, 500.0)
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    pos = torch.tensor([0, 5, 9])
    want = RotaryEmbedding(8, 10000.0)(pos.clone(), q, k)
    empty = torch.zeros(1, dtype=torch.int64)
    batch = ForwardBatch(positions=pos, qo_indptr=empty, kv_indptr=empty, kv_indices=empty,
                         out_cache_loc=empty, kv_pool=None)  # type: ignore[arg-type]
    with forward_context(batch):
        for got, ref in zip(a(pos, q, k), want):
            torch.testing.assert_close(got, ref)
        assert b.tables(pos, q.dtype)[0] is a.tables(pos, q.dtype)[0]
        assert other.tables(pos, q.dtype)[0] is not a.tables(pos, q.dtype)[0]
        assert a.tables(pos.clone(), q.dtype)[0] is not a.tables(pos, q.dtype)[0]
    assert a.tables(pos, q.dtype)[0] is not a.tables(pos, q.dtype)[0]
    for got, ref in zip(a(pos, q, k), want):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_equals_the_formula(offset) -> None:
    """RMSNorm equals HF's formula (Llama: w * x / rms, Gemma:
    (1 + w) * x / rms) for decode- and prefill-sized batches and 3-D (per-head) inputs."""
    from llmql.engine.layers.norm import RMSNorm

    norm = RMSNorm(64, eps=1e-6, offset=offset)
    norm.weight.data = torch.randn(64, generator=torch.Generator().manual_seed(0))
    for shape in [(60, 64), (512, 64), (7, 4, 64)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))) * 3
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + norm.weight)
        torch.testing.assert_close(norm(x), want, atol=1e-5, rtol=1e-5)
