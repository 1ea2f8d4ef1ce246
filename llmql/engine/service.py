"""The engine as a service: one step-loop thread per engine, fed by a thread-safe inbox.

Any number of threads submit requests (tokenized in the caller's thread); the engine
thread adds them to the scheduler between steps, so requests of different callers share
steps (continuous batching across queries). Each request completes a `Future`.

Failure contract:
- an exception while running a batch (forward, sampler, output processing) releases the
  batch's KV and radix locks and re-queues its requests as *suspects*; each suspect then
  runs alone (a batch of one) from where its tokens stand, and fails with
  `ErrorKind.INTERNAL` only if it raises again. Requests that ran fine keep their answers.
- an exception in the scheduler itself fails every request in it (INTERNAL) and frees
  their memory, so the engine stays usable.
- a cancelled future (`Future.cancel()` or `cancel(futures)`) leaves the scheduler before
  the next step and frees its KV and radix locks.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, InvalidStateError, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llmql.engine.scheduler.request import Req
from llmql.engine.scheduler.scheduler import Scheduler
from llmql.engine.types import ErrorKind, GenerationResult, TextCallback

if TYPE_CHECKING:
    from llmql.engine.engine import EmbeddedEngine

_IDLE_WAIT_S = 0.5
_IDLE_EXIT_S = 2.0  # NOTE: an engine thread with nothing to do for this long ends


@dataclass(eq=False)
class _Ticket:
    """A request in flight: its engine state, its future, its text stream."""

    req: Req
    future: Future
    on_text: TextCallback | None = None
    sent: int = 0  # characters of text already given to on_text


class StepLoop:
    """Owns the engine's scheduler on one daemon thread (started on first submit)."""

    def __init__(self, engine: EmbeddedEngine) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._inbox: list[_Ticket] = []
        self._cancelled: list[Req] = []
        self._tickets: dict[int, _Ticket] = {}  # NOTE: engine thread only
        self._suspects: list[Req] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- caller side (any thread) -------------------------------------------------------
    def submit(self, req: Req, on_text: TextCallback | None = None) -> Future:
        """Queue `req`; its future completes with its `GenerationResult`."""
        future: Future = Future()
        ticket = _Ticket(req, future, on_text)
        req.extra["submitted"] = time.perf_counter()
        if req.finished:  # rejected before scheduling (bad request, zero budget)
            self.engine._account(req)
            _resolve(ticket)
            return future
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._inbox.append(ticket)
            self._start()
            self._cond.notify()
        future.add_done_callback(lambda f, r=req: self._on_done(f, r))
        return future

    def cancel(self, futures: Iterable[Future]) -> None:
        """Cancel these futures; their requests free their memory before the next step."""
        for f in futures:
            f.cancel()

    def wait(self, futures: Sequence[Future], *, progress: bool = False) -> list[GenerationResult]:
        """Results of `futures` in order; Ctrl-C cancels them all and re-raises."""
        bar = _bar(len(futures), progress)
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=_IDLE_WAIT_S, return_when=FIRST_COMPLETED)
                bar.update(len(done))
        except BaseException:
            self.cancel(futures)
            raise
        finally:
            bar.close()
        return [_outcome(f) for f in futures]

    def close(self) -> None:
        """Stop the thread after cancelling everything still queued or running."""
        with self._cond:
            self._closed = True
            tickets = [*self._inbox, *self._tickets.values()]
            self._cond.notify()
        for t in tickets:
            t.future.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished yet."""
        with self._cond:
            return len(self._inbox) + len(self._tickets)

    def _on_done(self, future: Future, req: Req) -> None:
        if future.cancelled():
            with self._cond:
                self._cancelled.append(req)
                self._cond.notify()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llmql-engine", daemon=True)
            self._thread.start()

    # -- engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while self._take_inbox():
                try:
                    self._tick()
                except Exception:  # NOTE: the scheduler itself broke: fail what it holds
                    self._fail_all(traceback.format_exc(limit=3))

    def _take_inbox(self) -> bool:
        """Move new and cancelled requests into/out of the scheduler; False once closed."""
        if not self._ready():
            self.engine.runner.idle()  # NOTE: about to wait for work
        with self._cond:
            while not self._ready():
                if not self._cond.wait(timeout=_IDLE_EXIT_S) and not self._ready():
                    # NOTE: idle: the thread ends (the next submit starts another), so an
                    # engine nobody references any more is freed with its weights and KV pool.
                    self._thread = None
                    return False
            inbox, self._inbox = self._inbox, []
            cancelled, self._cancelled = self._cancelled, []
            closed = self._closed
        for t in inbox:
            if not t.future.cancelled():
                self._tickets[t.req.rid] = t
                self.engine.scheduler.add(t.req)
        for req in cancelled:
            self._drop(req)
        if closed:
            for rid in list(self._tickets):
                self._drop(self._tickets[rid].req)
        return not closed

    def _ready(self) -> bool:
        return bool(self._inbox or self._cancelled or self._closed or self._has_work())

    def _has_work(self) -> bool:
        return bool(self._suspects) or self.engine.scheduler.has_work

    def _tick(self) -> None:
        if self._suspects:
            self._run_alone(self._suspects.pop(0))
            return
        scheduler = self.engine.scheduler
        t0 = time.perf_counter()
        try:
            done = self.engine.step(scheduler)
        except _BatchFailed as exc:
            self._isolate(exc.reqs)
            done = exc.finished
        self.engine._stats.seconds += time.perf_counter() - t0
        self._stream(scheduler.running)
        for req in done:
            self._complete(req)

    def _isolate(self, reqs: list[Req]) -> None:
        """After a batch crashed: free its requests' memory; run each alone next."""
        scheduler = self.engine.scheduler
        for req in reqs:
            _reset(scheduler, req)
            if req.extra.get("suspect"):
                self._fail(req, "the engine failed on this request twice")
            else:
                req.extra["suspect"] = True
                self._suspects.append(req)

    def _run_alone(self, req: Req) -> None:
        """Run one suspect request in a private batch-of-one scheduler to its end."""
        if req.rid not in self._tickets:
            return
        main = self.engine.scheduler
        solo = Scheduler(main.kv, main.admitter.policy, chunk_size=main.chunk_size,
                         max_batch_tokens=main.max_batch_tokens, max_running=1)
        solo.add(req)
        try:
            while solo.has_work and req.rid in self._tickets and not self._tickets[req.rid].future.cancelled():
                for finished in self.engine.step(solo):
                    self._complete(finished)
                self._stream(solo.running)
        except _BatchFailed as exc:
            self._fail(req, exc.message)
        except Exception as exc:  # NOTE: e.g. the pool cannot hold it even alone
            self._fail(req, f"{type(exc).__name__}: {exc}")
        if not req.finished:  # cancelled meanwhile
            _reset(solo, req)
            self._tickets.pop(req.rid, None)

    def _drop(self, req: Req) -> None:
        """Remove a cancelled request from wherever it is and free its memory."""
        ticket = self._tickets.pop(req.rid, None)
        if ticket is None or req.finished:
            return
        _reset(self.engine.scheduler, req)
        if req in self._suspects:
            self._suspects.remove(req)
        req.finish("error", "cancelled", ErrorKind.CANCELLED)
        self.engine._account(req)
        _resolve(ticket)

    def _fail(self, req: Req, message: str) -> None:
        _reset(self.engine.scheduler, req)
        req.finish("error", f"internal engine error: {message}", ErrorKind.INTERNAL)
        self._complete(req)

    def _fail_all(self, message: str) -> None:
        scheduler = self.engine.scheduler
        for req in [*scheduler.running, *scheduler.waiting, *self._suspects]:
            self._fail(req, message)
        self._suspects.clear()

    def _complete(self, req: Req) -> None:
        self._stream([req])
        ticket = self._tickets.pop(req.rid, None)
        self.engine._account(req)
        if ticket is not None:
            _resolve(ticket)

    def _stream(self, reqs: Iterable[Req]) -> None:
        for req in reqs:
            ticket = self._tickets.get(req.rid)
            if ticket is not None and ticket.on_text is not None:
                _send_text(ticket, self.engine.output.tokenizer)


class _BatchFailed(Exception):
    """A step's forward/sampling/postprocessing raised for the batch `reqs`."""

    def __init__(self, reqs: list[Req], message: str, finished: list[Req]) -> None:
        super().__init__(message)
        self.reqs, self.message, self.finished = reqs, message, finished


def _reset(scheduler: Scheduler, req: Req) -> None:
    """Take `req` out of `scheduler` and free its slots and radix lock (idempotent)."""
    if req in scheduler.running:
        scheduler.running.remove(req)
    if req in scheduler.waiting:
        scheduler.waiting.remove(req)
    if req.node is not None or req.slots.numel():
        scheduler.kv.release(req, keep_prefix=False)
    req.num_computed = req.cached_len = 0


def _resolve(ticket: _Ticket) -> None:
    """Complete the future; `future.queue_s` = seconds from submit to first admission."""
    extra = ticket.req.extra
    if "admitted" in extra:
        ticket.future.queue_s = extra["admitted"] - extra["submitted"]  # type: ignore[attr-defined]
    with contextlib.suppress(InvalidStateError):  # NOTE: cancelled by its caller meanwhile
        ticket.future.set_result(ticket.req.result())


def _outcome(future: Future) -> GenerationResult:
    if future.cancelled():
        return GenerationResult("", 0, 0, 0, "error", "cancelled", error_kind=ErrorKind.CANCELLED)
    return future.result()


def _send_text(ticket: _Ticket, tokenizer) -> None:
    """Give `on_text` the new output text; held back while a stop string may still match."""
    req = ticket.req
    if req.finished:
        text = req.text
    else:
        ids = [t for t in req.output_ids if t not in tokenizer.eos_ids]
        text = tokenizer.decode(ids).rstrip("\ufffd")  # NOTE: an incomplete UTF-8 sequence
        hold = max((len(s) for s in req.params.stop), default=0)
        text = text[: max(len(text) - hold, 0)] if req.constraint is None else ""
    if len(text) > ticket.sent:
        delta, ticket.sent = text[ticket.sent :], len(text)
        try:
            ticket.on_text(delta)  # type: ignore[misc]
        except Exception:  # NOTE: a broken callback must not break the engine
            ticket.on_text = None


def run_batch(reqs: list[Req], fn: Callable[[], list[Req]], finished: list[Req]) -> list[Req]:
    """Run one step's work `fn`, turning any exception into `_BatchFailed(reqs)`
    (`finished`: requests the step already ended, still to be completed)."""
    try:
        return fn()
    except Exception as exc:
        raise _BatchFailed(reqs, f"{type(exc).__name__}: {exc}", finished) from exc


class _NoBar:
    def update(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None


def _bar(total: int, show: bool):
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="llmql", unit="req")
