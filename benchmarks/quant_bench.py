"""Quantized weights benchmark: peak RSS and rows/s of the default model loaded with
quantization "none", "auto" and "int8" (and llama.cpp's Python binding when `llama_cpp` is
importable), on the same prompts, each side in a fresh process (so peak RSS is its own).

Workloads: "prefill" (a one-word SQL classification batch, max_tokens 2) and "decode"
(the same prompts, 32 output tokens). `--synthetic-1b` also writes a random 1.1B-parameter
Llama as a Q4_0 GGUF and reports its load + generate peak RSS.

Prints one JSON line per measurement, then a table. Usage:
    .venv/bin/python benchmarks/quant_bench.py [--rows 60] [--threads 2] [--repeat 3 | --interleave 3]
        [--sides none,auto,int8,auto-bf16,auto-avx2,auto-torch] [--no-llama-cpp] [--synthetic-1b]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SIDES = ("none", "auto", "int8")
# "auto" with LLMQL_CPU_KERNELS set: the AVX2 builds of the C kernels (GEMM, attention, row
# ops; the LoRA delta has none: what a CPU with AVX2 but not AVX-512 runs), or torch's paths only
KERNEL_SIDES = {"auto-avx2": "avx2", "auto-torch": "0"}
WORKLOADS = {"prefill": 2, "decode": 32}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_side(side: str, rows: int, threads: int, model: str | None, repeat: int = 1) -> dict:
    """In this process: load `side`, run every workload `repeat` times (the prefix cache
    emptied before each round, so each round starts cold); returns the measurements, with
    each workload's median rows/s."""
    sys.path.insert(0, str(Path(__file__).parent))
    from engine_bench import load_prompts

    prompts = load_prompts(rows)
    t0 = time.perf_counter()
    if side == "llama_cpp":
        return _run_llama_cpp(prompts, threads, model)
    import torch

    from llmql.engine import load

    torch.set_num_threads(threads)
    quantization = side
    if side == "auto-bf16":  # NOTE: "auto" with bfloat16 tiles opted in (CPUs with AMX only)
        os.environ["LLMQL_CPU_BF16"] = "1"
        quantization = "auto"
    if side in KERNEL_SIDES:  # NOTE: "auto" as a CPU without AVX-512 / without any C kernel runs it
        os.environ["LLMQL_CPU_KERNELS"] = KERNEL_SIDES[side]
        quantization = "auto"
    engine = load(model or "default", quantization=quantization, kv_tokens=16384, threads=threads)
    out: dict = {"side": side, "load_s": round(time.perf_counter() - t0, 1),
                 "rss_loaded_mib": round(peak_rss_mib())}
    if side == "auto-bf16":
        from llmql.engine.quantized import bf16_tiles_wanted

        out["bf16_tiles"] = bf16_tiles_wanted()  # NOTE: False without AMX: plain "auto" ran
    rounds = []
    for _ in range(repeat):
        engine.kv.cache.evict(engine.pool.num_slots)
        rounds.append({name: _timed(engine, prompts, max_tokens) for name, max_tokens in WORKLOADS.items()})
    for name in WORKLOADS:
        runs = [r[name] for r in rounds]
        rates = sorted(r["rows_per_s"] for r in runs)
        out[name] = {**runs[0], "rows_per_s": rates[len(rates) // 2],
                     "runs_rows_per_s": [r["rows_per_s"] for r in runs]}
    out["peak_rss_mib"] = round(peak_rss_mib())
    return out


def _timed(engine, prompts: list[str], max_tokens: int) -> dict:
    from llmql.engine.types import GenerationRequest

    reqs = [GenerationRequest(p, max_tokens=max_tokens) for p in prompts]
    start = time.perf_counter()
    results = engine.generate(reqs, progress=False)
    seconds = time.perf_counter() - start
    return {"rows_per_s": round(len(prompts) / seconds, 3), "seconds": round(seconds, 2),
            "texts": [r.text for r in results]}


def _run_llama_cpp(prompts: list[str], threads: int, model: str | None) -> dict:
    import llama_cpp
    from llama_cpp import Llama

    from llmql.engine.loader import default_gguf
    from llmql.settings import get_settings

    path = model or str(default_gguf(get_settings().cache_dir))
    extra = os.environ.get("LLAMA_EXTRA_BUFTS", "0") == "1"
    if not extra:
        # NOTE: in this child process only. A source build on a CPU with AMX repacks weights
        # for ggml's AMX kernels ("extra buffer types"), and llama-cpp-python 0.3.36 segfaults
        # in ggml_backend_amx_mul_mat on our AMX box (2026-12-04); `Llama()` has no argument
        # for it, so the model parameters' default is changed before it reads them.
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def no_extra_bufts():  # type: ignore[no-untyped-def]
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = no_extra_bufts
    t0 = time.perf_counter()
    llm = Llama(path, n_ctx=2048, n_threads=threads, verbose=False)
    out: dict = {"side": "llama_cpp", "load_s": round(time.perf_counter() - t0, 1),
                 "extra_bufts": extra}
    for name, max_tokens in WORKLOADS.items():
        start = time.perf_counter()
        texts = [llm(p, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"] for p in prompts]
        seconds = time.perf_counter() - start
        out[name] = {"rows_per_s": round(len(prompts) / seconds, 3), "seconds": round(seconds, 2),
                     "texts": texts}
    out["peak_rss_mib"] = round(peak_rss_mib())
    return out


def synthetic_1b(path: Path, threads: int) -> dict:
    """Write a random Llama (hidden 2048, 16 layers, MLP 8192, vocab 32000) as Q4_0, load it
    with "auto", generate; peak RSS of this process."""
    write_llama_q4_0(path)
    import torch

    from llmql.engine import load
    from llmql.engine.types import GenerationRequest

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    engine = load(str(path), quantization="auto", kv_tokens=2048, threads=threads)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = engine.generate([GenerationRequest("w5 w17 w33", max_tokens=8)], progress=False)[0]
    return {"side": "synthetic_1b_q4_0", "file_gib": round(path.stat().st_size / 2**30, 2),
            "params_b": round(_llama_params() / 1e9, 2), "load_s": round(load_s, 1),
            "generate_s": round(time.perf_counter() - t0, 1), "output_tokens": result.output_tokens,
            "peak_rss_mib": round(peak_rss_mib())}


_LLAMA = dict(hidden=2048, layers=16, ffn=8192, heads=32, kv_heads=8, vocab=32000)


def _llama_params() -> int:
    h, f, v, hd = _LLAMA["hidden"], _LLAMA["ffn"], _LLAMA["vocab"], _LLAMA["hidden"] // _LLAMA["heads"]
    per_layer = h * h * 2 + 2 * h * _LLAMA["kv_heads"] * hd + 3 * h * f
    return _LLAMA["layers"] * per_layer + 2 * v * h


def write_llama_q4_0(path: Path) -> None:
    """Random Q4_0 blocks (scales ~ N(0, 1)/sqrt(in)/4), written tensor by tensor."""
    import gguf
    import numpy as np

    c, rng = _LLAMA, np.random.default_rng(0)
    h, hd = c["hidden"], c["hidden"] // c["heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in [("block_count", c["layers"]), ("context_length", 2048),
                       ("embedding_length", h), ("feed_forward_length", c["ffn"])]:
        getattr(w, f"add_{key}")(value)
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(5e5)
    w.add_tokenizer_model("llama")
    tokens = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"\u2581w{i}" for i in range(4, c["vocab"])]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 4 + [-float(i) for i in range(4, c["vocab"])])
    w.add_token_types([3, 3, 3, 2] + [1] * (c["vocab"] - 4))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    shapes = {"token_embd.weight": (c["vocab"], h), "output.weight": (c["vocab"], h),
              "output_norm.weight": (h,)}
    for i in range(c["layers"]):
        shapes |= {f"blk.{i}.attn_q.weight": (h, h), f"blk.{i}.attn_k.weight": (c["kv_heads"] * hd, h),
                   f"blk.{i}.attn_v.weight": (c["kv_heads"] * hd, h),
                   f"blk.{i}.attn_output.weight": (h, h), f"blk.{i}.ffn_gate.weight": (c["ffn"], h),
                   f"blk.{i}.ffn_up.weight": (c["ffn"], h), f"blk.{i}.ffn_down.weight": (h, c["ffn"]),
                   f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.ffn_norm.weight": (h,)}
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.add_tensor(name, np.ones(shape, dtype=np.float32))
            continue
        n, k = shape
        blocks = rng.integers(0, 256, (n * k // 32, 18), dtype=np.uint8)
        d = (np.abs(rng.standard_normal(n * k // 32)) / np.sqrt(k) / 4).astype(np.float16)
        blocks[:, :2] = d.view(np.uint8).reshape(-1, 2)
        w.add_tensor(name, blocks.reshape(n, -1), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _child(args: list[str]) -> dict:
    """Run one side in a fresh process (this checkout's llmql first on the path)."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--synthetic-1b", action="store_true")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of none,auto,int8,auto-bf16 (auto with "
                             "LLMQL_CPU_BF16=1: bfloat16 tiles on CPUs with AMX), auto-avx2 (LLMQL_CPU_KERNELS=avx2), "
                             "auto-torch (LLMQL_CPU_KERNELS=0)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp's side out")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of the workloads per side (prefix cache emptied between); median reported")
    parser.add_argument("--interleave", type=int, default=0, metavar="N",
                        help="N rounds, each side once per round in its own process, order reversed every "
                             "other round; median rows/s and highest peak RSS per side (overrides --repeat)")
    parser.add_argument("--synthetic-path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.rows, args.threads, args.model, args.repeat)))
        return
    if args.synthetic_path:
        print(json.dumps(synthetic_1b(Path(args.synthetic_path), args.threads)))
        return
    with_llama = importlib.util.find_spec("llama_cpp") and not args.no_llama_cpp
    sides = args.sides.split(",") + (["llama_cpp"] if with_llama else [])
    common = ["--rows", str(args.rows), "--threads", str(args.threads), "--repeat", str(args.repeat)]
    common += ["--model", args.model] if args.model else []
    print(json.dumps({"start_utc": time.strftime("%H:%M:%S", time.gmtime()), "load": os.getloadavg()}), flush=True)
    results = {}
    if args.interleave:
        results = interleaved(sides, [*common[:4], "--repeat", "1", *common[6:]], args.interleave)
    for side in sides if not args.interleave else []:
        results[side] = r = _child([*common, "--side", side])
        print(json.dumps(_brief(r)), flush=True)
    if "llama_cpp" not in results:
        reason = "--no-llama-cpp" if args.no_llama_cpp else "llama_cpp not importable"
        print(json.dumps({"side": "llama_cpp", "measured": False, "reason": reason}))
    print(json.dumps({"time_utc": time.strftime("%H:%M:%S", time.gmtime()), "load": os.getloadavg()}))
    if args.synthetic_1b:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "synthetic-llama-1b-q4_0.gguf"
            print(json.dumps(_child(["--threads", str(args.threads), "--synthetic-path", str(path)])))
    summarize(results)


def _brief(r: dict) -> dict:
    return {k: ({kk: vv for kk, vv in v.items() if kk != "texts"} if isinstance(v, dict) else v)
            for k, v in r.items()}


def interleaved(sides: list[str], common: list[str], rounds: int) -> dict:
    """`rounds` rounds, each running every side once in its own process (one round of the
    workloads), the order reversed every other round (ABC, CBA, ...), so the box's drift
    falls on every side alike. Per side: each workload's median rows/s over the rounds (all
    in `runs_rows_per_s`) and the highest peak RSS of its processes."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for i in range(rounds):
        for side in sides if i % 2 == 0 else sides[::-1]:
            r = _child([*common, "--side", side])
            runs[side].append(r)
            print(json.dumps({"round": i + 1, **_brief(r)}), flush=True)
    results = {}
    for side, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            results[side] = rs[0]
            continue
        merged = {**ok[0], "rounds": len(ok), "peak_rss_mib": max(r["peak_rss_mib"] for r in ok)}
        for w in WORKLOADS:
            rates = [r[w]["rows_per_s"] for r in ok]
            merged[w] = {**ok[0][w], "rows_per_s": sorted(rates)[len(rates) // 2], "runs_rows_per_s": rates}
        results[side] = merged
        print(json.dumps({"interleaved_median": True, **_brief(merged)}), flush=True)
    return results


def summarize(results: dict) -> None:
    base = results.get("none", {})
    print(f"{'side':10} {'peak RSS MiB':>12} " + " ".join(f"{w + ' rows/s':>16}" for w in WORKLOADS)
          + " " + " ".join(f"{w + ' vs none':>16}" for w in WORKLOADS) + "  greedy = none")
    for side, r in results.items():
        if "error" in r:
            print(f"{side:10} error: {r['error'][-200:]}")
            continue
        rates = [r[w]["rows_per_s"] for w in WORKLOADS]
        ratios = [r[w]["rows_per_s"] / base[w]["rows_per_s"] if w in base else float("nan") for w in WORKLOADS]
        same = sum(a == b for a, b in zip(r["decode"]["texts"], base.get("decode", {}).get("texts", [])))
        print(f"{side:10} {r['peak_rss_mib']:>12} " + " ".join(f"{x:>16.2f}" for x in rates)
              + " " + " ".join(f"{x:>15.2f}x" for x in ratios) + f"  {same}/{len(r['decode']['texts'])}")


if __name__ == "__main__":
    main()
