"""Expert offload on CPU: all experts resident vs expert caches of 50% / 25% of the experts'
bytes vs naive on-demand loading (no cache, no prefetch), on one synthetic MoE.

The script writes a random-weight Mixtral-style model to disk once (default: 16 layers x 16
experts, top-2, hidden 1024, expert width 1408, float32: 4.125 GiB of experts, one shard per
layer; `--inter 704` gives the 2.06 GiB model of earlier runs), then runs the same decode-heavy batch under each configuration, each in a fresh
process so peak RSS is its own. Prints one JSON line per configuration, then a table.

NOTE: random routers are a worst case for caching: every expert is equally likely, so a cache
of x% of the experts hits about x% of the time; trained routers are skewed and hit more. The
model files sit in the OS page cache after writing, so "disk" reads here are memory copies.

`--page-cache drop` drops each expert's file pages from the OS page cache after every read
(and the files' pages before each run), so the backing tier is the disk itself, as for a
model bigger than RAM; the resident mode reads every expert once at load either way.

Peak RSS is the process's high-water mark (VmHWM). Also reported, per phase, as anonymous
memory (RssAnon: weights, cache, KV, activations) and file pages (RssFile: shared libraries,
mapped files): `torch_rss` after `import torch` alone, `base_rss` after importing llmql's
engine too (before loading: the interpreter's share), `load_rss` after loading, `end_rss`
after generating; `load_hwm_gib` is the peak up to the end of loading; `peak_sample` is the
largest-RSS sample of a 20 ms sampler thread over load + generate (the peak's make-up), and
`expert_peak_resident_gib` the most expert bytes the cache ever held (loaded or loading).

Runs the llmql of the checkout it sits in (not the one the venv may have installed).
`--repeat N` runs the list of modes N times, interleaved, and reports each mode's median run
(the shared box's speed drifts with the other processes on it).

    python benchmarks/moe_bench.py [--layers 16 --experts 16 --hidden 1024 --inter 1408]

NOTE: the peak-RSS target, (non-expert weights + budget + KV) x 1.15, has no term for the
process itself: python + `import torch` alone is 0.214 GiB (llmql's imports +0.010) on this
CPU box. The 15% covers that from about 3.2 GiB of experts at a 50% budget, so the default
model has 4.125 GiB of experts (the issue asks for >= 2 GiB); on the 2.06 GiB model the raw
peak is over the bound by what the interpreter takes (docs/benchmarks.md has both).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)  # NOTE: this checkout's llmql, not an installed one


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process (KiB)."""
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
    with open("/proc/self/status") as f:
        pairs = (line.split(":", 1) for line in f)
        return {k: int(v.split()[0]) for k, v in pairs if k in keys}


def _phase(status: dict[str, int]) -> dict[str, float]:
    """{rss, anon, file, shmem} in GiB."""
    return {"rss": round(status["VmRSS"] / 2**20, 3), "anon": round(status["RssAnon"] / 2**20, 3),
            "file": round(status["RssFile"] / 2**20, 3), "shmem": round(status["RssShmem"] / 2**20, 3)}


class _PeakSampler:
    """Samples /proc/self/status every `period` s on a thread; keeps the largest-RSS sample
    (what the peak is made of: VmHWM alone does not say)."""

    def __init__(self, period: float = 0.02) -> None:
        self.peak = _status()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            s = _status()
            if s["VmRSS"] > self.peak["VmRSS"]:
                self.peak = s

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


_TORCH_RSS = _phase(_status())  # NOTE: python + torch only, before llmql is imported
VOCAB = 512
MODES = {"resident": None, "cache_50": 0.5, "cache_25": 0.25, "naive": 0.0,
         "cache_50_no_prefetch": 0.5}
DEFAULT_MODES = "resident,cache_50,cache_25,naive"


def write_model(out: Path, a: argparse.Namespace) -> Path:
    """The synthetic MoE as a HF Mixtral folder (reused when already complete)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    if (out / "complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    h, i, heads, kv, hd = a.hidden, a.inter, 8, 2, a.hidden // 8
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": VOCAB,
        "hidden_size": h, "intermediate_size": i, "num_hidden_layers": a.layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "num_local_experts": a.experts, "num_experts_per_tok": 2, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False,
        "eos_token_id": None, "bos_token_id": None,
    }
    (out / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * shape[-1] ** -0.5

    weight_map = {}
    for layer in range(a.layers):
        p = f"model.layers.{layer}."
        shard = {p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
                 p + "self_attn.q_proj.weight": rand(heads * hd, h), p + "self_attn.k_proj.weight": rand(kv * hd, h),
                 p + "self_attn.v_proj.weight": rand(kv * hd, h), p + "self_attn.o_proj.weight": rand(h, heads * hd),
                 p + "block_sparse_moe.gate.weight": rand(a.experts, h) * 4}
        for e in range(a.experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            shard |= {q + "w1.weight": rand(i, h), q + "w3.weight": rand(i, h), q + "w2.weight": rand(h, i)}
        name = f"model-{layer:05d}.safetensors"
        save_file(shard, str(out / name))
        weight_map |= dict.fromkeys(shard, name)
    rest = {"model.embed_tokens.weight": rand(VOCAB, h), "model.norm.weight": torch.ones(h),
            "lm_head.weight": rand(VOCAB, h)}
    save_file(rest, str(out / "model-rest.safetensors"))
    weight_map |= dict.fromkeys(rest, "model-rest.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tok = Tokenizer(models.WordLevel(vocab={f"w{k}": k for k in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "complete").write_text("ok")
    return out


def expert_gib(a: argparse.Namespace) -> float:
    return a.layers * a.experts * 3 * a.hidden * a.inter * 4 / 2**30


def run_one(model: Path, mode: str, a: argparse.Namespace) -> dict:
    """One configuration, in this process: tokens/s, peak RSS, expert cache counters."""
    from llmql.engine.engine import load
    from llmql.engine.types import GenerationRequest

    fraction = MODES[mode]
    gib = None if fraction is None else fraction * expert_gib(a)
    base_rss = _phase(_status())
    sampler = _PeakSampler()
    t0 = time.perf_counter()
    if a.page_cache == "drop":
        _drop_page_cache(model)
    engine = load(str(model), device="cpu", kv_tokens=a.kv_tokens, expert_cache_gib=gib,
                  expert_prefetch=mode not in ("naive", "cache_50_no_prefetch"), prefix_cache=False)
    offload = getattr(engine.lm.model, "expert_offload", None)
    if offload is not None:
        offload.store.drop_page_cache = a.page_cache == "drop"
    load_s = time.perf_counter() - t0
    loaded = _status()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (a.prompt_len,), generator=gen).tolist() for _ in range(a.prompts)]
    requests = [GenerationRequest(p, max_tokens=a.max_tokens) for p in prompts]
    t0 = time.perf_counter()
    results = engine.generate(requests, progress=False)
    seconds = time.perf_counter() - t0
    end, peak = _status(), sampler.stop()
    out_tokens = sum(r.output_tokens for r in results)
    experts = engine.stats().extra.get("experts", {})
    kv_bytes = sum(b.numel() * b.element_size() for b in engine.pool.k_buffer + engine.pool.v_buffer)
    return {
        "mode": mode, "page_cache": a.page_cache, "expert_cache_gib": gib, "experts_gib": round(expert_gib(a), 3),
        "output_tokens": out_tokens, "seconds": round(seconds, 2),
        "tokens_per_s": round(out_tokens / seconds, 2), "load_s": round(load_s, 1),
        "peak_rss_gib": round(end["VmHWM"] / 2**20, 3),
        "base_rss_gib": base_rss["rss"], "torch_rss": _TORCH_RSS, "base_rss": base_rss,
        "load_rss": _phase(loaded), "load_hwm_gib": round(loaded["VmHWM"] / 2**20, 3),
        "end_rss": _phase(end), "peak_sample": _phase(peak),
        "expert_peak_resident_gib": round(experts.get("peak_resident_bytes", 0) / 2**30, 3),
        "kv_gib": round(kv_bytes / 2**30, 3),
        "hit_rate": round(experts.get("hit_rate", 1.0), 3),
        "prefetch_accuracy": round(experts.get("prefetch_accuracy", 0.0), 3),
        "gib_moved": round(experts.get("bytes_moved", 0) / 2**30, 2),
        **{k: experts.get(k, 0) for k in ("misses", "prefetch_loads", "prefetch_wasted")},
        "texts_sha": hashlib.sha256("\x00".join(r.text for r in results).encode()).hexdigest()[:12],
    }


def _drop_page_cache(model: Path) -> None:
    """Drop the model files' pages from the OS page cache (clean pages: nothing is lost)."""
    for path in model.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def non_expert_gib(a: argparse.Namespace) -> float:
    h, hd = a.hidden, a.hidden // 8
    attn = h * (8 * hd) * 2 + h * (2 * hd) * 2
    per_layer = attn + a.experts * h + 2 * h
    return (a.layers * per_layer + 2 * VOCAB * h + h) * 4 / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kv-tokens", type=int, default=256)
    ap.add_argument("--modes", default=DEFAULT_MODES, help=f"any of {', '.join(MODES)}")
    ap.add_argument("--page-cache", choices=("warm", "drop"), default="warm",
                    help="drop: every expert read goes to the disk (see above)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each mode (median reported)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the model")
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    from llmql.settings import get_settings

    tag = f"moe-bench-{a.layers}x{a.experts}-{a.hidden}-{a.inter}"
    model = a.dir or get_settings().cache_dir / "bench" / tag
    if a.run:
        print(json.dumps(run_one(model, a.run, a)))
        return
    write_model(model, a)
    print(json.dumps({"utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                      "loadavg": [round(x, 2) for x in os.getloadavg()]}), flush=True)
    runs: dict[str, list[dict]] = {}
    for _ in range(a.repeat):
        for mode in a.modes.split(","):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--run", mode, "--dir", str(model)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
            if proc.returncode:
                sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            runs.setdefault(mode, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[mode][-1]), flush=True)
    rows = [_median(r) for r in runs.values()]
    if a.repeat > 1:
        for r in rows:
            print(json.dumps({"median_of": a.repeat, **r}), flush=True)
    _summary(rows, a)


def _median(runs: list[dict]) -> dict:
    """The run with the median tokens/s (all runs' speeds under `tokens_per_s_runs`)."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ranked[len(ranked) // 2], "tokens_per_s_runs": [r["tokens_per_s"] for r in runs]}


def _child_env() -> dict[str, str]:
    """The environment of a configuration's process: the same llmql as this one."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")])}


def _summary(rows: list[dict], a: argparse.Namespace) -> None:
    by = {r["mode"]: r for r in rows}
    base, naive = by.get("resident"), by.get("naive")
    print(f"\nnon-expert weights {non_expert_gib(a):.3f} GiB, experts {expert_gib(a):.3f} GiB")
    print(f"{'mode':10} {'tok/s':>7} {'x resident':>10} {'x naive':>8} {'peak RSS':>9} {'hit':>5} {'pref acc':>8}")
    for r in rows:
        vs_base = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        vs_naive = r["tokens_per_s"] / naive["tokens_per_s"] if naive else float("nan")
        print(f"{r['mode']:10} {r['tokens_per_s']:7.2f} {vs_base:10.2f} {vs_naive:8.2f} "
              f"{r['peak_rss_gib']:8.2f}G {r['hit_rate']:5.2f} {r['prefetch_accuracy']:8.2f}")
    same = len({r["texts_sha"] for r in rows}) == 1
    print(f"identical outputs across modes: {same}")
    for r in rows:
        budget = expert_gib(a) if r["expert_cache_gib"] is None else r["expert_cache_gib"]
        target = (non_expert_gib(a) + budget + r["kv_gib"]) * 1.15
        above = r["peak_rss_gib"] - r["base_rss_gib"]
        above_torch = r["peak_rss_gib"] - r["torch_rss"]["rss"]
        p = r["peak_sample"]
        print(f"{r['mode']:10} RSS target (non-expert + budget + KV) x 1.15 = {target:.2f}G: "
              f"peak {r['peak_rss_gib']:.2f}G ({'ok' if r['peak_rss_gib'] <= target else 'over'}; "
              f"sampled peak {p['rss']:.2f}G = anon {p['anon']:.2f} + file {p['file']:.2f} + shmem "
              f"{p['shmem']:.2f}; experts resident <= {r['expert_peak_resident_gib']:.2f}G); "
              f"above import torch ({r['torch_rss']['rss']:.2f}G) {above_torch:.2f}G "
              f"({'ok' if above_torch <= target else 'over'}); "
              f"above import torch + llmql ({r['base_rss_gib']:.2f}G) {above:.2f}G "
              f"({'ok' if above <= target else 'over'})")
    if base and naive and "cache_50" in by:
        c50 = by["cache_50"]["tokens_per_s"]
        print(f"cache_50: {c50 / base['tokens_per_s']:.2f}x resident (target >= 0.6), "
              f"{c50 / naive['tokens_per_s']:.2f}x naive (target >= 3)")


if __name__ == "__main__":
    main()
