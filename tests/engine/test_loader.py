"""GGUF loading: tiny GGUF files written with llama.cpp's conventions, read by us and by
transformers; the dequantised-weight cache; and the real default model against transformers."""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llmql.engine.context import ForwardBatch, forward_context
from llmql.engine.kvcache.pool import KVPool
from llmql.engine.models import LoadedModel, load_model
from llmql.engine.weights.gguf import GGUFFile

VOCAB = 96
_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "post_feedforward_layernorm": "post_ffw_norm",
}


def _gguf_name(name: str, gemma: bool) -> str:
    if name in _NAMES:
        return _NAMES[name]
    _, _, layer, rest = name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    if module == "post_attention_layernorm":
        kind = "post_attention_norm" if gemma else "ffn_norm"
    else:
        kind = "ffn_norm" if module == "pre_feedforward_layernorm" else _NAMES[module]
    return f"blk.{layer}.{kind}.{suffix}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Llama Q/K rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf: Llama 3.1 RoPE scaling as per-frequency divisors."""
    import math

    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    old, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(rope["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(hf_model, path: Path, arch: str, quantize: bool = False,
               qtype: int = gguf.GGMLQuantizationType.Q8_0) -> Path:
    """Write `hf_model` as llama.cpp would (Gemma norms + 1, Llama Q/K permuted); with
    `quantize`, 2-D tensors as `qtype`."""
    cfg, gemma = hf_model.config, arch == "gemma3"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(1e6 if gemma else cfg.rope_parameters["rope_theta"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if gemma:
        w.add_sliding_window(cfg.sliding_window)
    tokens = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"\u2581w{i}" for i in range(4, VOCAB)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 4 + [-float(i) for i in range(4, VOCAB)])
    w.add_token_types([3, 3, 3, 2] + [1] * (VOCAB - 4))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(rope, head_dim))
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.float().numpy().copy()
        if gemma and name.endswith("norm.weight"):
            data = data + 1
        if arch == "llama" and ("q_proj.weight" in name or "k_proj.weight" in name):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            data = _permute(data, heads)
        if quantize and data.ndim == 2:
            w.add_tensor(_gguf_name(name, gemma), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(_gguf_name(name, gemma), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def last_logits(lm: LoadedModel, ids: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of every position of one sequence, through the paged pool."""
    c = lm.config
    pool = KVPool(len(ids), c.num_layers, c.num_kv_heads, c.head_dim, dtype=dtype)
    slots = pool.alloc(len(ids))
    n = len(ids)
    batch = ForwardBatch(
        positions=torch.arange(n), qo_indptr=torch.tensor([0, n]), kv_indptr=torch.tensor([0, n]),
        kv_indices=slots, out_cache_loc=slots, kv_pool=pool,
    )
    with torch.no_grad(), forward_context(batch):
        return lm.model.compute_logits(lm.model(torch.tensor(ids), batch.positions))


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module", params=["llama", "llama3", "qwen2", "qwen3"])
def tiny_family_gguf(request, tiny_model_dir, tiny_hf_model, tmp_path_factory):
    """(transformers model, GGUF of it) for a family without Gemma's conventions."""
    hf = tiny_hf_model(tiny_model_dir(request.param))
    out = tmp_path_factory.mktemp("gguf") / f"tiny-{request.param}.gguf"
    return hf, write_gguf(hf, out, request.param.replace("llama3", "llama"))


@pytest.fixture(scope="module")
def tiny_gemma_gguf(tmp_path_factory):
    """A 6-layer Gemma 3 (5 sliding layers, window 4) with head_dim 256, as transformers'
    GGUF reader assumes query_pre_attn_scalar = 256; weights quantised to Q8_0."""
    import transformers

    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=4,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else 2 / p.shape[-1] ** 0.5)
    out = tmp_path_factory.mktemp("gguf")
    return write_gguf(model, out / "tiny-gemma3.gguf", "gemma3", quantize=True)


def test_family_gguf_matches_source_model(tiny_family_gguf, tmp_path) -> None:
    """Llama's Q/K permutation undone; Qwen2 q/k/v biases and Qwen3 q/k norms mapped."""
    hf, path = tiny_family_gguf
    lm = load_model(str(path), cache_dir=tmp_path)
    assert lm.config.architecture == hf.config.architectures[0]
    assert lm.config.tie_word_embeddings == hf.config.tie_word_embeddings
    ids = [1, 5, 17, 33, 60, 8, 91, 44, 70, 12, 55, 23, 81, 9, 30, 66, 41, 19, 87, 50]
    torch.testing.assert_close(last_logits(lm, ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    assert lm.tokenizer.encode("w5 w17", add_bos=True)[0] == 1


def test_bfloat16_load_runs(tiny_family_gguf, tmp_path) -> None:
    hf, path = tiny_family_gguf
    lm = load_model(str(path), cache_dir=tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    ids = [1, 5, 17, 33, 60, 8]
    logits = last_logits(lm, ids, dtype=torch.bfloat16)
    assert logits.dtype == torch.float32
    expected = hf_logits(hf, ids)
    assert (logits - expected).abs().max() < 0.1 * expected.abs().max()


def test_gemma_gguf_matches_transformers_reading(tiny_gemma_gguf, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    lm = load_model(str(tiny_gemma_gguf), cache_dir=tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(
        tiny_gemma_gguf.parent, gguf_file=tiny_gemma_gguf.name, dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    assert lm.config.layer_types == tuple(hf.config.layer_types)
    ids = [1, *range(10, 22)]  # longer than the window of 4
    expected = hf_logits(hf, ids)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(last_logits(lm, ids), expected, atol=1e-4, rtol=1e-4)


def test_second_load_reuses_cache(tiny_gemma_gguf, tmp_path, monkeypatch) -> None:
    first = load_model(str(tiny_gemma_gguf), cache_dir=tmp_path)
    (entry,) = (tmp_path / "models").iterdir()
    assert entry.name.startswith("tiny-gemma3-") and (entry / "model.safetensors").exists()

    def no_dequantise(*args, **kwargs):
        raise AssertionError("the cached load dequantised again")

    monkeypatch.setattr(GGUFFile, "__init__", no_dequantise)
    second = load_model(str(tiny_gemma_gguf), cache_dir=tmp_path)
    assert second.config == first.config
    ids = [1, 4, 9, 16, 25]
    torch.testing.assert_close(last_logits(second, ids), last_logits(first, ids))


def test_default_model_loads_from_cache(default_model: LoadedModel) -> None:
    start = time.perf_counter()
    again = load_model()
    elapsed = time.perf_counter() - start
    assert again.name == "gemma-3-270m-q4_k_m" and again.config == default_model.config
    assert default_model.config.architecture == "Gemma3ForCausalLM"
    assert default_model.config.layer_types.count("full_attention") == 3
    assert elapsed < 30, f"cached load took {elapsed:.1f}s"


# NOTE: not `slow`: ~25 s once `hf_default` is cached (its first run converts the GGUF with
# transformers, ~2.5 min, and saves the result under the cache dir).
def test_default_model_matches_transformers(default_model: LoadedModel, hf_default) -> None:
    ids = default_model.tokenizer.encode("SQL is a language for querying tables. The capital of France")
    ours = last_logits(default_model, ids)
    expected = hf_logits(hf_default.model, ids)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


def test_reader_agrees_with_gguf_package(tiny_gemma_gguf) -> None:
    """Our fast header parser against `gguf.GGUFReader` (metadata and dequantised tensors)."""
    from llmql.engine.weights.gguf_reader import read_gguf

    meta, tensors = read_gguf(tiny_gemma_gguf)
    ref = gguf.GGUFReader(str(tiny_gemma_gguf))
    expected = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert meta == expected
    assert [t.name for t in tensors] == [t.name for t in ref.tensors]
    for ours, theirs in zip(tensors, ref.tensors):
        got = gguf.quants.dequantize(ours.data, ours.ggml_type).reshape(ours.shape)
        assert np.array_equal(got, gguf.quants.dequantize(theirs.data, theirs.tensor_type))
