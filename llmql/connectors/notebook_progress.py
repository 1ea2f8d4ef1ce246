"""Live progress and clean interrupts for the notebook magics.

While a `%%llmql` cell runs, each LLM call shows a bar (tqdm's widget when ipywidgets is
installed and a kernel runs us, text otherwise) with prompts done, prefix-cache hit rate and
tokens/s. Ctrl-C (or the notebook's interrupt) during an LLM call stops it at the next safe
point: after the prompts in flight finish and are cached, so a rerun resumes from there and
the engine is left with no half-run batch. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

from llmql.udfs.progress import TqdmProgress
from llmql.udfs.types import CallReport

__all__ = ["InterruptGuard", "NotebookProgress"]


class InterruptGuard:
    """Defers SIGINT to the running call's next safe point while installed (main thread only).

    Outside LLM calls (planning, DuckDB work) Ctrl-C interrupts at once, as usual.
    """

    def __init__(self) -> None:
        self.requested = False
        self.active = 0  # LLM calls running
        self.done = 0  # prompts finished (and cached) by the calls of this query
        self.total = 0
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def check(self) -> None:
        """A safe point: raise KeyboardInterrupt if an interrupt was requested."""
        if self.requested:
            raise KeyboardInterrupt("llmql: interrupted at a safe point")

    def progress(self, function: str, total: int, show: bool) -> NotebookProgress:
        """A progress factory (`llmql.udfs.progress.use_progress`) bound to this guard."""
        return NotebookProgress(self, function, total, show)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested or not self.active:
            raise KeyboardInterrupt
        self.requested = True
        print("llmql: stopping after the prompts in flight (interrupt again to stop now)",
              file=sys.stderr, flush=True)


class NotebookProgress:
    """One LLM call's bar; each advance is an interrupt point of its guard."""

    def __init__(self, guard: InterruptGuard, function: str, total: int, show: bool) -> None:
        self.guard = guard
        guard.active += 1
        guard.total += total
        self.bar = TqdmProgress(_tqdm_class(), function, total, leave=True) if show and total else None

    def advance(self, n: int, report: CallReport) -> None:
        self.guard.done += n
        if self.bar is not None:
            self.bar.advance(n, report)
        self.guard.check()

    def close(self) -> None:
        self.guard.active -= 1
        if self.bar is not None:
            self.bar.close()


def _tqdm_class() -> Any:
    """tqdm's notebook widget inside a kernel with ipywidgets installed, else the text bar."""
    from tqdm.std import tqdm

    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None or "IPKernelApp" not in shell.config:
            return tqdm
        import ipywidgets  # noqa: F401
        from tqdm.notebook import tqdm as notebook_tqdm
    except ImportError:
        return tqdm
    return notebook_tqdm
