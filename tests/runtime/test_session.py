"""Session on real models, as a long-running device agent uses it: many threads, statistics windows,
close() that frees the native model, and opening an installed slot pinned by its manifest digest."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edgeship.runtime as rt
from edgeship.errors import IntegrityError, SessionClosedError, UsageError
from edgeship.runtime.package import unpack_package
from tests.model_fixtures import Models

THREADS = 8
RUNS_PER_THREAD = 200


def open_pkg(models: Models, name: str, **kwargs: Any) -> rt.Session:
    kwargs.setdefault("threads", 1)
    return rt.open(models.package(name), trusted_keys=models.trusted, **kwargs)


def _run_threads(target: Any, count: int) -> list[BaseException]:
    """Start ``count`` threads of ``target(index, barrier)`` together; return what they raised."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def wrapped(i: int) -> None:
        try:
            target(i, barrier)
        except BaseException as exc:  # reported to the test, which fails on any
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _native(session: rt.Session) -> Any:
    """The native interpreter object behind a session (LiteRT Interpreter or ORT InferenceSession)."""
    model = session._model
    return model._interp if hasattr(model, "_interp") else model._session


# ---------------------------------------------------------------- concurrency


@pytest.mark.parametrize(("name", "thread_safe"), [("tflite-fp32", False), ("onnx-fp32", True)])
def test_many_threads_get_the_serial_result_for_their_own_input(models: Models, name: str, thread_safe: bool):
    # Thread t cycles through its own 25 images; their outputs run one by one are the reference.
    own = [models.x_test[t * 25 : (t + 1) * 25, None] for t in range(THREADS)]
    with open_pkg(models, name) as reference:
        serial = [[reference.run(x)["logits"] for x in images] for images in own]
    with open_pkg(models, name) as session:
        mismatches: list[tuple[int, int]] = []

        def work(t: int, barrier: threading.Barrier) -> None:
            barrier.wait()
            for i in range(RUNS_PER_THREAD):
                k = i % len(own[t])
                out = session.run(own[t][k])["logits"]
                if not np.array_equal(out, serial[t][k]):
                    mismatches.append((t, i))

        assert _run_threads(work, THREADS) == []
        assert mismatches == []
        snap = session.stats_snapshot()
        thread_safe_here = session.thread_safe
    assert snap["latency"]["calls"] == THREADS * RUNS_PER_THREAD
    assert snap["requests"] == THREADS * RUNS_PER_THREAD
    assert snap["errors"] == 0 and snap["rejected"] == 0
    assert snap["inputs"]["image"]["samples"] == THREADS * RUNS_PER_THREAD
    assert sum(snap["outputs"]["logits"]["class_histogram"]) == 1024  # the drift ring holds the last 1,024
    assert thread_safe_here is thread_safe


def test_litert_pool_runs_threads_at_once_with_correct_results(models: Models):
    images = models.x_test[:40, None]
    with open_pkg(models, "tflite-int8") as reference:
        serial = [reference.run(x)["logits"] for x in images]
    with open_pkg(models, "tflite-int8", pool=3) as session:
        assert session.thread_safe
        results: dict[tuple[int, int], np.ndarray] = {}

        def work(t: int, barrier: threading.Barrier) -> None:
            barrier.wait()
            for i in range(100):
                results[t, i] = session.run(images[(i + t) % len(images)])["logits"]

        assert _run_threads(work, 4) == []
        assert session.check_golden().passed
    for (t, i), out in results.items():
        np.testing.assert_array_equal(out, serial[(i + t) % len(images)])
    with pytest.raises(UsageError, match="pool must be a positive number"):
        open_pkg(models, "tflite-int8", pool=0)


def test_check_golden_does_not_switch_statistics_off_for_other_threads(models: Models):
    runs = 300
    with open_pkg(models, "onnx-fp32") as session:
        done = threading.Event()
        golden_calls = 0

        def golden_loop() -> None:
            nonlocal golden_calls
            while not done.is_set() or golden_calls == 0:
                assert session.check_golden().passed
                golden_calls += 1

        checker = threading.Thread(target=golden_loop)
        checker.start()
        try:
            for x in models.x_test[:runs]:
                session.run(x[None])
        finally:
            done.set()
            checker.join()
        snap = session.stats_snapshot()
    assert golden_calls > 0
    assert snap["latency"]["calls"] == runs, "runs of other callers went unrecorded while golden vectors ran"
    assert snap["requests"] == runs
    assert snap["inputs"]["image"]["samples"] == runs  # golden cases are never folded in


def test_a_run_whose_backend_raises_counts_as_an_error_and_reraises(models: Models):
    good = {"tokens": np.arange(16, dtype=np.int64)[None], "mask": np.ones((1, 16), np.float32)}
    out_of_vocabulary = {"tokens": np.full((1, 16), 1000, np.int64), "mask": np.ones((1, 16), np.float32)}
    with open_pkg(models, "two-onnx") as session:
        session.run(good)
        with pytest.raises(Exception, match="out of data bounds"):
            session.run(out_of_vocabulary)  # ONNX Runtime's Gather refuses the index
        with pytest.raises(Exception, match="missing 'mask'"):
            session.run({"tokens": good["tokens"]})
        snap = session.stats_snapshot()
    assert (snap["requests"], snap["errors"], snap["rejected"], snap["latency"]["calls"]) == (3, 1, 1, 1)


def test_snapshot_reset_starts_a_new_window_but_keeps_the_drift_window(models: Models):
    with open_pkg(models, "onnx-fp32") as session:
        for x in models.x_test[:10]:
            session.run(x[None])
        first = session.stats_snapshot(reset=True)
        empty = session.stats_snapshot()
        for x in models.x_test[10:15]:
            session.run(x[None])
        second = session.stats_snapshot()
    assert first["requests"] == 10 and first["latency"]["calls"] == 10 and first["window_s"] >= 0.0
    image = empty["inputs"]["image"]
    assert empty["requests"] == 0 and empty["errors"] == 0 and empty["latency"]["calls"] == 0
    assert image["samples"] == 0 and image["min"] == [] and image["nonfinite"] == 0
    assert image["drift"]["window"] == 10, "reset must keep the ring buffer drift is computed from"
    assert second["requests"] == 5 and second["inputs"]["image"]["samples"] == 5
    assert second["inputs"]["image"]["drift"]["window"] == 15
    np.testing.assert_allclose(second["inputs"]["image"]["mean"][0], models.x_test[10:15].mean(), rtol=1e-5)


# ---------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("name", ["tflite-fp32", "onnx-fp32"])
def test_close_frees_the_native_model_and_later_calls_raise(models: Models, name: str):
    session = open_pkg(models, name)
    native = weakref.ref(_native(session))
    feeds = session.example_inputs()
    session.run(feeds)
    session.close()
    gc.collect()
    assert native() is None, "the native interpreter is still referenced after close()"
    for call in (lambda: session.run(feeds), session.check_golden, session.example_inputs):
        with pytest.raises(SessionClosedError, match="digits-cnn version 1 is closed"):
            call()
    session.close()  # idempotent
    assert session.closed
    snap = session.stats_snapshot()  # statistics stay readable, drift too
    assert snap["requests"] == 1 and snap["inputs"]["image"]["drift"]["window"] == 1


@pytest.mark.parametrize("name", ["tflite-fp32", "onnx-fp32"])
def test_close_while_threads_run_lets_them_finish_then_refuses(models: Models, name: str):
    session = open_pkg(models, name)
    native = weakref.ref(_native(session))
    x = models.x_test[:1, None][0]
    succeeded = [0] * 4
    started = threading.Barrier(5)
    outcomes: list[BaseException] = []

    def work(t: int) -> None:
        started.wait()
        try:
            for _ in range(100_000):  # bounded: a session that never refuses must fail, not hang
                session.run(x)
                succeeded[t] += 1
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    started.wait()
    while sum(succeeded) < 200:  # let the threads get going
        threading.Event().wait(0.001)
    session.close()
    for t in threads:
        t.join()
    assert [type(e) for e in outcomes] == [SessionClosedError] * 4
    assert session.stats_snapshot()["requests"] == sum(succeeded)
    gc.collect()
    assert native() is None


# ---------------------------------------------------------------- pinned open of an installed slot


@pytest.fixture
def slot(models: Models, tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "slot"
    verified = unpack_package(models.package("tflite-fp32"), path, trusted_keys=models.trusted)
    return path, verified.digest


def test_pinned_slot_opens_without_hashing_and_runs(models: Models, slot: tuple[Path, str]):
    path, digest = slot
    with rt.open(path, trusted_keys=models.trusted, manifest_digest=digest) as session:
        assert session.check_golden().passed
        assert session.root == path


def test_same_size_flip_passes_the_pinned_open_but_not_a_rehash(models: Models, slot: tuple[Path, str]):
    path, digest = slot
    artifact = path / "model/digits.tflite"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    rt.open(path, trusted_keys=models.trusted, manifest_digest=digest).close()
    with pytest.raises(IntegrityError, match="SHA-256"):
        rt.open(path, trusted_keys=models.trusted, manifest_digest=digest, rehash=True)
    with pytest.raises(IntegrityError, match="SHA-256"):
        rt.open(path, trusted_keys=models.trusted)  # no digest: everything is hashed, as before


def test_a_package_file_must_carry_the_pinned_manifest(models: Models, slot: tuple[Path, str]):
    _, digest = slot
    with rt.open(models.package("tflite-fp32"), trusted_keys=models.trusted, manifest_digest=digest) as session:
        assert session.check_golden().passed
    with pytest.raises(IntegrityError, match="changed since the slot was installed"):
        rt.open(models.package("tflite-int8"), trusted_keys=models.trusted, manifest_digest=digest)
