"""What a perfect shortest-job-first order could reach on a measured run (sched_bench (a)).

`StepLog` records each engine step of a run: the tokens it computed, the rows it sampled
(each a row of the LM head) and its seconds. `fit_cost` fits a step's seconds as
`a + b * tokens + c * sampled` to those steps. `simulate` replays the same requests (their
uncached prompt tokens and real output lengths) through a simple continuous-batching model
of the engine (at most `max_running` requests, `budget` tokens a step, decodes first, then
admissions in the given order) under that cost, so FCFS and an oracle SJF order (the real
output lengths, which no predictor knows in advance) are compared on one cost model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


class StepLog:
    """Wraps `engine.step` and `engine.runner.run` to log (tokens, sampled rows, seconds)."""

    def __init__(self, engine) -> None:
        self.steps: list[tuple[int, int, float]] = []
        self._last: tuple[int, int] = (0, 0)
        run, step = engine.runner.run, engine.step

        def logged_run(batch):
            self._last = (batch.num_tokens, len(batch.sampled_reqs))
            return run(batch)

        def logged_step(scheduler=None):
            self._last = (0, 0)
            t0 = time.perf_counter()
            done = step(scheduler)
            if self._last[0]:
                self.steps.append((*self._last, time.perf_counter() - t0))
            return done

        engine.runner.run, engine.step = logged_run, logged_step


def fit_cost(steps: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least-squares (a, b, c) of seconds = a + b * tokens + c * sampled rows (each >= 0)."""
    x = np.asarray([(1.0, t, s) for t, s, _ in steps])
    y = np.asarray([sec for _, _, sec in steps])
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    return tuple(float(max(c, 0.0)) for c in coef)  # type: ignore[return-value]


@dataclass
class _Job:
    prefill: int  # uncached prompt tokens
    outputs: int  # output tokens (the first is sampled at the end of the prefill)
    done_prefill: int = 0
    emitted: int = 0


def simulate(prompts: list[int], outputs: list[int], order: list[int], *, max_running: int,
             budget: int, cost: tuple[float, float, float]) -> list[float]:
    """Finish time of each request (seconds from the start) when all arrive at once and are
    admitted in `order`."""
    a, b, c = cost
    jobs = [_Job(max(p, 1), max(o, 1)) for p, o in zip(prompts, outputs)]
    waiting, running = list(order), []
    finish = [0.0] * len(jobs)
    now = 0.0
    while waiting or running:
        tokens = sampled = 0
        plan: list[tuple[int, int]] = []
        for i in running:  # decodes and prefill continuations first, then admissions
            j = jobs[i]
            n = 1 if j.done_prefill >= j.prefill else min(j.prefill - j.done_prefill, budget - tokens)
            if n > 0:
                plan.append((i, n))
                tokens += n
        while waiting and len(running) < max_running and tokens < budget:
            i = waiting.pop(0)
            running.append(i)
            n = min(jobs[i].prefill, budget - tokens)
            plan.append((i, n))
            tokens += n
        for i, n in plan:
            j = jobs[i]
            if j.done_prefill < j.prefill:
                j.done_prefill += n
                sampled += j.done_prefill >= j.prefill
                j.emitted += j.done_prefill >= j.prefill
            else:
                j.emitted += 1
                sampled += 1
        now += a + b * tokens + c * sampled
        for i, _ in plan:
            if jobs[i].emitted >= jobs[i].outputs:
                finish[i] = now
                running.remove(i)
    return finish


def sjf_bound(prompts: list[int], outputs: list[int], *, max_running: int, budget: int,
              steps: list[tuple[int, int, float]]) -> dict:
    """Simulated mean latency of FCFS (submit order) and of an oracle SJF order (real output
    lengths) on the cost model fitted to `steps`, and their ratio."""
    cost = fit_cost(steps)
    fcfs = list(range(len(prompts)))
    sjf = sorted(fcfs, key=lambda i: (outputs[i], i))
    mean = {name: float(np.mean(simulate(prompts, outputs, o, max_running=max_running,
                                         budget=budget, cost=cost)))
            for name, o in (("fcfs", fcfs), ("sjf", sjf))}
    return {"cost_a_b_c": [round(v, 5) for v in cost],
            "sim_fcfs_mean_s": round(mean["fcfs"], 3), "sim_sjf_mean_s": round(mean["sjf"], 3),
            "sim_oracle_sjf_x_fcfs": round(mean["sjf"] / mean["fcfs"], 3)}
