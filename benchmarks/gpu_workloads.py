"""Throughput and roofline sections of `gpu_check.py` (see its docstring).

A Llama-3-8B-shaped model with random bf16 weights is built straight on the device, for
our engine and for transformers; prompts are random token ids, EOS is ignored (our
tokenizer gets no EOS ids, transformers' generation config none), output lengths are fixed.
`--dry-run` swaps in a tiny model and tiny batches on CPU (float32).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
# (groups, prompts per group, shared prefix, own suffix, new tokens): a SQL-shaped batch.
PREFIX_HEAVY = {"full": (64, 16, 1024, 32, 8), "dry": (2, 3, 24, 4, 3)}
# (prompts, prompt tokens, new tokens)
DECODE_HEAVY = {"full": (64, 128, 128), "dry": (4, 8, 6)}
HF_SUBSET = {"full": (128, (16, 64, 128)), "dry": (6, (2, 6))}  # prompts, batch sizes tried


def throughput(device: str, *, dry_run: bool, time_left: float) -> dict:
    """Prefix-heavy and decode-heavy batches: ours vs transformers generate, same run."""
    size = "dry" if dry_run else "full"
    dtype = torch.float32 if dry_run else torch.bfloat16
    engine, lm = _our_engine(device, dry_run)
    vocab = lm.config.vocab_size
    _ours_run(engine, _random_prompts(2, 40, vocab, seed=99), 2)  # NOTE: compiles the kernels
    groups, per, prefix, suffix, new = PREFIX_HEAVY[size]
    count, length, dnew = DECODE_HEAVY[size]
    prompts = _grouped_prompts(groups, per, prefix, suffix, vocab)
    dprompts = _random_prompts(count, length, vocab, seed=5)
    result: dict[str, Any] = {
        "ok": False,
        "model": "llama3-8b-shaped random bf16" if not dry_run else "tiny llama fp32 (dry run)",
        "prefix_heavy": {"shape": dict(zip(("groups", "per_group", "prefix", "suffix", "new"),
                                           PREFIX_HEAVY[size]))},
        "decode_heavy": {"shape": dict(zip(("prompts", "prompt_len", "new"), DECODE_HEAVY[size]))},
    }
    # NOTE: ours first, so a failure on the transformers side keeps our figures
    result["prefix_heavy"]["ours"] = _ours_run(engine, prompts, new)
    result["decode_heavy"]["ours"] = _ours_run(engine, dprompts, dnew)
    n_sub, sizes = HF_SUBSET[size]
    try:
        hf = _hf_model(device, dtype, dry_run)
        result["prefix_heavy"]["transformers"] = _hf_best(hf, prompts[:n_sub], new, sizes)
        result["decode_heavy"]["transformers"] = _hf_best(hf, dprompts, dnew, (count,))
        del hf
    except Exception as exc:  # NOTE: recorded with our figures kept
        result["error"] = f"transformers: {type(exc).__name__}: {exc}"[:2000]
        return result
    for key, rate in (("prefix_heavy", "prompts_per_s"), ("decode_heavy", "output_tokens_per_s")):
        part = result[key]
        part[f"speedup_{rate}"] = _ratio(part["ours"], part["transformers"], rate)
    result["ok"] = True
    return result


def roofline(device: str, *, dry_run: bool, time_left: float) -> dict:
    """Decode at batch 1 vs weight bytes / copy bandwidth; prefill vs the bf16 matmul rate."""
    engine, lm = _our_engine(device, dry_run)
    vocab, steps = lm.config.vocab_size, 8 if dry_run else 64
    bandwidth = _copy_bandwidth(device, 2**24 if dry_run else 2**31)
    peak = _matmul_rate(device, 256 if dry_run else 8192, torch.float32 if dry_run else torch.bfloat16)
    _ours_run(engine, _random_prompts(1, 128, vocab, seed=11), steps)  # warm-up
    short = _ours_run(engine, _random_prompts(1, 128, vocab, seed=12), 1)["seconds"]
    full = _ours_run(engine, _random_prompts(1, 128, vocab, seed=13), 1 + steps)["seconds"]
    step_s = max(full - short, 1e-9) / steps
    weight_bytes = _weight_bytes(lm.model, lm.config)
    roof_tok_s = bandwidth / weight_bytes
    batch, length = (2, 32) if dry_run else (4, 2048)
    _ours_run(engine, _random_prompts(batch, length, vocab, seed=20), 1)  # warm-up
    t = _ours_run(engine, _random_prompts(batch, length, vocab, seed=21), 1)["seconds"]
    flops = _prefill_flops(lm.config, [length] * batch, _layer_params(lm.model))
    return {
        "ok": True,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "matmul_tflop_s": round(peak / 1e12, 1),
        "decode_b1": {"tokens_per_s": round(1 / step_s, 1), "weight_bytes": weight_bytes,
                      "roofline_tokens_per_s": round(roof_tok_s, 1),
                      "fraction_of_roofline": round((1 / step_s) / roof_tok_s, 3)},
        "prefill": {"batch": batch, "tokens_each": length, "seconds": round(t, 4),
                    "tflop_s": round(flops / t / 1e12, 2),
                    "fraction_of_matmul_peak": round(flops / t / peak, 3)},
    }


# ---------------------------------------------------------------- our engine


@functools.cache
def _our_engine(device: str, dry_run: bool) -> tuple[Any, Any]:
    """Our engine over the random model (built once per process, shared by sections)."""
    from llmql.engine.config import ModelConfig
    from llmql.engine.engine import EmbeddedEngine, EngineConfig
    from llmql.engine.loader import build_model
    from llmql.engine.models import LoadedModel
    from llmql.engine.tokenizer import Tokenizer

    dtype = torch.float32 if dry_run else torch.bfloat16
    config = ModelConfig.from_hf(_hf_config_dict(dry_run))
    model = build_model(config, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # NOTE: RMSNorm weights (Llama: no offset)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    tok = Tokenizer(word_tokenizer(config.vocab_size), bos_id=1, eos_ids=frozenset(),
                    add_bos=True)
    lm = LoadedModel(model=model.eval(), config=config, tokenizer=tok, name="random-llama")
    kv = 4096 if dry_run else 160_000
    engine_cfg = EngineConfig(device=device, dtype=dtype, kv_tokens=kv, chunk_size=8192,
                              max_batch_tokens=16384, max_running=1024)
    return EmbeddedEngine(lm, engine_cfg), lm


def _hf_config_dict(dry_run: bool) -> dict[str, Any]:
    shape = TINY_LLAMA if dry_run else LLAMA3_8B
    return dict(shape, model_type="llama", architectures=["LlamaForCausalLM"],
                max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=5e5,
                hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)


def _ours_run(engine: Any, prompts: list[list[int]], new: int) -> dict:
    from llmql.engine.types import GenerationRequest

    reqs = [GenerationRequest(p, max_tokens=new) for p in prompts]
    seconds, results = _timed(lambda: engine.generate(reqs, progress=False), engine.config.device)
    bad = [r.error or r.finish_reason for r in results if r.output_tokens != new]
    if bad:
        raise RuntimeError(f"{len(bad)} requests did not produce {new} tokens: {bad[:3]}")
    out = sum(r.output_tokens for r in results)
    return {"prompts": len(prompts), "seconds": round(seconds, 4),
            "prompts_per_s": round(len(prompts) / seconds, 2),
            "output_tokens_per_s": round(out / seconds, 1),
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "cached_tokens": sum(r.cached_tokens for r in results)}


# ---------------------------------------------------------------- transformers


def _hf_model(device: str, dtype: torch.dtype, dry_run: bool) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in _hf_config_dict(dry_run).items() if k not in ("model_type", "architectures")}
    config = LlamaConfig(**cfg)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None  # NOTE: EOS ignored, as for ours
    model.generation_config.pad_token_id = 0
    return model.eval()


def _hf_best(model: Any, prompts: list[list[int]], new: int, sizes: tuple[int, ...]) -> dict:
    """transformers greedy `generate` over `prompts` (equal lengths) at each batch size; the
    fastest, with every size's rate. Warm-up: one small batch first."""
    device = model.device
    _hf_generate(model, prompts[:1], new, 1)
    runs: dict[int, float] = {}
    failed: dict[int, str] = {}
    for bs in sizes:
        try:
            seconds, _ = _timed(lambda bs=bs: _hf_generate(model, prompts, new, bs), device.type)
        except torch.OutOfMemoryError as exc:  # NOTE: a too-large batch size is not the best
            failed[bs] = f"out of memory: {str(exc)[:200]}"
            torch.cuda.empty_cache()
            continue
        runs[bs] = round(len(prompts) / seconds, 2)
    if not runs:
        raise RuntimeError(f"transformers failed at every batch size: {failed}")
    best = max(runs, key=lambda b: runs[b])
    seconds = len(prompts) / runs[best]
    return {"prompts": len(prompts), "best_batch_size": best, "seconds": round(seconds, 4),
            "prompts_per_s": runs[best], "output_tokens_per_s": round(len(prompts) * new / seconds, 1),
            "prompts_per_s_by_batch_size": runs, "failed_batch_sizes": failed}


def _hf_generate(model: Any, prompts: list[list[int]], new: int, bs: int) -> None:
    with torch.inference_mode():
        for i in range(0, len(prompts), bs):
            ids = torch.tensor(prompts[i : i + bs], device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False)
            assert out.shape[1] == ids.shape[1] + new, out.shape


# ---------------------------------------------------------------- helpers


def word_tokenizer(vocab_size: int) -> Any:
    """A word-level `tokenizers.Tokenizer` over ids 0..vocab_size-1 (w<i> words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab |= {f"w{i}": i for i in range(4, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - t0, result


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _ratio(ours: dict, theirs: dict, key: str) -> float:
    return round(ours[key] / theirs[key], 2)


def _random_prompts(count: int, length: int, vocab: int, *, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(4, vocab, (length - 1,), generator=gen).tolist()]
            for _ in range(count)]


def _grouped_prompts(groups: int, per: int, prefix: int, suffix: int, vocab: int) -> list[list[int]]:
    """`groups` shared prefixes, each followed by `per` distinct suffixes, in group order."""
    heads = _random_prompts(groups, prefix, vocab, seed=1)
    gen = torch.Generator().manual_seed(2)
    return [h + torch.randint(4, vocab, (suffix,), generator=gen).tolist()
            for h in heads for _ in range(per)]


def _median_seconds(fn: Callable[[], Any], device: str, reps: int = 10) -> float:
    fn()
    times = []
    for _ in range(reps):
        seconds, _ = _timed(fn, device)
        times.append(seconds)
    return sorted(times)[len(times) // 2]


def _copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes read + written per second of a device-to-device copy."""
    src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_seconds(lambda: dst.copy_(src), device)


def _matmul_rate(device: str, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _median_seconds(lambda: a @ b, device)


def _weight_bytes(model: torch.nn.Module, config: Any) -> int:
    """Bytes one decode step must read: every weight except the embedding table (one row of
    it is read), counted once when tied to the LM head."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if "embed_tokens" in name and not config.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def _layer_params(model: torch.nn.Module) -> int:
    """Matmul parameters of the decoder layers (embedding and LM head excluded)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)


def _prefill_flops(config: Any, lengths: list[int], layer_params: int) -> float:
    """Matmul FLOPs of a fresh causal prefill: 2 * params per token, plus QK^T and PV over
    the causal half, plus the LM head on one row per prompt."""
    tokens = sum(lengths)
    attn = 2 * 2 * config.num_layers * config.num_heads * config.head_dim * sum(
        n * (n + 1) / 2 for n in lengths)
    head = 2 * config.hidden_size * config.vocab_size * len(lengths)
    return 2 * layer_params * tokens + attn + head
