"""Progress of one LLM call: prompts done, prefix-cache hit rate and tokens/s.

The batch runner opens one `CallProgress` per call and advances it as prompts finish. By
default that is a tqdm bar on long calls; a front end (the notebook magics) installs its own
factory for the current context with `use_progress`, e.g. a widget bar that is also the
call's interrupt point.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, Protocol

from llmql.udfs.types import CallReport

__all__ = ["CallProgress", "TqdmProgress", "open_progress", "postfix", "use_progress"]


class CallProgress(Protocol):
    """What the batch runner reports to while one call runs."""

    def advance(self, n: int, report: CallReport) -> None:
        """`n` more prompts finished (their answers are already cached); `report` so far.

        A safe point: raising KeyboardInterrupt here stops the call and loses nothing finished.
        """

    def close(self) -> None:
        """The call ended (finished, failed or interrupted)."""


ProgressFactory = Callable[[str, int, bool], CallProgress]
"""(function name, prompts to compute, show?) -> the call's progress."""

_FACTORY: ContextVar[ProgressFactory | None] = ContextVar("llmql_progress", default=None)


@contextlib.contextmanager
def use_progress(factory: ProgressFactory) -> Iterator[None]:
    """Use `factory` for the calls run in this context (thread-safe: a ContextVar)."""
    token = _FACTORY.set(factory)
    try:
        yield
    finally:
        _FACTORY.reset(token)


def open_progress(function: str, total: int, *, show: bool, long: bool) -> CallProgress:
    """The progress of a call computing `total` prompts: the context's factory if one is
    installed, else a tqdm bar when `show` and the call is `long` (more than one chunk)."""
    factory = _FACTORY.get()
    if factory is not None:
        return factory(function, total, show)
    if show and long:
        from tqdm.auto import tqdm

        return TqdmProgress(tqdm, function, total, leave=False)
    return _NoProgress()


class TqdmProgress:
    """A tqdm bar (any tqdm class: text or notebook widget) with hit rate and tokens/s."""

    def __init__(self, tqdm_cls: Any, function: str, total: int, **kwargs: Any) -> None:
        self.bar = tqdm_cls(total=total, desc=function, unit="prompt", **kwargs)
        self.t0 = time.perf_counter()

    def advance(self, n: int, report: CallReport) -> None:
        self.bar.set_postfix_str(postfix(report, time.perf_counter() - self.t0), refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def postfix(report: CallReport, seconds: float) -> str:
    """`prefix hit 43%, 812 tok/s`: the call's prefix-cache hit rate so far and the tokens the
    engine computed (prompt tokens not served from its cache, plus output) per second."""
    computed = report.prompt_tokens - report.cached_tokens + report.output_tokens
    rate = computed / seconds if seconds > 0 else 0.0
    cached = f"{report.cache_hits} cached, " if report.cache_hits else ""
    return f"{cached}prefix hit {report.prefix_hit_rate:.0%}, {rate:,.0f} tok/s"


class _NoProgress:
    def advance(self, n: int, report: CallReport) -> None:
        return None

    def close(self) -> None:
        return None
