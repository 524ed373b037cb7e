"""The Session: the one way edgeship runs a model, on every backend.

``edgeship.runtime.open`` verifies a package (hashes always, the signature unless the
caller turns it off explicitly; an installed slot pinned by its manifest digest is
checked by sizes only), checks the artifact's structure before a native interpreter
sees it, picks a backend, and returns a ``Session``. ``Session.run`` checks the caller's
inputs against the manifest, applies the manifest's numeric preprocessing and I/O
quantization, runs the backend, and records statistics.

Threads: ``run``, ``check_golden``, ``stats_snapshot`` and ``close`` may be called from
any number of threads at once. Input preparation and statistics run in the calling
thread (statistics under a lock of their own); the backend call is serialized by a
per-session lock unless the backend says its loaded model is thread-safe
(``LoadedModel.thread_safe``). ``close`` waits for runs already inside the session to
finish, then releases the native model; later calls raise ``SessionClosedError``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import ArtifactError, InputError, SessionClosedError, UsageError
from edgeship.runtime import artifact_checks
from edgeship.runtime.backends import builtin  # noqa: F401 - registers the built-in backends
from edgeship.runtime.backends.base import BackendOptions, LoadedModel, TensorInfo
from edgeship.runtime.backends.registry import select
from edgeship.runtime.golden import GoldenResult, compare, load_golden
from edgeship.runtime.io_plan import DTYPES, caller_dtype_name, input_plan, output_plan
from edgeship.runtime.package.directory import verify_directory
from edgeship.runtime.package.manifest import Manifest, TensorSpec
from edgeship.runtime.package.reader import unpack_package
from edgeship.runtime.package.signing import TrustedKeys, load_public_key
from edgeship.runtime.package.verify import DEFAULT_LIMITS, Limits, VerifiedManifest
from edgeship.runtime.stats import (
    Baseline,
    LatencyHistogram,
    TensorStats,
    channel_axis_for,
    drift,
    is_classifier_output,
)

Array = np.ndarray[Any, Any]
KeySource = TrustedKeys | Iterable["str | os.PathLike[str]"] | None


def open(
    source: str | os.PathLike[str],
    backend: str = "auto",
    *,
    trusted_keys: KeySource = None,
    verify_signature: bool = True,
    last_installed_version: int | None = None,
    threads: int | None = None,
    delegates: Iterable[str] = (),
    warmup: int = 0,
    raw: bool = False,
    stats: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
    manifest_digest: str | None = None,
    rehash: bool = False,
    **extra: Any,
) -> Session:
    """Open a package file (``.edgepkg``) or an unpacked package directory and return a ``Session``.

    Hashes are checked, except for a directory opened with ``manifest_digest``: the
    ``VerifiedManifest.digest`` recorded when that slot was installed. Then only
    ``manifest.json`` (which must hash to the digest) and ``manifest.sig`` are read, and the
    other files are checked by type and size, not hashed, unless ``rehash=True``. A package
    file opened with ``manifest_digest`` is fully verified and must carry that manifest.
    The signature is checked against ``trusted_keys`` (a ``TrustedKeys`` or paths of PEM
    public keys) unless ``verify_signature=False`` is passed explicitly. ``raw=True`` skips
    preprocessing and I/O quantization, so the caller passes and receives the model's own
    dtypes. ``warmup`` runs that many calls before returning (not counted in statistics).
    Backend-specific settings go in ``extra`` (LiteRT: ``pool=N`` keeps N interpreters so
    N threads run at once).

    Raises ``PackageError`` subclasses for a bad package or artifact (``IntegrityError``
    when the slot's manifest is not the pinned one), ``UsageError`` for bad options,
    ``BackendUnavailableError`` when nothing here can run the artifact, and
    ``ModelLoadError`` when the native library refuses it.
    """
    trusted = _trusted(trusted_keys, verify_signature)
    path = Path(source)
    tmp: str | None = None
    if path.is_dir():
        verified = verify_directory(
            path,
            trusted_keys=trusted,
            check_signature=verify_signature,
            last_installed_version=last_installed_version,
            limits=limits,
            manifest_digest=manifest_digest,
            rehash=rehash,
        )
        root = path
    else:
        tmp = tempfile.mkdtemp(prefix="edgeship-session-")
        root = Path(tmp) / "package"
        try:
            verified = unpack_package(
                path,
                root,
                trusted_keys=trusted,
                check_signature=verify_signature,
                last_installed_version=last_installed_version,
                limits=limits,
                durable=False,
                manifest_digest=manifest_digest,
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        return Session._load(
            verified,
            root,
            backend,
            BackendOptions(
                threads=threads,
                delegates=tuple(delegates),
                cache_dir=Path(cache_dir) if cache_dir is not None else None,
                extra=dict(extra),
            ),
            raw=raw,
            stats=stats,
            warmup=warmup,
            tmp=tmp,
        )
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_unpackaged(
    manifest: Manifest,
    root: str | os.PathLike[str],
    backend: str = "auto",
    *,
    threads: int | None = None,
    delegates: Iterable[str] = (),
    raw: bool = False,
    stats: bool = False,
    **extra: Any,
) -> Session:
    """Open an artifact that is not packaged yet: ``root / manifest.artifact_path`` with ``manifest``.

    For the compiler, which validates what it just built before it packages and signs it.
    Nothing is verified (there is nothing signed yet), the artifact's structure is still
    checked; never use this for files that came from elsewhere.
    """
    unsigned = VerifiedManifest(manifest, b"", b"", None)
    options = BackendOptions(threads=threads, delegates=tuple(delegates), extra=dict(extra))
    return Session._load(unsigned, Path(root), backend, options, raw=raw, stats=stats, warmup=0, tmp=None)


def _trusted(keys: KeySource, verify: bool) -> TrustedKeys | None:
    if not verify:
        return None
    if keys is None:
        raise UsageError(
            "no trusted keys: pass trusted_keys=[publisher.pub] (or verify_signature=False to skip the signature check)"
        )
    if isinstance(keys, TrustedKeys):
        return keys
    return TrustedKeys.of(load_public_key(p) for p in keys)


class Session:
    """A loaded model. Use ``run``; read ``inputs``/``outputs``; ``stats_snapshot()`` for statistics.

    Safe to share between threads (see the module docstring); ``close()`` releases the model.
    """

    def __init__(
        self,
        model: LoadedModel,
        manifest: Manifest,
        root: Path,
        backend_name: str,
        *,
        raw: bool,
        stats: bool,
        signed_by: str | None,
        tmp: str | None,
    ) -> None:
        self.manifest = manifest
        self.root = root
        self.backend_name = backend_name
        self.signed_by = signed_by
        self.raw = raw
        self.library = model.library
        self._model = model
        in_map = _bind("input", manifest.inputs, model.inputs)
        out_map = _bind("output", manifest.outputs, model.outputs)
        self._in_plans = [input_plan(spec, in_map[i], raw) for i, spec in enumerate(manifest.inputs)]
        self._out_plans = [output_plan(spec, out_map[i], raw) for i, spec in enumerate(manifest.outputs)]
        self._n_in = len(self._in_plans)
        self._single = self._in_plans[0] if self._n_in == 1 else None
        self._names = frozenset(p.name for p in self._in_plans)
        self.stats: RuntimeStats | None = RuntimeStats(self) if stats else None
        # Runs inside the session are counted under _gate_lock (a plain lock: cheap on the hot path);
        # close() waits on _gate, a condition over the same lock, until none is left.
        self._gate_lock = threading.Lock()
        self._gate = threading.Condition(self._gate_lock)
        self._active = 0
        self._closed = False
        self._model_lock = None if model.thread_safe else threading.Lock()
        self._finalizer = weakref.finalize(self, _cleanup, model, tmp)

    @classmethod
    def _load(
        cls,
        verified: VerifiedManifest,
        root: Path,
        requested: str,
        options: BackendOptions,
        *,
        raw: bool,
        stats: bool,
        warmup: int,
        tmp: str | None,
    ) -> Session:
        manifest = verified.manifest
        artifact = root / manifest.artifact_path
        artifact_checks.check_artifact(manifest.format, artifact)
        backend = select(manifest.format, requested)
        model = backend.load(artifact, manifest, options)
        session = cls(model, manifest, root, backend.name, raw=raw, stats=stats, signed_by=verified.signed_by, tmp=tmp)
        if warmup:
            feeds = session.example_inputs()
            for _ in range(warmup):
                session._run(feeds, None)
        return session

    # ------------------------------------------------------------------ description

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        """Inputs as the caller passes them: names, shapes (None = dynamic) and dtypes."""
        return tuple(TensorInfo(p.name, p.caller_shape, np.dtype(caller_dtype_name(p))) for p in self._in_plans)

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        """Outputs as ``run`` returns them."""
        return tuple(
            TensorInfo(p.name, spec.shape, np.dtype(caller_dtype_name(p)))
            for p, spec in zip(self._out_plans, self.manifest.outputs)
        )

    @property
    def thread_safe(self) -> bool:
        """Whether the backend runs calls of this session concurrently (else the session serializes them)."""
        return self._model_lock is None

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, Array]:
        """Inputs to exercise the model: the first golden case when the package has one, else random values.

        Raises ``SessionClosedError`` after ``close()`` (a package file's unpacked copy is gone then).
        """
        if self._closed:
            raise self._closed_error()
        if self.manifest.golden is not None:
            cases = load_golden((self.root / self.manifest.golden.path).read_bytes(), self.manifest)
            if cases:
                feeds = dict(cases[0].inputs)
                if batch != 1:
                    for info in self.inputs:
                        if not info.shape or info.shape[0] is not None:
                            raise UsageError(
                                f"input {info.name!r} has a fixed batch dimension; cannot run batch {batch}"
                            )
                        reps = -(-batch // feeds[info.name].shape[0])
                        feeds[info.name] = np.concatenate([feeds[info.name]] * reps)[:batch]
                return feeds
        rng = np.random.default_rng(seed)
        out = {}
        for info in self.inputs:
            shape = tuple(batch if d is None else d for d in info.shape)
            if info.dtype.kind == "f":
                out[info.name] = rng.standard_normal(shape).astype(info.dtype)
            elif info.dtype.kind in "iu":
                out[info.name] = rng.integers(0, 2, size=shape).astype(info.dtype)
            else:
                out[info.name] = np.zeros(shape, info.dtype)
        return out

    # ------------------------------------------------------------------ running

    def run(self, inputs: Mapping[str, Any] | Array) -> dict[str, Array]:
        """Run the model once and return its outputs by name. Safe to call from many threads at once.

        ``inputs`` is a dict by input name, or a single array for a one-input model.
        Raises ``InputError`` naming a missing, unexpected or wrongly shaped/typed input,
        ``SessionClosedError`` after ``close()``, and whatever the backend raises
        (``ModelLoadError`` and the like; counted as an error in the statistics).
        """
        return self._run(inputs, self.stats)

    def _run(self, inputs: Mapping[str, Any] | Array, stats: RuntimeStats | None) -> dict[str, Array]:
        """``run``, recording into ``stats`` (None: record nothing, for golden checks and warm-up)."""
        start = time.perf_counter()
        with self._gate_lock:
            if self._closed:
                raise self._closed_error()
            self._active += 1
        try:
            feeds: list[Array] = [None] * self._n_in  # type: ignore[list-item]
            try:
                if isinstance(inputs, np.ndarray):
                    if self._single is None:
                        raise InputError(
                            f"this model has {self._n_in} inputs ({', '.join(sorted(self._names))}); "
                            "pass a dict by name"
                        )
                    feeds[self._single.index] = self._single.prepare(inputs)
                else:
                    if len(inputs) != self._n_in or not self._names.issuperset(inputs):
                        self._explain_names(inputs)
                    for plan in self._in_plans:
                        feeds[plan.index] = plan.prepare(inputs[plan.name])
            except Exception:  # InputError, or an object numpy cannot make an array of
                if stats is not None:
                    stats.reject()
                raise
            try:
                if self._model_lock is None:
                    outs = self._model.run(feeds)
                else:
                    with self._model_lock:
                        outs = self._model.run(feeds)
            except BaseException:
                if stats is not None:
                    stats.fail()
                raise
            result = {p.name: p.finish(outs[p.index]) for p in self._out_plans}
            if stats is not None:
                stats.record(time.perf_counter() - start, inputs, result)
            return result
        finally:
            with self._gate_lock:
                self._active -= 1
                if self._closed and not self._active:
                    self._gate.notify_all()

    def _explain_names(self, inputs: Mapping[str, Any]) -> None:
        given = set(inputs)
        missing = sorted(self._names - given)
        extra = sorted(given - self._names)
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unexpected {', '.join(map(repr, extra))}")
        raise InputError(
            f"wrong input names: {'; '.join(parts)} (the model takes {', '.join(map(repr, sorted(self._names)))})"
        )

    def _closed_error(self) -> SessionClosedError:
        m = self.manifest
        return SessionClosedError(
            f"the session of model {m.name} version {m.version} is closed; open the package again to run it"
        )

    def check_golden(self) -> GoldenResult:
        """Run the package's golden vectors and compare; statistics are not touched, for any caller.

        Raises ``ArtifactError`` when the package has no golden vectors or they are malformed,
        ``SessionClosedError`` after ``close()``.
        """
        if self._closed:
            raise self._closed_error()
        golden = self.manifest.golden
        if golden is None:
            raise ArtifactError(f"package {self.manifest.name} has no golden vectors")
        cases = load_golden((self.root / golden.path).read_bytes(), self.manifest)
        worst_abs, worst_cos, failures = 0.0, 1.0, []
        for i, case in enumerate(cases):
            actual = self._run(case.inputs, None)
            abs_err, cos, fails = compare(actual, case, golden)
            worst_abs, worst_cos = max(worst_abs, abs_err), min(worst_cos, cos)
            failures += [f"case {i}: {f}" for f in fails]
        return GoldenResult(len(cases), not failures, worst_abs, worst_cos, tuple(failures))

    def stats_snapshot(self, reset: bool = False) -> dict[str, Any]:
        """Latency, request counters, input/output statistics and drift scores (drift is computed now, on read).

        One consistent snapshot, taken under the statistics lock. ``reset=True`` then starts
        a new window: the latency histogram, the counters and the running statistics per
        tensor restart, while the per-sample ring buffers that drift is computed from (the
        last 1,024 samples) are kept. Works after ``close()`` too. Raises ``UsageError``
        when the session was opened with ``stats=False``.
        """
        if self.stats is None:
            raise UsageError("statistics are off for this session (opened with stats=False)")
        return self.stats.snapshot(reset=reset)

    def close(self) -> None:
        """Release the native model and the temporary unpacked files (if the session made them).

        Idempotent and safe while other threads are inside ``run``: those runs finish first
        (``close`` waits for them), later calls raise ``SessionClosedError``.
        """
        with self._gate:
            self._closed = True
            while self._active:
                self._gate.wait()
        if self.stats is not None:
            self.stats.load_baseline()  # drift stays readable: a package file's unpacked copy goes next
        self._finalizer()
        # Drop the session's own reference too, so the native model is freed now, not when the
        # session object is.
        self._model = _ClosedModel(self._model.inputs, self._model.outputs)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ClosedModel(LoadedModel):
    """Stands in for a released model; the session never calls it (its gate refuses runs first)."""

    def __init__(self, inputs: tuple[TensorInfo, ...], outputs: tuple[TensorInfo, ...]) -> None:
        self.inputs = inputs
        self.outputs = outputs

    def run(self, feeds: Sequence[Array]) -> list[Array]:
        raise SessionClosedError("this model was closed")


def _cleanup(model: LoadedModel, tmp: str | None) -> None:
    model.close()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def _bind(kind: str, specs: tuple[TensorSpec, ...], native: tuple[TensorInfo, ...]) -> list[int]:
    """Map manifest tensors to native ones: by name when every name matches, else by position.

    Raises ``ArtifactError`` when counts, dtypes or fixed dimensions disagree.
    """
    if len(specs) != len(native):
        raise ArtifactError(f"the manifest lists {len(specs)} {kind}s but the model has {len(native)}")
    names = {t.name: i for i, t in enumerate(native)}
    mapping = [names[s.name] for s in specs] if all(s.name in names for s in specs) else list(range(len(specs)))
    for spec, index in zip(specs, mapping):
        info = native[index]
        if DTYPES[spec.dtype] != info.dtype:
            raise ArtifactError(
                f"the manifest says {kind} {spec.name!r} is {spec.dtype} but the model has {info.dtype}"
            )
        if len(spec.shape) != len(info.shape) or any(
            a is not None and b is not None and a != b for a, b in zip(spec.shape, info.shape)
        ):
            raise ArtifactError(
                f"the manifest says {kind} {spec.name!r} has shape {list(spec.shape)} but the model has {list(info.shape)}"
            )
    return mapping


class RuntimeStats:
    """Statistics of a session: request counters, a latency histogram, running statistics per input and output.

    Every method takes the statistics lock, so calls from many threads fold in one by one
    and a snapshot sees all of a call or none of it. Counters: ``requests`` (every call
    to ``run``) = latency calls (succeeded) + ``errors`` (the backend raised) +
    ``rejected`` (bad inputs, refused before the backend).
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        self._lock = threading.Lock()
        self.latency = LatencyHistogram()
        self.requests = 0
        self.errors = 0
        self.rejected = 0
        self.window_start = time.monotonic()
        self.inputs = {spec.name: _tensor_stats(spec) for spec in session.manifest.inputs}
        self.outputs = {spec.name: _tensor_stats(spec) for spec in session.manifest.outputs}
        self._in_items = list(self.inputs.items())
        self._out_items = list(self.outputs.items())
        self._single_in = self._in_items[0][1] if len(self._in_items) == 1 else None
        self._baseline: Baseline | bool | None = False  # False: not read yet

    def record(self, seconds: float, inputs: Mapping[str, Any] | Array, outputs: Mapping[str, Array]) -> None:
        """Fold one successful call into the statistics (O(size of the tensors), constant in history)."""
        with self._lock:
            self.requests += 1
            self.latency.add(seconds)
            if isinstance(inputs, np.ndarray):
                if self._single_in is not None:
                    self._single_in.update(inputs)
            else:
                for name, tensor in self._in_items:
                    value = inputs[name]
                    tensor.update(value if isinstance(value, np.ndarray) else np.asarray(value))
            for name, tensor in self._out_items:
                tensor.update(outputs[name])

    def fail(self) -> None:
        """Count a call whose backend raised."""
        with self._lock:
            self.requests += 1
            self.errors += 1

    def reject(self) -> None:
        """Count a call refused for its inputs before the backend ran."""
        with self._lock:
            self.requests += 1
            self.rejected += 1

    def load_baseline(self) -> None:
        """Read the package's drift baseline now, if it was not read yet (before its files go away)."""
        with self._lock:
            self.baseline()

    def baseline(self) -> Baseline | None:
        """The package's drift baseline, read on first use; None when it has none or it is unreadable."""
        if self._baseline is False:
            path = self._session.manifest.baseline_path
            self._baseline = None
            if path is not None:
                try:
                    self._baseline = Baseline.from_bytes((self._session.root / path).read_bytes())
                except (ValueError, OSError, KeyError):
                    self._baseline = None
        return self._baseline if isinstance(self._baseline, Baseline) else None

    def snapshot(self, reset: bool = False) -> dict[str, Any]:
        """Everything as one consistent dict; ``reset`` then starts a new window (see ``Session.stats_snapshot``)."""
        with self._lock:
            base = self.baseline()
            now = time.monotonic()
            out: dict[str, Any] = {
                "requests": self.requests,
                "errors": self.errors,
                "rejected": self.rejected,
                "window_s": now - self.window_start,
                "latency": self.latency.summary(),
                "inputs": {},
                "outputs": {},
            }
            for kind, tensors, base_map in (
                ("inputs", self.inputs, base.inputs if base else {}),
                ("outputs", self.outputs, base.outputs if base else {}),
            ):
                for name, tensor in tensors.items():
                    entry = tensor.summary()
                    if name in base_map:
                        entry["drift"] = drift(tensor, base_map[name])
                    out[kind][name] = entry
            if reset:
                self.latency = LatencyHistogram()
                self.requests = self.errors = self.rejected = 0
                self.window_start = now
                for tensor in (*self.inputs.values(), *self.outputs.values()):
                    tensor.reset_window()
        return out


def _tensor_stats(spec: TensorSpec) -> TensorStats:
    axis = channel_axis_for(spec.shape)
    channels = 1
    if axis is not None:
        dim = spec.shape[axis]
        channels = dim if dim is not None else 1
        if dim is None:
            axis = None
    return TensorStats(spec.name, axis, channels, classifier=is_classifier_output(spec.shape))
