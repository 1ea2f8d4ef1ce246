"""Where the multi-LoRA time goes: ours base-only vs ours mixed on the lora_bench workload.

Same model, adapters and prompts as `lora_bench.py`. Per run, wall seconds split into
forward steps with and without prefill rows (`ModelRunner.run`), and inside them the LoRA
delta by CPU path: llmql's C kernel (`c_lora_delta`, every adapter row in one call where it
runs), else long segments (`segment_lora`, SGMV-style), short rows (`bmm_lora`,
BGMV-style), a popular slot's short rows (`gathered_lora`); and the per-forward segment
plan (`LoraBatch.build`); the CPU seconds of the engine thread and of the whole process
during the forwards (a forward's wall time above its engine thread's CPU time is time that
thread waited off-CPU: for an OpenMP worker, or for a core other processes held); plus
prompt tokens computed. Timers wrap our own functions in this process only (restored on exit); on one
thread every op is synchronous, so the wrapped wall time is the op time. Usage:
    .venv/bin/python benchmarks/lora_profile.py [--prompts 128] [--popularity uniform]
        [--threads 1] [--lock /work/wt/bench.lock]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import emit, load_prompts
from lora_bench import _locked, assign, hf_default, make_adapters, run_ours


@contextlib.contextmanager
def timers(engine_cls):
    """Seconds and calls per timed function; yields the dict, restores everything."""
    import llmql.engine.lora.batch as lb
    from llmql.engine.lora.batch import LoraBatch

    spent: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name][0] += time.perf_counter() - t0
                spent[name][1] += 1
        return wrapper

    def forward(run):
        """A forward step, timed by kind, plus the CPU seconds of the engine thread and of the
        process meanwhile (wall above the engine thread's CPU: it waited, off-CPU)."""
        def wrapper(batch):
            c0, p0 = time.thread_time(), time.process_time()
            try:
                return timed("forward_decode_only" if batch.is_decode else "forward_with_prefill",
                             run)(batch)
            finally:
                spent["forward_engine_thread_cpu"][0] += time.thread_time() - c0
                spent["forward_process_cpu"][0] += time.process_time() - p0
        return wrapper

    saved = (lb.segment_lora, lb.bmm_lora, LoraBatch.__dict__["build"], engine_cls.__init__,
             lb.gathered_lora, lb.c_lora_delta)
    init = engine_cls.__init__

    def engine_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        run = self.runner.run
        self.runner.run = forward(run)

    lb.segment_lora = timed("lora_long_segments", lb.segment_lora)
    lb.bmm_lora = timed("lora_short_rows_bmm", lb.bmm_lora)
    lb.gathered_lora = timed("lora_heavy_slot_rows", lb.gathered_lora)
    lb.c_lora_delta = timed("lora_c_kernel", lb.c_lora_delta)
    LoraBatch.build = classmethod(timed("lora_plan", saved[2].__func__))
    engine_cls.__init__ = engine_init
    try:
        yield spent
    finally:
        lb.segment_lora, lb.bmm_lora, engine_cls.__init__ = saved[0], saved[1], saved[3]
        lb.gathered_lora, lb.c_lora_delta = saved[4], saved[5]
        LoraBatch.build = saved[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--popularity", default="uniform")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lock", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llmql.engine import load
    from llmql.engine.engine import EmbeddedEngine
    from llmql.settings import override

    engine = load()
    lm, config = engine.lm, engine.config
    ids = [lm.tokenizer.encode(p) for p in load_prompts(args.prompts)]
    root = Path(tempfile.mkdtemp(prefix="llmql-lora-profile-"))
    make_adapters(hf_default(), root, args.adapters)
    names = {"base_only": [None] * len(ids),
             "mixed": assign(len(ids), args.adapters, args.popularity, seed=0)}
    common = dict(bench="lora_profile", prompts=len(ids), max_tokens=args.max_tokens,
                  popularity=args.popularity, threads=torch.get_num_threads())
    with override(adapters=root), _locked(args.lock):
        run_ours(lm, config, ids[:8], assign(8, args.adapters, "uniform", 1), 2)  # NOTE: warm-up
        for what, who in names.items():
            with timers(EmbeddedEngine) as spent:
                timer, results = run_ours(lm, config, ids, who, args.max_tokens)
            computed = sum(r.prompt_tokens - r.cached_tokens for r in results)
            emit(dict(common, what=what, seconds=round(timer.wall, 2),
                      prompt_tokens_computed=computed,
                      **{f"{k}_s": round(v[0], 2) for k, v in sorted(spent.items())},
                      **{f"{k}_calls": v[1] for k, v in sorted(spent.items())}))


if __name__ == "__main__":
    main()
