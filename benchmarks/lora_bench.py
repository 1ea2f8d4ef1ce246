"""Multi-LoRA benchmark: many adapters in one batch (S-LoRA / Punica) on the default model.

Eight random PEFT adapters (ranks 8/16/32, all seven projections) on Gemma 3 270M, movie
review prompts from ../shared/data, adapter popularity uniform and Zipf(1.0). Side by side,
in one run: ours with one mixed batch; ours one adapter at a time; `peft`'s mixed-adapter
batched `generate(adapter_names=...)`; ours base-only on the same prompts (LoRA overhead).

The radix prefix cache is keyed by adapter (K/V under one adapter is never reused under
another), so a mixed batch recomputes, per adapter, the prompt prefixes it shares with
other adapters' prompts. To tell that cost from the adapters' own, base-only runs a second
time with its cache split the same way (`cache_salt` = the adapter name each prompt gets):
`cache_split_cost_vs_base` is what the split alone costs, `lora_overhead_same_cache_split`
what the adapters cost on top of it (`lora_overhead_vs_base` is both together).

Prints one JSON line per measurement, then a table. Usage:
    .venv/bin/python benchmarks/lora_bench.py [--prompts 256] [--max-tokens 16] [--no-peft]
        [--peft-batch 16,32,64 --peft-tune 32] [--peft-prompts N] [--no-base]
        [--no-sequential] [--no-split] [--no-prefix-cache] [--popularity uniform,zipf] [--threads N]
    .venv/bin/python benchmarks/lora_bench.py --cpu-paths   # the CPU delta paths per shape
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import Timer, emit, load_prompts

RANKS = (8, 16, 32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_default():
    """transformers' Gemma 3 270M from the default GGUF, converted once and saved."""
    from transformers import AutoModelForCausalLM

    from llmql.engine.loader import default_gguf
    from llmql.settings import get_settings

    gguf = default_gguf(get_settings().cache_dir)
    saved = get_settings().cache_dir / "hf" / gguf.stem
    if not (saved / "complete").exists():
        from safetensors.torch import save_model

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        saved.mkdir(parents=True, exist_ok=True)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (saved / "config.json").write_text(json.dumps(config, indent=1))
        save_model(model, str(saved / "model.safetensors"))
        (saved / "complete").write_text("ok")
    return AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()


def make_adapters(hf, root: Path, n: int, seed: int = 0):
    """`n` random adapters a0..a{n-1} saved under `root`; returns the PeftModel holding them."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = None
    for i in range(n):
        r = RANKS[i % len(RANKS)]
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
        if peft_model is None:
            peft_model = get_peft_model(hf, cfg, adapter_name=f"a{i}")
        else:
            peft_model.add_adapter(f"a{i}", cfg)
    with torch.no_grad():  # NOTE: small deltas, so answers stay close to the base model's
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    peft_model.save_pretrained(root)
    return peft_model.eval()


def assign(n: int, adapters: int, popularity: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = [1.0] * adapters if popularity == "uniform" else [1 / (i + 1) for i in range(adapters)]
    return [f"a{i}" for i in rng.choices(range(adapters), weights=weights, k=n)]


def run_ours(lm, config, ids, names, max_tokens: int, salts=None) -> tuple[Timer, list]:
    """Ours on `ids` with adapters `names` (None: the base model) and `cache_salt`s `salts`."""
    from llmql.engine.engine import EmbeddedEngine
    from llmql.engine.types import GenerationRequest

    engine = EmbeddedEngine(lm, config)
    salts = salts or [None] * len(ids)
    reqs = [GenerationRequest(x, max_tokens=max_tokens, adapter=a, cache_salt=s)
            for x, a, s in zip(ids, names, salts)]
    with Timer() as timer:
        results = engine.generate(reqs, progress=False)
    assert all(r.error is None for r in results), [r.error for r in results if r.error][:3]
    return timer, results


def best_of(repeat: int, run, *args) -> tuple[Timer, list, list[float]]:
    """`run(*args)` `repeat` times: the fastest (timer, results) and every wall time."""
    runs = [run(*args) for _ in range(repeat)]
    best = min(runs, key=lambda r: r[0].wall)
    return best[0], best[1], [round(t.wall, 2) for t, _ in runs]


def timing(t: Timer) -> dict[str, float]:
    """Wall seconds and this process's CPU seconds (with one thread, CPU seconds barely
    move with other processes' load; wall seconds do)."""
    return dict(seconds=round(t.wall, 2), cpu_seconds=round(t.cpu, 2))


def tokens(results) -> dict[str, int]:
    """Output, prompt and prefix-cached prompt tokens of a run (adapters split the cache)."""
    return dict(output_tokens=sum(r.output_tokens for r in results),
                prompt_tokens=sum(r.prompt_tokens for r in results),
                cached_tokens=sum(r.cached_tokens for r in results))


def run_sequential(lm, config, ids, names, max_tokens: int) -> tuple[Timer, int]:
    """One engine batch per adapter, one after the other (same engine: a warm pool)."""
    from llmql.engine.engine import EmbeddedEngine
    from llmql.engine.types import GenerationRequest

    engine = EmbeddedEngine(lm, config)
    out = 0
    with Timer() as timer:
        for a in sorted(set(names), key=str):
            reqs = [GenerationRequest(x, max_tokens=max_tokens, adapter=a)
                    for x, b in zip(ids, names) if b == a]
            out += sum(r.output_tokens for r in engine.generate(reqs, progress=False))
    return timer, out


def run_peft(model, ids, names, max_tokens: int, batch: int, pad: int) -> tuple[Timer, int]:
    """peft mixed-adapter batched greedy generate: prompts sorted by length (least
    padding, as `engine_bench.run_hf`), left padding, `adapter_names=` per row."""
    out = 0
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    ids, names = [ids[i] for i in order], [names[i] for i in order]
    with Timer() as timer, torch.inference_mode():
        for i in range(0, len(ids), batch):
            chunk, who = ids[i : i + batch], names[i : i + batch]
            width = max(map(len, chunk))
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
            gen = model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=who,
                                 max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
            out += sum(sum(1 for t in row if t != pad) for row in gen[:, width:].tolist())
    return timer, out


CPU_CASES = {"decode_64_uniform": ([1] * 64, "uniform"), "decode_64_zipf": ([1] * 64, "zipf"),
             "decode_16_uniform": ([1] * 16, "uniform"), "prefill_8x128": ([128] * 8, "uniform"),
             "prefill_32x16": ([16] * 32, "uniform")}


def bench_cpu_paths(repeat: int = 20) -> None:
    """Per module shape: the LoRA delta (shrink + expand) by llmql's C kernel (`c_kernel`,
    where it runs: every adapter row in one call), by segment matmuls (`segments`,
    SGMV-style), by one padded bmm over slots (`padded_bmm`, BGMV-style) and by one matmul
    per slot over gathered rows (`grouped`, the torch reference), next to the base projection
    itself (`base_linear`), for decode rows and prefill segments; and the engine's own mix
    (`engine_plan`: long segments one matmul each, the rows of a slot with >= HEAVY_SLOT
    short rows gathered apart, the other short rows in the padded bmm; on DELTA_THREADS
    intra-op threads as in the engine, and `engine_plan_all_threads` on the caller's).
    Plans are built once per forward in the engine, so outside the timing here."""
    gen = torch.Generator().manual_seed(0)
    ranks = [0, 8, 16, 32, 8, 16, 32, 8, 16]
    for module, (k, outs) in {"qkv": (640, (1024, 256, 256)), "o": (1024, (640,)),
                              "gate_up": (640, (2048, 2048)), "down": (2048, (640,))}.items():
        a, b, offsets = _stacked(gen, k, outs, 32, ranks)
        base_w = torch.randn(offsets[-1], k, generator=gen)
        for what, (lens, pop) in CPU_CASES.items():
            seg = [int(name[1:]) + 1 for name in assign(len(lens), len(ranks) - 1, pop, 0)]
            x = torch.randn(sum(lens), k, generator=gen)
            out = torch.zeros(x.shape[0], offsets[-1])
            emit(dict(bench="lora_cpu_path", module=module, shape=what,
                      threads=torch.get_num_threads(),
                      base_linear_ms=round(_time(repeat, torch.nn.functional.linear, x, base_w), 3),
                      **_time_paths(repeat, x, a, b, out, offsets, ranks, lens, seg)))


def _stacked(gen, k: int, outs: tuple[int, ...], stride: int, ranks: list[int]):
    """Random pool-layout A [S, n_sub*stride, k] and B [S, N, stride], zero beyond ranks."""
    n_sub, slots = len(outs), len(ranks)
    a = torch.randn(slots, n_sub * stride, k, generator=gen)
    b = torch.randn(slots, sum(outs), stride, generator=gen)
    for s, r in enumerate(ranks):
        a.view(slots, n_sub, stride, k)[s, :, r:] = 0
        b[s, :, r:] = 0
    return a, b, [0, *torch.tensor(outs).cumsum(0).tolist()]


def _time_paths(repeat, x, a, b, out, offsets, ranks, lens, seg) -> dict[str, float]:
    from llmql.engine.lora.batch import cpu_plan, delta_threads
    from llmql.kernels.cpu_lib import kernel_available
    from llmql.kernels.lora_cpu import (
        bmm_lora,
        c_lora_delta,
        gathered_lora,
        padded_rows,
        segment_lora,
        slot_order,
    )
    from llmql.kernels.lora_expand import ref_lora_expand
    from llmql.kernels.lora_shrink import ref_lora_shrink, slot_groups

    indptr, seg_t = torch.tensor([0, *lens]).cumsum(0), torch.tensor(seg)
    bounds = indptr.tolist()
    segments = list(zip(seg, bounds, bounds[1:]))
    token_slots = torch.repeat_interleave(seg_t, torch.tensor(lens))
    grid = padded_rows(torch.arange(x.shape[0]), token_slots)
    groups, rank_t = slot_groups(indptr, seg_t), torch.tensor(ranks)

    def grouped():
        xa = ref_lora_shrink(x, a, indptr, seg_t, rank_t, b.shape[2], groups=groups)
        return ref_lora_expand(xa, b, out, indptr, seg_t, rank_t, offsets, groups=groups)

    long, light, heavy = cpu_plan(seg, bounds)

    def all_threads():  # NOTE: add_lora's ops: long segments, the light grid, heavy slots
        segment_lora(x, a, b, out, offsets, ranks, long)
        if light is not None:
            bmm_lora(x, a, b, out, offsets, light)
        return gathered_lora(x, a, b, out, offsets, ranks, heavy)

    def engine():  # NOTE: as add_lora runs them (on DELTA_THREADS intra-op threads)
        with delta_threads():
            return all_threads()

    c_kernel = {}
    if kernel_available("llmql_lora_delta"):  # NOTE: B rank-major, as the CPU pool holds it
        rows, row_slots = slot_order(token_slots)
        b_rank_major = b.transpose(1, 2).contiguous().transpose(1, 2)
        c_kernel["c_kernel_ms"] = round(_time(repeat, c_lora_delta, x, a, b_rank_major, out, offsets,
                                              torch.tensor(ranks), rows, row_slots), 3)
    return dict(**c_kernel,
                segments_ms=round(_time(repeat, segment_lora, x, a, b, out, offsets, ranks, segments), 3),
                padded_bmm_ms=round(_time(repeat, bmm_lora, x, a, b, out, offsets, grid), 3),
                grouped_ms=round(_time(repeat, grouped), 3),
                engine_plan_all_threads_ms=round(_time(repeat, all_threads), 3),
                engine_plan_ms=round(_time(repeat, engine), 3))


def _time(repeat: int, fn, *args, **kwargs) -> float:
    """Median milliseconds per call (after one warm-up call; the median resists other load)."""
    fn(*args, **kwargs)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--peft-batch", default="32",
                    help="peft batch size, or several (comma-separated): each is timed on the "
                    "first --peft-tune prompts and the fastest runs the comparison")
    ap.add_argument("--peft-tune", type=int, default=32)
    ap.add_argument("--peft-prompts", type=int, default=0,
                    help="time peft (and ours again) on the first N prompts only (0: all)")
    ap.add_argument("--no-peft", action="store_true", help="skip the (slow) peft baseline")
    ap.add_argument("--no-base", action="store_true",
                    help="skip ours base-only (and so the LoRA overhead row)")
    ap.add_argument("--no-sequential", action="store_true", help="skip one-adapter-at-a-time")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="both sides without the prefix cache (the LoRA compute alone)")
    ap.add_argument("--popularity", default="uniform,zipf")
    ap.add_argument("--no-split", action="store_true",
                    help="skip base-only with the cache split by adapter (cache_salt)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1,
                    help="run ours base-only and mixed this many times each; keep the fastest")
    ap.add_argument("--cpu-paths", action="store_true", help="only time the CPU delta paths")
    ap.add_argument("--lock", type=Path, help="hold an exclusive flock on this file while timing "
                    "(after loading the models and writing the adapters)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_paths:
        bench_cpu_paths()
        return
    import dataclasses
    import tempfile

    from llmql.engine import load
    from llmql.settings import override

    engine = load()
    lm = engine.lm
    config = dataclasses.replace(engine.config, prefix_cache=not args.no_prefix_cache)
    ids = [lm.tokenizer.encode(p) for p in load_prompts(args.prompts)]
    root = Path(tempfile.mkdtemp(prefix="llmql-lora-bench-"))
    peft_model = make_adapters(hf_default(), root, args.adapters)
    common = dict(bench="lora", prompts=len(ids), max_tokens=args.max_tokens,
                  adapters=args.adapters, device=config.device, threads=torch.get_num_threads(),
                  prefix_cache=config.prefix_cache)
    rows = []
    with override(adapters=root), _locked(args.lock):
        run_ours(lm, config, ids[:8], assign(8, args.adapters, "uniform", 1), 2)  # NOTE: warm-up
        t_base = None
        if not args.no_base:
            t_base, base_res, walls = best_of(args.repeat, run_ours, lm, config, ids,
                                              [None] * len(ids), args.max_tokens)
            rows.append(emit(dict(common, what="ours_base_only", **timing(t_base), runs=walls,
                                  **tokens(base_res))))
        for pop in args.popularity.split(","):
            rows += _one_popularity(args, common, lm, config, ids, pop, t_base, peft_model)
    _table(rows)


def _one_popularity(args, common, lm, config, ids, pop, t_base, peft_model) -> list[dict]:
    names = assign(len(ids), args.adapters, pop, seed=0)
    c = dict(common, popularity=pop)
    t_mixed, mixed, walls = best_of(args.repeat, run_ours, lm, config, ids, names, args.max_tokens)
    out = [emit(dict(c, what="ours_mixed", **timing(t_mixed), runs=walls, **tokens(mixed)))]
    if t_base is not None:
        out.append(emit(dict(c, what="lora_overhead_vs_base",
                             overhead=round(t_mixed.wall / t_base.wall - 1, 3))))
    if t_base is not None and config.prefix_cache and not args.no_split:
        # NOTE: base-only again, its prefix cache split as the adapters split it (one
        # cache_salt per adapter name): what the split alone costs, and what the adapters
        # cost on top of it
        t_split, split, walls = best_of(args.repeat, run_ours, lm, config, ids, [None] * len(ids),
                                        args.max_tokens, names)
        out += [emit(dict(c, what="ours_base_same_cache_split", **timing(t_split), runs=walls,
                          **tokens(split))),
                emit(dict(c, what="cache_split_cost_vs_base",
                          overhead=round(t_split.wall / t_base.wall - 1, 3))),
                emit(dict(c, what="lora_overhead_same_cache_split",
                          overhead=round(t_mixed.wall / t_split.wall - 1, 3)))]
    if not args.no_sequential:
        t_seq, seq_out = run_sequential(lm, config, ids, names, args.max_tokens)
        out += [emit(dict(c, what="ours_one_adapter_at_a_time", **timing(t_seq),
                          output_tokens=seq_out)),
                emit(dict(c, what="mixed_vs_sequential", speedup=round(t_seq.wall / t_mixed.wall, 2)))]
    if not args.no_peft:
        out += _vs_peft(args, c, lm, config, ids, names, t_mixed, peft_model)
    return out


def _vs_peft(args, c, lm, config, ids, names, t_mixed, peft_model) -> list[dict]:
    """peft's mixed-adapter generate on the first `--peft-prompts` prompts (ours again on
    the same subset when it is one), at the given or the fastest tuned batch size."""
    n, out = args.peft_prompts or len(ids), []
    t_ours = t_mixed
    if n < len(ids):  # NOTE: the same subset on both sides
        t_ours, _ = run_ours(lm, config, ids[:n], names[:n], args.max_tokens)
        out.append(emit(dict(c, what="ours_mixed_subset", prompts=n, **timing(t_ours))))
    pad = lm.config.pad_token_id or 0
    sizes = [int(b) for b in str(args.peft_batch).split(",")]
    tuned: dict[int, tuple[Timer, int]] = {}
    if len(sizes) > 1:  # NOTE: what a user tuning peft for this workload would pick
        for b in sizes:
            tuned[b] = run_peft(peft_model, ids[: args.peft_tune], names[: args.peft_tune],
                                args.max_tokens, b, pad)
            out.append(emit(dict(c, what="peft_batch_tuning", prompts=args.peft_tune, batch=b,
                                 **timing(tuned[b][0]))))
    batch = min(tuned, key=lambda b: tuned[b][0].wall) if tuned else sizes[0]
    if n == args.peft_tune and batch in tuned:  # NOTE: already timed on these prompts
        t_peft, peft_out = tuned[batch]
    else:
        t_peft, peft_out = run_peft(peft_model, ids[:n], names[:n], args.max_tokens, batch, pad)
    out.append(emit(dict(c, what="peft_mixed_generate", prompts=n, **timing(t_peft),
                         output_tokens=peft_out, batch=batch)))
    out.append(emit(dict(c, what="ours_mixed_vs_peft", prompts=n,
                         speedup=round(t_peft.wall / t_ours.wall, 2))))
    return out


@contextlib.contextmanager
def _locked(path: Path | None):
    """An exclusive flock on `path` (the shared benchmark lock), or nothing."""
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        print(f"# lock taken {time.strftime('%H:%M:%S', time.gmtime())} UTC", flush=True)
        try:
            yield
        finally:
            print(f"# lock released {time.strftime('%H:%M:%S', time.gmtime())} UTC", flush=True)


def _table(rows: list[dict]) -> None:
    print(f"\n{'popularity':<10} {'measurement':<32} {'value':>10}")
    for r in rows:
        value = r.get("seconds", r.get("speedup", r.get("overhead")))
        unit = "s" if "seconds" in r else ("x" if "speedup" in r else "")
        print(f"{r.get('popularity', '-'):<10} {r['what']:<32} {value:>9}{unit}")


if __name__ == "__main__":
    main()
