"""Quantized weights: each GGUF type's runtime format against gguf's own dequantisation,
load-time int8/int4 error bounds, and quantized models against their float loads."""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_loader import last_logits, write_gguf

from llmql.engine.layers import quant_linear
from llmql.engine.layers.quant_linear import RESCORE_TOP, QuantParts
from llmql.engine.models import load_model
from llmql.engine.weights.gguf_quant import FileQuantWeight
from llmql.engine.weights.gguf_reader import read_gguf
from llmql.engine.weights.quant import QuantWeight, from_gguf, quantize_int4, quantize_int8
from llmql.kernels.cpu_lib import kernel_available
from llmql.kernels.int8_linear import int8_linear_available, onednn_int8_available

T = gguf.GGMLQuantizationType


def _check_exact(raw: np.ndarray, qtype: int, n: int, k: int) -> QuantWeight:
    """Dequantising our format == gguf's dequantisation; our matmul (as stored, and with
    4-bit values widened to int8 as "auto" runs a small model's linears) ==
    dequantise-then-matmul, at decode and prefill row counts."""
    w = from_gguf(raw, qtype, (n, k))
    assert w is not None
    want = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, qtype)).reshape(n, k))
    torch.testing.assert_close(w.dequantize(), want, atol=0, rtol=0)
    torch.testing.assert_close(w.widened().dequantize(), want, atol=1e-6, rtol=1e-6)
    for weight in (w, w.widened()):
        parts = QuantParts((n, k))
        parts.add(0, weight)
        parts.finalize()
        for m in (1, 5, 40):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            torch.testing.assert_close(parts.matmul(x), x @ want.T, atol=1e-4, rtol=1e-4)
    return w


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0, T.Q8_0])
def test_gguf_written_types_match(qtype) -> None:
    data = np.random.default_rng(0).standard_normal((24, 96)).astype(np.float32)
    _check_exact(gguf.quants.quantize(data, qtype), qtype, 24, 96)


@pytest.fixture(scope="module")
def default_tensors() -> dict[str, object]:
    from llmql.engine.loader import default_gguf
    from llmql.settings import get_settings

    _, tensors = read_gguf(default_gguf(get_settings().cache_dir))
    found: dict[str, object] = {}
    for t in tensors:
        found.setdefault(T(t.ggml_type).name, t)
    return found


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q5_0", "Q8_0"])
def test_default_model_types_match(default_tensors, kind) -> None:
    """K-quants from the default model's file (first 48 rows of its first tensor of a type)."""
    t = default_tensors[kind]
    _check_exact(t.data[:48], t.ggml_type, 48, t.dims[0])


def test_file_weight_reads_rows_as_the_map_holds_them(default_tensors) -> None:
    """`FileQuantWeight` (rows read with preadv, not through the memory map): unsorted,
    repeated and consecutive rows and slices equal the mapped rows' conversion."""
    t = default_tensors["Q8_0"]
    weight = FileQuantWeight(t.data, t.ggml_type, t.dims[0])
    n = t.data.shape[0]
    for index in (torch.tensor([5, 6, 7, n - 1, 5, 0, 8]), torch.arange(10, 40)):
        want = from_gguf(np.asarray(t.data[index.numpy()]), t.ggml_type, (len(index), t.dims[0]))
        torch.testing.assert_close(weight.dequantize(index), want.dequantize(), atol=0, rtol=0)
    torch.testing.assert_close(weight.dequantize(slice(3, 9)), weight.dequantize(torch.arange(3, 9)))
    with pytest.raises(IndexError):
        weight.select_rows(torch.tensor([n]))


def test_q5_k_blocks_match() -> None:
    """Q5_K from random raw blocks (sane float16 d/dmin; every other byte random)."""
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (8, 176), dtype=np.uint8)
    blocks[:, 0:4] = rng.uniform(0.001, 0.05, (8, 2)).astype(np.float16).view(np.uint8)
    w = _check_exact(blocks.reshape(4, -1), T.Q5_K, 4, 512)
    assert (w.bits, w.group) == (8, 32)


def test_load_time_quantization_error_bounds() -> None:
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    q8 = quantize_int8(w)
    bound8 = w.abs().amax(dim=1, keepdim=True) / 254 + 1e-6
    assert q8.qweight.dtype == torch.int8 and ((q8.dequantize() - w).abs() <= bound8).all()
    q4 = quantize_int4(w, group=64)
    g = w.reshape(48, 4, 64)
    bound4 = ((g.amax(-1) - g.amin(-1)) / 30 + 1e-6).repeat_interleave(64, dim=1)
    assert q4.group == 64 and q4.qweight.shape == (48, 128)
    assert ((q4.dequantize() - w).abs() <= bound4).all()
    assert q4.nbytes < w.nbytes / 4


def _logits(lm) -> torch.Tensor:
    return last_logits(lm, [1, 5, 17, 33, 60, 8, 91, 44, 70, 12, 55, 23])


@pytest.mark.parametrize("mode,atol,cosine", [("int8", 0.05, 0.998), ("int4", 0.5, 0.9)])
def test_tiny_model_quantized_at_load(tiny_model_dir, mode, atol, cosine) -> None:
    """A tiny random Llama quantized at load vs its float version (its logits are near-tied,
    so per-position cosine similarity is the measure, not top-1 agreement). On x86 CPUs the
    matmuls run on the int8 GEMM (per-channel int8 weights, compensated int8 activations)."""
    path = tiny_model_dir("llama")
    ref = _logits(load_model(str(path)))
    lm = load_model(str(path), quantization=mode)
    assert lm.model.model.layers[0].mlp.down_proj.quant is not None
    assert lm.model.lm_head.quant is not None
    got = _logits(lm)
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= atol * scale
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() >= cosine


@pytest.mark.parametrize("family,qtype", [("llama", T.Q4_0), ("gemma3", T.Q8_0)])
def test_quantized_gguf_matches_float_load(tiny_model_dir, tiny_hf_model, tmp_path, monkeypatch,
                                           family, qtype) -> None:
    """"int8" keeps a GGUF quantized (Llama's Q/K row permutation undone on quantized rows) and,
    on the exact group-wise path, gives the float load's logits; it writes no dequantised
    weights. "auto" on a model this small takes the float path."""
    monkeypatch.setenv("LLMQL_INT8_GEMM", "0")
    hf = tiny_hf_model(tiny_model_dir(family))
    path = write_gguf(hf, tmp_path / f"{family}.gguf", family, quantize=True, qtype=qtype)
    quant = load_model(str(path), quantization="int8", cache_dir=tmp_path / "c1")
    assert not list((tmp_path / "c1").rglob("*.safetensors"))
    assert quant.model.model.layers[0].self_attn.qkv_proj.weight.is_meta
    none = load_model(str(path), quantization="none", cache_dir=tmp_path / "c2")
    torch.testing.assert_close(_logits(quant), _logits(none), atol=1e-4, rtol=1e-4)
    auto = load_model(str(path), quantization="auto", cache_dir=tmp_path / "c3")
    assert list((tmp_path / "c3").rglob("*.safetensors"))  # NOTE: float32 fits: the float path
    assert not auto.model.model.layers[0].self_attn.qkv_proj.weight.is_meta


@pytest.mark.skipif(not int8_linear_available(), reason="no FBGEMM int8 linear on this CPU")
@pytest.mark.parametrize("family,qtype", [("llama", T.Q4_0), ("gemma3", T.Q8_0)])
def test_int8_gemm_path_near_exact(tiny_model_dir, tiny_hf_model, tmp_path, monkeypatch, family, qtype) -> None:
    """On the int8 GEMM (the CPU default for quantized weights) a GGUF's logits stay near the
    exact path's, and the LM head's top tokens per row carry their exact logits."""
    hf = tiny_hf_model(tiny_model_dir(family))
    path = write_gguf(hf, tmp_path / f"{family}.gguf", family, quantize=True, qtype=qtype)
    monkeypatch.setenv("LLMQL_INT8_GEMM", "0")
    exact = load_model(str(path), quantization="int8", cache_dir=tmp_path / "c1")
    monkeypatch.setenv("LLMQL_INT8_GEMM", "1")
    fast = load_model(str(path), quantization="int8", cache_dir=tmp_path / "c1")
    qkv = fast.model.model.layers[0].self_attn.qkv_proj.quant
    assert qkv.int8 is not None and not qkv.parts  # the group-wise copy is dropped
    assert fast.model.lm_head.int8 is not None and fast.model.lm_head.quant.parts  # head keeps both
    ref, got = _logits(exact), _logits(fast)
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() >= 0.99
    hidden = torch.randn(3, fast.config.hidden_size, generator=torch.Generator().manual_seed(0))
    logits = fast.model.compute_logits(hidden)
    top = fast.model.lm_head.int8.matmul(hidden).topk(RESCORE_TOP, dim=-1).indices  # re-scored
    exact_top = torch.stack([exact.model.compute_logits(hidden[i:i + 1], top[i])[0] for i in range(3)])
    torch.testing.assert_close(logits.gather(-1, top), exact_top, atol=1e-4, rtol=1e-4)
    assert logits.argmax(-1).tolist() == exact.model.compute_logits(hidden).argmax(-1).tolist()


@pytest.mark.skipif(not int8_linear_available(), reason="no FBGEMM int8 linear on this CPU")
def test_auto_grouped_layers_int8_head_embedding_in_file(tiny_model_dir, tiny_hf_model, tmp_path,
                                                          monkeypatch) -> None:
    """"auto" on a CPU with the int8 GEMM, a model whose float32 linears fit: the linears
    weight-only group-wise (int8 values: on the C kernel where it runs, else
    dequantised per call), the LM head on int8 with its top tokens re-scored exactly,
    the token embedding read from the GGUF file; the greedy token and top logits are exact."""
    hf = tiny_hf_model(tiny_model_dir("gemma3"))
    path = write_gguf(hf, tmp_path / "gemma3.gguf", "gemma3", quantize=True, qtype=T.Q8_0)
    monkeypatch.setenv("LLMQL_INT8_GEMM", "0")
    exact = load_model(str(path), quantization="int8", cache_dir=tmp_path / "c1")
    monkeypatch.setenv("LLMQL_INT8_GEMM", "1")
    monkeypatch.setenv("LLMQL_CPU_AMX", "0")  # NOTE: FBGEMM's head (AMX: the test below)
    auto = load_model(str(path), quantization="auto", cache_dir=tmp_path / "c2")
    qkv = auto.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.is_meta and qkv.quant.int8 is None and qkv.quant.dtype == torch.float32
    if kernel_available("llmql_grouped_gemm"):  # NOTE: the C kernel's packed int8 blocks
        assert qkv.quant.packed and not qkv.quant.parts
        assert all(p.q.dtype == torch.int8 for _, p in qkv.quant.packed)
    else:
        assert qkv.quant.parts and all(part.bits == 8 for _, part in qkv.quant.parts)
    assert auto.model.lm_head.int8 is not None
    assert isinstance(auto.model.model.embed_tokens.quant.parts[0][1], FileQuantWeight)
    ids = torch.tensor([1, 5, 17, 33, 60, 8])
    torch.testing.assert_close(auto.model.model.embed_tokens(ids), exact.model.model.embed_tokens(ids))
    ref, got = _logits(exact), _logits(auto)
    assert got.argmax(-1).tolist() == ref.argmax(-1).tolist()
    top = ref.topk(4, dim=-1).indices
    torch.testing.assert_close(got.gather(-1, top), ref.gather(-1, top), atol=1e-4, rtol=1e-4)
    monkeypatch.setenv("LLMQL_CPU_KERNELS", "0")  # NOTE: the torch path: same values, same answer
    torch_path = load_model(str(path), quantization="auto", cache_dir=tmp_path / "c3")
    assert torch_path.model.model.layers[0].self_attn.qkv_proj.quant.parts
    torch.testing.assert_close(_logits(torch_path).gather(-1, top), got.gather(-1, top), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not int8_linear_available(), reason="no FBGEMM int8 linear on this CPU")
def test_avx2_grouped_kernel_same_greedy_tokens(tiny_model_dir, tiny_hf_model, tmp_path, monkeypatch) -> None:
    """`LLMQL_CPU_KERNELS=avx2` (a CPU with AVX2 but not AVX-512): "auto" runs a Q4_0 model's
    linears on the AVX2 build of the grouped kernel (4-bit values packed as nibbles), its
    norms, activations and attention on the AVX2 builds of theirs, and the engine's greedy tokens equal those of the torch path
    (`LLMQL_CPU_KERNELS=0`: the values widened, dequantised per call)."""
    from llmql.engine.engine import load
    from llmql.engine.types import GenerationRequest

    hf = tiny_hf_model(tiny_model_dir("llama"))
    path = write_gguf(hf, tmp_path / "llama.gguf", "llama", quantize=True, qtype=T.Q4_0)
    monkeypatch.setenv("LLMQL_INT8_GEMM", "1")
    answers = {}
    for kernels in ("0", "avx2"):
        monkeypatch.setenv("LLMQL_CPU_KERNELS", kernels)
        if kernels == "avx2" and not kernel_available("llmql_grouped_gemm"):
            pytest.skip("no AVX2 CPU or C compiler")
        engine = load(str(path), quantization="auto", kv_tokens=512)
        down = engine.lm.model.model.layers[0].mlp.down_proj.quant
        assert [p.bits for _, p in down.packed] == ([4] if kernels == "avx2" else [])
        reqs = [GenerationRequest(p, max_tokens=8) for p in ([1, 7, 8, 9], [1, 70, 3], [1, 5, 5, 60, 2])]
        answers[kernels] = [(r.text, r.output_tokens) for r in engine.generate(reqs, progress=False)]
        engine.close()
    assert sum(n for _, n in answers["0"]) >= 12 and all(text for text, _ in answers["0"])
    assert answers["avx2"] == answers["0"]


@pytest.mark.skipif(not (int8_linear_available() and onednn_int8_available()),
                    reason="no FBGEMM or no oneDNN int8 linear on this CPU")
def test_auto_on_amx_onednn_head_and_opt_in_bfloat16_tiles(tiny_model_dir, tiny_hf_model, tmp_path,
                                                           monkeypatch) -> None:
    """"auto" where the CPU has AMX (`LLMQL_CPU_AMX=1` forces it, so this runs on any x86
    CPU): the LM head's int8 copy is oneDNN's and its top tokens per row carry the exact
    logits, so the logits of the exact layers stay exact. `LLMQL_CPU_BF16=1` adds bfloat16
    tiles for the linears: logits within bfloat16 rounding. `LLMQL_CPU_AMX=0`: FBGEMM."""
    hf = tiny_hf_model(tiny_model_dir("gemma3"))
    path = write_gguf(hf, tmp_path / "gemma3.gguf", "gemma3", quantize=True, qtype=T.Q8_0)
    monkeypatch.setenv("LLMQL_INT8_GEMM", "0")
    exact = load_model(str(path), quantization="int8", cache_dir=tmp_path / "c1")
    ref = _logits(exact)
    monkeypatch.setenv("LLMQL_INT8_GEMM", "1")
    monkeypatch.setenv("LLMQL_CPU_AMX", "1")
    auto = load_model(str(path), quantization="auto", cache_dir=tmp_path / "c2")
    qkv = auto.model.model.layers[0].self_attn.qkv_proj.quant
    assert qkv.dtype == torch.float32 and auto.model.lm_head.int8.onednn
    got = _logits(auto)
    top = ref.topk(4, dim=-1).indices
    assert got.argmax(-1).tolist() == ref.argmax(-1).tolist()
    torch.testing.assert_close(got.gather(-1, top), ref.gather(-1, top), atol=1e-4, rtol=1e-4)
    hidden = torch.randn(3, auto.config.hidden_size, generator=torch.Generator().manual_seed(0))
    logits = auto.model.compute_logits(hidden)
    best = auto.model.lm_head.int8.matmul(hidden).topk(RESCORE_TOP, dim=-1).indices
    exact_top = torch.stack([exact.model.compute_logits(hidden[i:i + 1], best[i])[0] for i in range(3)])
    torch.testing.assert_close(logits.gather(-1, best), exact_top, atol=1e-4, rtol=1e-4)
    assert logits.argmax(-1).tolist() == exact.model.compute_logits(hidden).argmax(-1).tolist()

    monkeypatch.setenv("LLMQL_CPU_BF16", "1")
    bf16 = load_model(str(path), quantization="auto", cache_dir=tmp_path / "c3")
    assert bf16.model.model.layers[0].self_attn.qkv_proj.quant.dtype == torch.bfloat16
    got = _logits(bf16)
    assert 0 < (got - ref).abs().max() <= 0.05 * ref.abs().max()
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() >= 0.999
    monkeypatch.setenv("LLMQL_CPU_AMX", "0")
    plain = load_model(str(path), quantization="auto", cache_dir=tmp_path / "c4")
    assert plain.model.model.layers[0].self_attn.qkv_proj.quant.dtype == torch.float32
    assert not plain.model.lm_head.int8.onednn


def test_bad_cpu_amx_setting_names_the_variable(monkeypatch) -> None:
    from llmql.engine.quantized import bf16_tiles_wanted
    from llmql.kernels.linear import amx_available

    monkeypatch.setenv("LLMQL_CPU_AMX", "maybe")
    with pytest.raises(ValueError, match="LLMQL_CPU_AMX"):
        amx_available()
    monkeypatch.setenv("LLMQL_CPU_AMX", "1")
    monkeypatch.setenv("LLMQL_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="LLMQL_CPU_BF16"):
        bf16_tiles_wanted()


@pytest.mark.skipif(not int8_linear_available(), reason="no FBGEMM int8 linear on this CPU")
def test_int8_head_top_tokens_without_full_logits(tiny_model_dir, tiny_hf_model, tmp_path, monkeypatch) -> None:
    """Greedy batches on the int8 head take each row's best tokens vocabulary chunk by
    vocabulary chunk (no [T, vocab] logits): the same tokens and exact values as the full
    re-scored logits, and an engine's greedy answers equal those of its full-logits path
    (requests asking for logprobs take that one)."""
    from llmql.engine.engine import load
    from llmql.engine.sampler import TopLogits
    from llmql.engine.types import GenerationRequest

    hf = tiny_hf_model(tiny_model_dir("gemma3"))
    path = write_gguf(hf, tmp_path / "gemma3.gguf", "gemma3", quantize=True, qtype=T.Q8_0)
    monkeypatch.setattr(quant_linear, "PACK_BYTES", 4 * hf.config.hidden_size * 24)  # 24-row chunks
    monkeypatch.setenv("LLMQL_INT8_GEMM", "1")
    auto = load_model(str(path), quantization="auto", cache_dir=tmp_path / "c")
    assert len(auto.model.lm_head.int8.chunks) >= 4
    hidden = torch.randn(5, auto.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 4
    values, ids = auto.model.compute_top_logits(hidden)
    full = auto.model.compute_logits(hidden)
    want = auto.model.lm_head.int8.matmul(hidden).topk(RESCORE_TOP, dim=-1).indices
    assert ids.sort(-1).values.tolist() == want.sort(-1).values.tolist()
    torch.testing.assert_close(values, full.gather(-1, ids))
    assert TopLogits(values, ids).argmax() == full.argmax(-1).tolist()

    answers = {}
    for label, logprobs in (("top", None), ("full", 0)):
        engine = load(str(path), quantization="auto", kv_tokens=512)
        kinds: list[type] = []
        engine.runner.run = _recording(engine.runner.run, kinds)
        reqs = [GenerationRequest(p, max_tokens=6, logprobs=logprobs)
                for p in ([1, 7, 8, 9], [1, 70, 3], [1, 5, 5, 60, 2])]
        answers[label] = [(r.text, r.output_tokens) for r in engine.generate(reqs)]
        assert (TopLogits in kinds) == (label == "top"), kinds
        engine.close()
    assert answers["top"] == answers["full"]


def _recording(run, kinds: list):
    def wrapped(batch):
        out = run(batch)
        kinds.append(type(out))
        return out
    return wrapped


def test_kv_pool_dtype(tiny_model_dir, tiny_hf_model, tmp_path, monkeypatch) -> None:
    """A quantized model on CPU keeps its K/V pool in float16 ("auto", as llama.cpp does);
    float models keep float32; `kv_dtype` / LLMQL_KV_DTYPE choose; a bad name fails before
    any model is read."""
    from llmql.engine.engine import load
    from llmql.engine.types import GenerationRequest
    from llmql.settings import Settings

    hf = tiny_hf_model(tiny_model_dir("gemma3"))
    path = str(write_gguf(hf, tmp_path / "gemma3.gguf", "gemma3", quantize=True, qtype=T.Q8_0))
    monkeypatch.setenv("LLMQL_INT8_GEMM", "1")
    pools = {}
    for label, kw in (("auto", {}), ("f32", {"kv_dtype": "float32"}), ("none", {"quantization": "none"}),
                      ("bf16", {"kv_dtype": torch.bfloat16})):
        engine = load(path, kv_tokens=256, **{"quantization": "int8", **kw})
        pools[label] = engine.pool.k_buffer[0].dtype
        out = engine.generate([GenerationRequest([1, 7, 8, 9], max_tokens=4)])[0]
        assert out.error is None and out.output_tokens == 4
        engine.close()
    assert pools == {"auto": torch.float16, "f32": torch.float32, "none": torch.float32, "bf16": torch.bfloat16}
    assert Settings.from_env({"LLMQL_KV_DTYPE": "BFloat16"}).kv_dtype == "bfloat16"
    with pytest.raises(ValueError, match="LLMQL_KV_DTYPE"):
        Settings.from_env({"LLMQL_KV_DTYPE": "int4"})
    with pytest.raises(ValueError, match="kv_dtype"):
        load(str(tmp_path / "missing.gguf"), kv_dtype="int4")


def test_bad_quantization_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quantization"):
        load_model("default", quantization="int3", cache_dir=tmp_path)


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_lm_head_computes_only_requested_rows(tiny_model_dir, monkeypatch, mode) -> None:
    """`compute_logits(hidden, rows)` (the `choices` path) == the full logits at `rows`."""
    monkeypatch.setenv("LLMQL_INT8_GEMM", "0")
    lm = load_model(str(tiny_model_dir("gemma3")), quantization=mode)
    hidden = torch.randn(3, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([50, 4, 17, 95])
    full = lm.model.compute_logits(hidden)
    torch.testing.assert_close(lm.model.compute_logits(hidden, rows), full[:, rows], atol=1e-5, rtol=1e-5)


_ITEMS = ["a rainy weekend in Lisbon", "the new phone's battery", "our quarterly revenue report",
          "a cat that ignores everyone", "the 1998 World Cup final", "a bowl of cold ramen",
          "the late train to Leeds", "a forgotten password"]
_TASKS = ["Describe {} in one sentence:", "Is {} good news? Answer yes or no, then explain:",
          "Write a short SQL comment about {}:", "Summarize the mood of {}:"]


@pytest.mark.slow
def test_default_model_auto_greedy_parity() -> None:
    """The default model, "auto" (quantized, float16 KV pool) vs "none" (float32): identical
    greedy outputs (16 tokens) on >= 90% of 32 prompts (the weights dequantise exactly; the
    arithmetic differs in summation order and the KV pool's float16 rounding)."""
    from llmql.engine.engine import load
    from llmql.engine.types import GenerationRequest

    prompts = [t.format(i) for t in _TASKS for i in _ITEMS]
    reqs = [GenerationRequest(p, max_tokens=16) for p in prompts]
    texts = {}
    for mode in ("none", "auto"):
        engine = load("default", quantization=mode, kv_tokens=8192)
        texts[mode] = [r.text for r in engine.generate(reqs, progress=False)]
    same = sum(a == b for a, b in zip(texts["none"], texts["auto"]))
    assert same >= 0.9 * len(prompts), (same, texts)


@pytest.mark.skipif(not int8_linear_available(), reason="no FBGEMM int8 linear on this CPU")
def test_int8_head_choices_do_not_depend_on_the_batch(tiny_model_dir, tiny_hf_model, tmp_path,
                                                      monkeypatch) -> None:
    """With the int8 LM head, a `choices` request's answer and choice logprobs are the exact
    head's, alone and beside free-text requests (the runner re-scores choice tokens)."""
    from llmql.engine.engine import load
    from llmql.engine.types import GenerationRequest

    hf = tiny_hf_model(tiny_model_dir("gemma3"))
    path = write_gguf(hf, tmp_path / "gemma3.gguf", "gemma3", quantize=True, qtype=T.Q8_0)
    words = tuple(f"w{i}" for i in range(5, 96, 7))  # 13 choices across the vocabulary
    choice = GenerationRequest([1, 9, 33, 47, 12], max_tokens=1, choices=words)
    batch = [GenerationRequest([1, 7, 8, 9], max_tokens=3), choice, GenerationRequest([1, 70], max_tokens=2)]
    monkeypatch.setenv("LLMQL_INT8_GEMM", "0")
    exact = load(str(path), quantization="int8", kv_tokens=512).generate([choice])[0]
    monkeypatch.setenv("LLMQL_INT8_GEMM", "1")
    alone = load(str(path), quantization="auto", kv_tokens=512).generate([choice])[0]
    engine = load(str(path), quantization="auto", kv_tokens=512, prefix_cache=False)
    assert engine.lm.model.lm_head.int8 is not None
    for got in (alone, engine.generate(batch)[1]):
        assert got.text == exact.text
        assert got.choice_logprobs == pytest.approx(exact.choice_logprobs, abs=1e-4)


def test_cpu_runner_trims_the_heap_every_few_forwards(tiny_model_dir, monkeypatch) -> None:
    """The CPU runner gives freed activations back every `trim_every` forwards (default
    `TRIM_EVERY`, `LLMQL_TRIM_EVERY` overrides, 0 never) and once more when the engine runs
    out of work, rather than a low mmap threshold (maps made every step page-fault afresh)."""
    from llmql.engine import runner as runner_mod
    from llmql.engine.engine import load
    from llmql.engine.types import GenerationRequest

    engine = load(str(tiny_model_dir("llama")), kv_tokens=256)
    trims: list[int] = []
    monkeypatch.setattr(runner_mod, "trim_heap", lambda: trims.append(1))
    assert engine.runner.trim_every == runner_mod.TRIM_EVERY > 0
    engine.generate([GenerationRequest([1, 2, 3 + i], max_tokens=3 * runner_mod.TRIM_EVERY) for i in range(4)])
    runner = engine.runner
    deadline = time.monotonic() + 5
    while runner._trimmed_at != runner._forwards and time.monotonic() < deadline:
        time.sleep(0.01)  # NOTE: the idle trim runs on the engine thread once it has no work
    assert runner._forwards >= runner_mod.TRIM_EVERY
    assert len(trims) == runner._forwards // runner_mod.TRIM_EVERY + (runner._forwards % runner_mod.TRIM_EVERY > 0)
    engine.close()
    monkeypatch.setenv("LLMQL_TRIM_EVERY", "0")
    assert load(str(tiny_model_dir("llama")), kv_tokens=256).runner.trim_every == 0
    monkeypatch.setenv("LLMQL_TRIM_EVERY", "often")
    with pytest.raises(ValueError, match="LLMQL_TRIM_EVERY must be an integer"):
        load(str(tiny_model_dir("llama")), kv_tokens=256)
