"""The model that serves, swapped atomically, and the comparison of two models on live requests.

``ModelHolder.infer`` takes a lease on the current model for the duration of one request.
``swap`` installs a new model in one step under a lock: requests that started on the old
model finish on it, new requests go to the new one, and the old model is closed when its
last request returns. No request is refused or retried because of a switch.

``Comparator`` runs a second model on a sample of live requests in a background thread
(so the caller's latency is not touched) and counts how often it agrees with the model
that answered: the shadow phase before activation (new model as the candidate) and the
health window after it (previous model as the reference).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeship.device_agent.store import SlotRecord
from edgeship.errors import EdgeshipError, InputError, SessionClosedError
from edgeship.runtime import Session
from edgeship.runtime.stats import LatencyHistogram

log = logging.getLogger("edgeship.device_agent")

Array = np.ndarray[Any, Any]
Inputs = Mapping[str, Any] | Array
Observer = Callable[[Inputs, dict[str, Array]], None]


class NoModelError(EdgeshipError):
    """The agent has no verified model to serve yet (none installed, or every slot failed verification)."""


@dataclass
class ActiveModel:
    """A loaded model and the slot it came from."""

    session: Session
    slot: str
    record: SlotRecord
    _refs: int = field(default=0, repr=False)
    _retired: bool = field(default=False, repr=False)
    # Counters since this model started serving (the health window reads them; telemetry
    # reads the session's own statistics, which it resets every interval).
    _requests: int = field(default=0, repr=False)
    _errors: int = field(default=0, repr=False)
    _latency: LatencyHistogram = field(default_factory=LatencyHistogram, repr=False)
    _stat_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def model_ref(self) -> dict[str, Any]:
        return self.record.model_ref(self.slot)

    def counts(self) -> tuple[int, int]:
        """(requests, errors) served by this model since it was swapped in."""
        with self._stat_lock:
            return self._requests, self._errors

    def latency_ms(self, percentile: float) -> float | None:
        """A latency percentile of this model's requests so far, in ms (bucketed, see runtime.stats); None before any."""
        with self._stat_lock:
            value = self._latency.percentile(percentile)
        return None if value is None else value * 1e3

    def latency_counts(self) -> list[int]:
        """The latency histogram's bucket counts so far (to measure a later window by difference)."""
        with self._stat_lock:
            return list(self._latency.counts)

    def latency_summary(self, since: list[int] | None = None) -> dict[str, Any]:
        """Requests, p50 and p99 (ms) of the successful requests so far, or since ``since`` (``latency_counts()``
        taken earlier): the baseline a health window compares a new model with."""
        with self._stat_lock:
            counts = list(self._latency.counts)
            errors = self._errors
        if since is not None and len(since) == len(counts):
            counts = [max(a - b, 0) for a, b in zip(counts, since)]
        window = LatencyHistogram()
        window.counts = counts
        window.total = sum(counts)
        p50, p99 = window.percentile(50), window.percentile(99)
        return {
            "requests": window.total,
            "errors": errors,
            "p50_ms": None if p50 is None else p50 * 1e3,
            "p99_ms": None if p99 is None else p99 * 1e3,
        }

    def _record(self, seconds: float, failed: bool) -> None:
        with self._stat_lock:
            self._requests += 1
            if failed:
                self._errors += 1
            else:
                self._latency.add(seconds)


class ModelHolder:
    """Holds the serving model; see the module docstring for the switching guarantee."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: ActiveModel | None = None
        self._observers: list[Observer] = []

    @property
    def current(self) -> ActiveModel | None:
        return self._current

    def infer(self, inputs: Inputs) -> tuple[dict[str, Array], ActiveModel]:
        """Run the current model; return its outputs and the model that answered.

        Raises ``NoModelError`` when nothing is loaded, ``InputError`` for bad inputs, and
        whatever the backend raises for a failing model (counted as an error in its statistics).
        """
        with self._lock:
            model = self._current
            if model is None:
                raise NoModelError(
                    "no model is installed on this device yet; deploy one from the fleet or run 'edgeship agent install PKG'"
                )
            model._refs += 1
            observers = tuple(self._observers)
        start = time.perf_counter()
        try:
            outputs = model.session.run(inputs)
        except (InputError, SessionClosedError):
            raise  # the caller's mistake, not the model's
        except BaseException:
            model._record(time.perf_counter() - start, failed=True)
            raise
        finally:
            self._release(model)
        model._record(time.perf_counter() - start, failed=False)
        for observe in observers:
            observe(inputs, outputs)
        return outputs, model

    def _release(self, model: ActiveModel) -> None:
        with self._lock:
            model._refs -= 1
            close = model._retired and model._refs == 0
        if close:
            model.session.close()

    def swap(self, new: ActiveModel | None) -> ActiveModel | None:
        """Make ``new`` the serving model; return the previous one (closed once its requests are done).

        The returned model must not be used by the caller: it may already be closed.
        """
        with self._lock:
            old, self._current = self._current, new
            close = False
            if old is not None:
                old._retired = True
                close = old._refs == 0
        if old is not None and close:
            old.session.close()
        return old

    def add_observer(self, observer: Observer) -> None:
        with self._lock:
            self._observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        with self._lock:
            if observer in self._observers:
                self._observers.remove(observer)

    def close(self) -> None:
        self.swap(None)


def agree(a: Mapping[str, Array], b: Mapping[str, Array], min_cosine: float = 0.99) -> bool:
    """Whether two models' outputs agree: same top-1 class per row for (batch, classes) outputs,
    cosine similarity >= ``min_cosine`` for every other output."""
    for name, x in a.items():
        y = b.get(name)
        if y is None or x.shape != y.shape:
            return False
        if x.ndim == 2 and x.shape[1] > 1 and x.dtype.kind == "f":
            if not np.array_equal(x.argmax(axis=1), y.argmax(axis=1)):
                return False
            continue
        xf, yf = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
        denom = float(np.linalg.norm(xf) * np.linalg.norm(yf))
        cos = float(xf @ yf) / denom if denom > 0 else float(np.array_equal(xf, yf))
        if cos < min_cosine:
            return False
    return True


class Comparator:
    """Runs ``other`` on a sample (``fraction``) of the requests the holder serves and compares.

    Attach with ``ModelHolder.add_observer(comparator.observe)``. At most ``backlog``
    comparisons wait; beyond that samples are skipped (the comparison must never slow
    serving down). ``stop()`` ends the worker; ``other`` stays open (the caller owns it).
    """

    def __init__(self, other: Session, fraction: float, *, seed: int = 0, backlog: int = 32) -> None:
        self.other = other
        self.fraction = fraction
        self.compared = 0
        self.agreed = 0
        self.errors = 0
        self._rng = random.Random(seed)
        self._queue: queue.Queue[tuple[Inputs, dict[str, Array]] | None] = queue.Queue(backlog)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="edgeship-compare", daemon=True)
        self._thread.start()

    def observe(self, inputs: Inputs, outputs: dict[str, Array]) -> None:
        if self.fraction <= 0 or self._rng.random() >= self.fraction:
            return
        try:
            self._queue.put_nowait((inputs, outputs))
        except queue.Full:
            pass

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            inputs, outputs = item
            try:
                theirs = self.other.run(inputs)
            except EdgeshipError as exc:
                log.debug("comparison run failed: %s", exc)
                with self._lock:
                    self.errors += 1
                    self.compared += 1
                continue
            same = agree(outputs, theirs)
            with self._lock:
                self.compared += 1
                self.agreed += int(same)

    @property
    def agreement(self) -> float | None:
        with self._lock:
            return self.agreed / self.compared if self.compared else None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "compared": self.compared,
                "agreed": self.agreed,
                "agreement": (self.agreed / self.compared) if self.compared else None,
            }

    def stop(self) -> None:
        try:
            self._queue.put(None, timeout=5)
        except queue.Full:
            pass
        self._thread.join(timeout=10)
