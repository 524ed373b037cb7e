"""TensorRT backend: build an engine on the device from a Q/DQ ONNX graph, cache it, run it.

A ``tensorrt-onnx`` package holds an ONNX graph with explicit symmetric Q/DQ nodes
and, next to it, ``build_spec.json`` (``BuildSpec``). Engines are tied to the GPU
architecture and the TensorRT version, so the device builds the engine itself on
first load and keeps it in an engine cache.

The module has two halves:

* Pure logic, testable without TensorRT: ``BuildSpec`` parsing and validation,
  version comparison, ``EngineCacheKey`` and its digest, the decision whether a
  cached engine may be used (``judge_cache_entry``), the load-or-rebuild policy
  (``load_or_build``), and the checks of optimization profiles against the network.
* The library boundary: every ``tensorrt`` and ``cuda`` (cuda-python) import happens
  inside a function, never at module import, so ``edgeship.runtime`` imports on any
  machine. Device memory is handled by one small class, ``_DeviceBuffers``.

Engine cache invariants (``EngineCache``):

* Layout: ``<cache_dir>/<digest>.engine`` and ``<digest>.json`` (the key that built it).
* Each file is written atomically (temp file, fsync, rename); the key is written after
  the engine, so a key file vouches for a complete engine.
* A cached engine is used only when its key file exists, parses, and equals the current
  key in every field. Otherwise it is deleted (with a warning) and rebuilt.
* A cached engine TensorRT cannot deserialize is deleted and rebuilt once; if the fresh
  engine cannot be deserialized either, ``ModelLoadError``.
* The cache is not a trust boundary: a key file says what an engine was built for, it
  does not authenticate it. The cache directory is created private to its user (0700).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import numpy as np

from edgeship.errors import ArtifactError, BackendUnavailableError, InputError, ModelLoadError
from edgeship.runtime.backends.base import Backend, BackendOptions, LoadedModel, TensorInfo
from edgeship.runtime.package.manifest import Manifest

log = logging.getLogger(__name__)

BUILD_SPEC_NAME = "build_spec.json"
DEFAULT_CACHE_DIR = Path("~/.cache/edgeship/engines")
PRECISIONS = ("fp16", "int8", "fp32")
_PACKAGE_METADATA = frozenset({"manifest.json", "manifest.sig"})

TENSORRT_MISSING = (
    "the tensorrt Python package is not installed (JetPack ships it: sudo apt-get install python3-libnvinfer; "
    "a venv must be created with --system-site-packages to see it)"
)
CUDA_PYTHON_MISSING = (
    "the cuda-python package is not installed (pip install 'cuda-python>=12,<13' on JetPack 6; "
    "its major version must match the installed CUDA)"
)


# --------------------------------------------------------------------------------------
# Build spec (pure)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeRange:
    """The shapes one input may take under an optimization profile; ``min <= opt <= max`` elementwise."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def contains(self, shape: Sequence[int]) -> bool:
        """True when ``shape`` has this range's rank and lies within ``min``..``max`` in every dimension."""
        return len(shape) == len(self.min) and all(
            lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max, strict=True)
        )


@dataclass(frozen=True)
class OptimizationProfile:
    """One TensorRT optimization profile: a shape range for each dynamic input it covers."""

    inputs: tuple[ShapeRange, ...]

    def range_for(self, name: str) -> ShapeRange | None:
        """The range this profile gives input ``name``, or None."""
        return next((r for r in self.inputs if r.name == name), None)


@dataclass(frozen=True)
class BuildSpec:
    """How the device builds its engine, read from ``build_spec.json`` beside the ONNX graph.

    ``precision``: "fp32", "fp16" or "int8" (int8 also allows fp16 kernels as a fallback).
    ``min_tensorrt_version``: oldest TensorRT the package was validated with, e.g. "10.0".
    ``workspace_mib``: builder workspace memory pool limit in MiB (> 0).
    ``optimization_profiles``: shape ranges for dynamic inputs; empty for static graphs.
    ``dla_core``: run on this DLA core (Jetson AGX/NX Orin) instead of the GPU; None for GPU.
    ``allow_gpu_fallback``: with a DLA core, run layers the DLA cannot on the GPU.
    ``sparsity_2_4``: let TensorRT use 2:4 structured-sparse kernels where weights allow.
    ``builder_optimization_level``: 0 (fast build) .. 5 (slow build, best engine); default 3.
    """

    precision: str
    min_tensorrt_version: str
    workspace_mib: int
    optimization_profiles: tuple[OptimizationProfile, ...] = ()
    dla_core: int | None = None
    allow_gpu_fallback: bool = False
    sparsity_2_4: bool = False
    builder_optimization_level: int = 3

    REQUIRED: ClassVar[tuple[str, ...]] = ("precision", "min_tensorrt_version", "workspace_mib")

    @classmethod
    def from_json(cls, data: bytes | str) -> BuildSpec:
        """Parse and validate ``build_spec.json``; raise ``ArtifactError`` naming the first bad field."""
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else data
            obj = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ArtifactError(f"{BUILD_SPEC_NAME} is not valid UTF-8 JSON: {exc}") from None
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: Any) -> BuildSpec:
        """Validate decoded JSON and build a spec; raise ``ArtifactError`` naming the first bad field."""
        if not isinstance(obj, dict):
            raise _spec_error("(top level)", f"must be a JSON object, got {type(obj).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in obj if k not in known)
        if unknown:
            raise _spec_error(unknown[0], f"is not a known key (known: {', '.join(sorted(known))})")
        for key in cls.REQUIRED:
            if key not in obj:
                raise _spec_error(key, "is required")

        precision = obj["precision"]
        if precision not in PRECISIONS:
            raise _spec_error("precision", f"must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        version = obj["min_tensorrt_version"]
        if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
            raise _spec_error("min_tensorrt_version", f'must be a version string like "10.0"; got {version!r}')
        workspace = obj["workspace_mib"]
        if not _is_int(workspace) or workspace <= 0:
            raise _spec_error("workspace_mib", f"must be an integer > 0; got {workspace!r}")
        profiles = _parse_profiles(obj.get("optimization_profiles", []))
        dla_core = obj.get("dla_core")
        if dla_core is not None and (not _is_int(dla_core) or dla_core < 0):
            raise _spec_error("dla_core", f"must be null or an integer >= 0; got {dla_core!r}")
        if dla_core is not None and precision == "fp32":
            raise _spec_error("dla_core", "needs precision fp16 or int8 (the DLA does not run fp32)")
        flags: dict[str, bool] = {}
        for key in ("allow_gpu_fallback", "sparsity_2_4"):
            value = obj.get(key, False)
            if not isinstance(value, bool):
                raise _spec_error(key, f"must be true or false; got {value!r}")
            flags[key] = value
        level = obj.get("builder_optimization_level", 3)
        if not _is_int(level) or not 0 <= level <= 5:
            raise _spec_error("builder_optimization_level", f"must be an integer from 0 to 5; got {level!r}")
        return cls(
            precision=precision,
            min_tensorrt_version=version,
            workspace_mib=workspace,
            optimization_profiles=profiles,
            dla_core=dla_core,
            allow_gpu_fallback=flags["allow_gpu_fallback"],
            sparsity_2_4=flags["sparsity_2_4"],
            builder_optimization_level=level,
        )

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data, every key present."""
        return {
            "precision": self.precision,
            "min_tensorrt_version": self.min_tensorrt_version,
            "workspace_mib": self.workspace_mib,
            "optimization_profiles": [
                {r.name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for r in p.inputs}
                for p in self.optimization_profiles
            ],
            "dla_core": self.dla_core,
            "allow_gpu_fallback": self.allow_gpu_fallback,
            "sparsity_2_4": self.sparsity_2_4,
            "builder_optimization_level": self.builder_optimization_level,
        }

    def to_json(self) -> bytes:
        """Canonical bytes (UTF-8, sorted keys, no spaces): ``from_json(spec.to_json()) == spec``."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")

    def sha256(self) -> str:
        """Hex SHA-256 of the canonical bytes: equal for specs that mean the same, whatever their layout."""
        return hashlib.sha256(self.to_json()).hexdigest()


_VERSION_RE = re.compile(r"\d+(\.\d+){0,3}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _spec_error(field: str, problem: str) -> ArtifactError:
    return ArtifactError(f"{BUILD_SPEC_NAME}: {field} {problem}")


def _parse_profiles(value: object) -> tuple[OptimizationProfile, ...]:
    field = "optimization_profiles"
    if not isinstance(value, list):
        raise _spec_error(field, f"must be a list of objects; got {type(value).__name__}")
    profiles: list[OptimizationProfile] = []
    for i, profile in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(profile, dict) or not profile:
            raise _spec_error(where, "must be a non-empty object mapping input names to {min, opt, max}")
        ranges: list[ShapeRange] = []
        for name, shapes in profile.items():
            at = f"{where}.{name}"
            if not name:
                raise _spec_error(where, "has an empty input name")
            if not isinstance(shapes, dict):
                raise _spec_error(at, "must be an object with keys min, opt, max")
            extra = sorted(set(shapes) - {"min", "opt", "max"})
            if extra:
                raise _spec_error(f"{at}.{extra[0]}", "is not a known key (known: max, min, opt)")
            dims: dict[str, tuple[int, ...]] = {}
            for key in ("min", "opt", "max"):
                dim = shapes.get(key)
                if not isinstance(dim, list) or not all(_is_int(d) and d >= 0 for d in dim):
                    raise _spec_error(f"{at}.{key}", f"must be a list of integers >= 0; got {dim!r}")
                dims[key] = tuple(dim)
            if not len(dims["min"]) == len(dims["opt"]) == len(dims["max"]):
                raise _spec_error(
                    at, f"min, opt and max must have equal ranks; got {dims['min']}, {dims['opt']}, {dims['max']}"
                )
            if not all(lo <= o <= hi for lo, o, hi in zip(dims["min"], dims["opt"], dims["max"], strict=True)):
                raise _spec_error(
                    at,
                    f"must satisfy min <= opt <= max in every dimension; got {dims['min']}, {dims['opt']}, {dims['max']}",
                )
            ranges.append(ShapeRange(name, dims["min"], dims["opt"], dims["max"]))
        profiles.append(OptimizationProfile(tuple(ranges)))
    if profiles:
        names = [sorted(r.name for r in p.inputs) for p in profiles]
        for i, these in enumerate(names[1:], start=1):
            if these != names[0]:
                raise _spec_error(
                    f"{field}[{i}]",
                    f"covers inputs {these} but {field}[0] covers {names[0]}; every profile must cover the same inputs",
                )
    return tuple(profiles)


def precision_flags(precision: str) -> tuple[str, ...]:
    """Names of the ``trt.BuilderFlag`` members a precision needs (int8 keeps fp16 as a fallback)."""
    return {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}[precision]


# --------------------------------------------------------------------------------------
# Versions (pure)
# --------------------------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, ...]:
    """The leading numeric components of a version: "10.3.0.30" -> (10, 3, 0, 30), "10.0.0b6" -> (10, 0, 0).

    Raises ``ValueError`` when ``text`` does not start with a number.
    """
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    if match is None:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def version_at_least(installed: str, required: str) -> bool:
    """True when ``installed`` >= ``required``, comparing numerically with missing parts as 0 ("10" == "10.0")."""
    have, need = parse_version(installed), parse_version(required)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def check_tensorrt_version(installed: str, required: str) -> None:
    """Raise ``ModelLoadError`` naming both versions when the installed TensorRT is older than required."""
    if not version_at_least(installed, required):
        raise ModelLoadError(
            f"this package needs TensorRT >= {required}, but TensorRT {installed} is installed; "
            "upgrade JetPack/TensorRT on the device or compile the package for this TensorRT"
        )


# --------------------------------------------------------------------------------------
# Engine cache (files, no TensorRT)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineCacheKey:
    """Everything an engine depends on. Any difference means the engine must not be reused.

    ``gpu_name``: CUDA device name ("Orin"); ``compute_capability``: "8.7";
    ``tensorrt_version``: ``trt.__version__``; ``package_sha256``: ``package_sha256()`` of the
    artifact; ``spec_sha256``: ``BuildSpec.sha256()``.
    """

    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    package_sha256: str
    spec_sha256: str

    def to_json(self) -> bytes:
        """Canonical bytes: UTF-8 JSON, sorted keys, no spaces."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> EngineCacheKey:
        """Parse a stored key; raise ``ValueError`` unless it has exactly this class's fields, all strings."""
        obj = json.loads(data.decode("utf-8"))
        names = [f.name for f in fields(cls)]
        if not isinstance(obj, dict) or sorted(obj) != sorted(names):
            raise ValueError(f"a cache key has exactly the fields {', '.join(names)}")
        if not all(isinstance(obj[n], str) for n in names):
            raise ValueError("every cache key field is a string")
        return cls(**obj)

    def digest(self) -> str:
        """Hex SHA-256 of ``to_json()``: the same in every process and Python version."""
        return hashlib.sha256(self.to_json()).hexdigest()

    def differences(self, other: EngineCacheKey) -> list[str]:
        """``"field: other -> self"`` for every field where ``other`` differs from this key."""
        return [
            f"{f.name}: {getattr(other, f.name)!r} -> {getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(other, f.name) != getattr(self, f.name)
        ]


def package_sha256(artifact: Path) -> str:
    """Hex SHA-256 over what an engine is built from: the ONNX file and every regular file beside it.

    That is the graph, ``build_spec.json`` and external weights (``model.onnx.data``); the
    package's ``manifest.json`` and ``manifest.sig`` are left out, so re-signing or renumbering
    a package with the same model keeps its engine. Names and contents both count.
    Raises ``OSError`` when a file cannot be read.
    """
    digest = hashlib.sha256()
    files = sorted(p for p in artifact.parent.iterdir() if p.is_file() and p.name not in _PACKAGE_METADATA)
    for path in files:
        name = path.name.encode("utf-8", "surrogateescape")
        digest.update(len(name).to_bytes(8, "big") + name + path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class CacheState(enum.Enum):
    MISS = "miss"
    """No cached engine: build one."""
    HIT = "hit"
    """A cached engine whose key equals the current key: deserialize it."""
    REFUSED = "refused"
    """A cached engine whose key is missing, unreadable or different: delete it and build."""


@dataclass(frozen=True)
class CacheVerdict:
    state: CacheState
    reason: str = ""


def judge_cache_entry(current: EngineCacheKey, engine_present: bool, stored_key: bytes | None) -> CacheVerdict:
    """Decide whether a cached engine may be used, from what is on disk. Pure: no I/O, never raises."""
    if not engine_present:
        return CacheVerdict(CacheState.MISS)
    if stored_key is None:
        return CacheVerdict(CacheState.REFUSED, "its key file is missing (an interrupted write?)")
    try:
        stored = EngineCacheKey.from_json(stored_key)
    except (ValueError, UnicodeDecodeError, TypeError) as exc:
        return CacheVerdict(CacheState.REFUSED, f"its key file is unreadable ({exc})")
    changed = current.differences(stored)
    if changed:
        return CacheVerdict(CacheState.REFUSED, "it was built for a different key (" + "; ".join(changed) + ")")
    return CacheVerdict(CacheState.HIT)


class EngineCache:
    """Serialized engines on disk under ``directory``, named by ``EngineCacheKey.digest()``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def engine_path(self, key: EngineCacheKey) -> Path:
        return self.directory / f"{key.digest()}.engine"

    def key_path(self, key: EngineCacheKey) -> Path:
        return self.directory / f"{key.digest()}.json"

    def lookup(self, key: EngineCacheKey) -> CacheVerdict:
        """Judge the entry for ``key`` (see ``judge_cache_entry``). Unreadable files count as absent."""
        engine_present = self.engine_path(key).is_file()
        try:
            stored: bytes | None = self.key_path(key).read_bytes()
        except OSError:
            stored = None
        return judge_cache_entry(key, engine_present, stored)

    def read_engine(self, key: EngineCacheKey) -> bytes:
        """The cached engine's bytes. Raises ``OSError`` when it cannot be read."""
        return self.engine_path(key).read_bytes()

    def store(self, key: EngineCacheKey, engine: bytes) -> None:
        """Write the engine, then its key, each atomically. Raises ``OSError`` (disk full, read-only)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_atomic(self.engine_path(key), engine)
        _write_atomic(self.key_path(key), key.to_json())
        _fsync_dir(self.directory)

    def discard(self, key: EngineCacheKey) -> None:
        """Delete the entry for ``key``, key first so a half-deleted entry is never judged a hit."""
        for path in (self.key_path(key), self.engine_path(key)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(directory: Path) -> None:
    # Makes the renames durable across power loss; some file systems cannot fsync a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


Engine = TypeVar("Engine")


def load_or_build(
    cache: EngineCache,
    key: EngineCacheKey,
    build: Callable[[], bytes],
    deserialize: Callable[[bytes], Engine | None],
) -> Engine:
    """Return a deserialized engine for ``key``: from the cache when it may be used, else freshly built.

    A refused entry is deleted before building. A cached engine that ``deserialize`` rejects
    (raises, or returns None) is deleted and rebuilt once. A freshly built engine is cached
    (a failure to cache only logs a warning); if it cannot be deserialized, its entry is
    deleted and ``ModelLoadError`` raised. Errors from ``build`` propagate.
    """
    verdict = cache.lookup(key)
    if verdict.state is CacheState.REFUSED:
        log.warning(
            "refusing cached TensorRT engine %s: %s; deleting it and rebuilding", cache.engine_path(key), verdict.reason
        )
        cache.discard(key)
    elif verdict.state is CacheState.HIT:
        try:
            engine, problem = _deserialize(deserialize, cache.read_engine(key))
        except OSError as exc:
            engine, problem = None, f"it could not be read ({exc})"
        if engine is not None:
            log.info("using cached TensorRT engine %s", cache.engine_path(key))
            return engine
        log.warning(
            "cached TensorRT engine %s failed to load: %s; deleting it and rebuilding once",
            cache.engine_path(key),
            problem,
        )
        cache.discard(key)

    log.info("building TensorRT engine for %s (this can take minutes on a Jetson)", cache.engine_path(key).name)
    plan = build()
    try:
        cache.store(key, plan)
    except OSError as exc:
        log.warning(
            "could not cache the TensorRT engine in %s (%s); it will be rebuilt on the next load", cache.directory, exc
        )
    engine, problem = _deserialize(deserialize, plan)
    if engine is None:
        cache.discard(key)
        raise ModelLoadError(f"TensorRT built an engine but could not load it: {problem}")
    return engine


def _deserialize(deserialize: Callable[[bytes], Engine | None], plan: bytes) -> tuple[Engine | None, str]:
    try:
        engine = deserialize(plan)
    except Exception as exc:  # any native failure means "not loadable"; the caller rebuilds or raises
        return None, f"{type(exc).__name__}: {exc}"
    return engine, "" if engine is not None else "deserialize_cuda_engine returned no engine"


# --------------------------------------------------------------------------------------
# Shapes and optimization profiles (pure)
# --------------------------------------------------------------------------------------


def check_network_inputs(inputs: Mapping[str, Sequence[int]], profiles: Sequence[OptimizationProfile]) -> None:
    """Check the spec's profiles against the parsed network's inputs (``-1`` marks a dynamic dimension).

    Raises ``ModelLoadError`` when a profile names an input the network lacks, has another rank,
    contradicts a static dimension, or when a dynamic input is missing from a profile.
    """
    for i, profile in enumerate(profiles):
        for r in profile.inputs:
            if r.name not in inputs:
                raise ModelLoadError(
                    f"{BUILD_SPEC_NAME} optimization_profiles[{i}] names input {r.name!r}, which the ONNX graph "
                    f"does not have (inputs: {', '.join(inputs)})"
                )
            shape = tuple(inputs[r.name])
            if len(shape) != len(r.min):
                raise ModelLoadError(
                    f"{BUILD_SPEC_NAME} optimization_profiles[{i}] gives input {r.name!r} rank {len(r.min)}, "
                    f"but the graph's input has shape {shape}"
                )
            for axis, dim in enumerate(shape):
                if dim >= 0 and not r.min[axis] == r.max[axis] == dim:
                    raise ModelLoadError(
                        f"{BUILD_SPEC_NAME} optimization_profiles[{i}] lets input {r.name!r} vary in dimension "
                        f"{axis}, which the graph fixes at {dim} (shape {shape})"
                    )
    for name, dims in inputs.items():
        if any(d < 0 for d in dims):
            if not profiles:
                raise ModelLoadError(
                    f"input {name!r} has dynamic shape {tuple(dims)}, but {BUILD_SPEC_NAME} has no "
                    "optimization_profiles; add one giving its min, opt and max shapes"
                )
            for i, profile in enumerate(profiles):
                if profile.range_for(name) is None:
                    raise ModelLoadError(
                        f"input {name!r} has dynamic shape {tuple(dims)}, but {BUILD_SPEC_NAME} "
                        f"optimization_profiles[{i}] gives no range for it"
                    )


def choose_profile(profiles: Sequence[OptimizationProfile], shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Index of the first profile whose ranges hold every given input shape; 0 without profiles; None if none fits."""
    if not profiles:
        return 0
    for i, profile in enumerate(profiles):
        if all(r.contains(shapes[r.name]) for r in profile.inputs if r.name in shapes):
            return i
    return None


def describe_profiles(profiles: Sequence[OptimizationProfile], name: str) -> str:
    """The ranges the profiles allow for input ``name``, for error messages."""
    ranges = [r for p in profiles if (r := p.range_for(name)) is not None]
    return " or ".join(f"{list(r.min)}..{list(r.max)}" for r in ranges) or "its static shape"


# --------------------------------------------------------------------------------------
# Library boundary: everything below imports tensorrt or cuda-python lazily
# --------------------------------------------------------------------------------------


def _import_tensorrt() -> ModuleType:
    return importlib.import_module("tensorrt")


def _import_cudart() -> ModuleType:
    try:
        return importlib.import_module("cuda.bindings.runtime")  # cuda-python >= 12.6
    except ImportError:
        return importlib.import_module("cuda.cudart")  # older cuda-python


def _cuda_python_installed() -> bool:
    if importlib.util.find_spec("cuda") is None:
        return False
    return any(importlib.util.find_spec(name) is not None for name in ("cuda.bindings", "cuda.cudart"))


def _cuda_check(cudart: ModuleType, result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(error, *values)`` result; raise ``ModelLoadError`` unless it succeeded."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(error)[1]
        raise ModelLoadError(f"CUDA {what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else None


def _cuda_device_problem() -> str | None:
    """None when a CUDA device is visible; otherwise why not, in one line. Never raises."""
    try:
        cudart = _import_cudart()
        error, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # a broken cuda-python or driver install is a reason, not a crash
        return f"cuda-python cannot query CUDA devices ({type(exc).__name__}: {exc}); check the CUDA and driver install"
    if error != cudart.cudaError_t.cudaSuccess or count < 1:
        name = cudart.cudaGetErrorName(error)[1] if error != cudart.cudaError_t.cudaSuccess else b"0 devices"
        return (
            f"no CUDA device is visible ({name.decode() if isinstance(name, bytes) else name}); check the NVIDIA "
            "driver, that this user is in the 'video' group, and in Docker run with --runtime nvidia"
        )
    return None


def _cuda_device_identity(cudart: ModuleType) -> tuple[str, str]:
    """Name and compute capability ("8.7") of the current CUDA device."""
    device = _cuda_check(cudart, cudart.cudaGetDevice(), "cudaGetDevice")
    props = _cuda_check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    raw = props.name
    name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"


class _DeviceBuffers:
    """All device memory of one loaded model: a CUDA stream and one growable buffer per I/O tensor."""

    def __init__(self, cudart: ModuleType) -> None:
        self._rt = cudart
        self._stream = _cuda_check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, capacity in bytes)

    @property
    def stream_handle(self) -> int:
        return int(self._stream)

    def reserve(self, name: str, nbytes: int) -> int:
        """A device pointer for tensor ``name`` with at least ``nbytes`` bytes (reallocated when too small)."""
        pointer, capacity = self._buffers.get(name, (0, -1))
        if capacity < nbytes:
            if pointer:
                _cuda_check(self._rt, self._rt.cudaFree(pointer), "cudaFree")
                del self._buffers[name]
            pointer = int(_cuda_check(self._rt, self._rt.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes})"))
            self._buffers[name] = (pointer, max(nbytes, 1))
        return pointer

    def upload(self, name: str, array: np.ndarray[Any, Any]) -> int:
        """Queue a copy of the C-contiguous ``array`` to tensor ``name``'s buffer; return its device pointer."""
        pointer = self.reserve(name, array.nbytes)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        _cuda_check(
            self._rt,
            self._rt.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, self._stream),
            "copy to device",
        )
        return pointer

    def download(self, name: str, out: np.ndarray[Any, Any]) -> None:
        """Queue a copy of tensor ``name``'s buffer into the C-contiguous ``out``."""
        pointer, _ = self._buffers[name]
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda_check(
            self._rt, self._rt.cudaMemcpyAsync(out.ctypes.data, pointer, out.nbytes, kind, self._stream), "copy to host"
        )

    def synchronize(self) -> None:
        _cuda_check(self._rt, self._rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        for pointer, _ in self._buffers.values():
            self._rt.cudaFree(pointer)
        self._buffers.clear()
        if self._stream is not None:
            self._rt.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        # A model dropped without close() still returns its device memory (not at interpreter exit,
        # when cuda-python may already be gone).
        with contextlib.suppress(Exception):
            self.close()


@functools.lru_cache(maxsize=1)
def _shared_logger(trt: ModuleType) -> Any:
    """The process's TensorRT logger: forwards to Python logging and remembers errors for error messages.

    One instance for every builder and runtime: TensorRT keeps the first logger it is given
    as its global logger and warns when later ones differ.
    """

    base: Any = trt.ILogger

    class _Logger(base):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def _recent_errors(logger: Any) -> str:
    errors: list[str] = logger.errors[-3:]
    return f" (TensorRT said: {' | '.join(errors)})" if errors else ""


def _forget_errors(logger: Any) -> None:
    logger.errors.clear()


def _build_engine(trt: ModuleType, logger: Any, onnx_path: Path, spec: BuildSpec) -> bytes:
    """Parse the ONNX graph and build a serialized engine. Raises ``ModelLoadError`` naming what failed."""
    _forget_errors(logger)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):  # the path locates external weights
        problems = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelLoadError(
            f"TensorRT's ONNX parser refused {onnx_path.name}: " + ("; ".join(problems) or "no details given")
        )
    network_inputs: dict[str, tuple[int, ...]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        network_inputs[tensor.name] = tuple(int(d) for d in tensor.shape)
    check_network_inputs(network_inputs, spec.optimization_profiles)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
    config.builder_optimization_level = spec.builder_optimization_level
    for flag_name in precision_flags(spec.precision):
        flag = getattr(trt.BuilderFlag, flag_name, None)
        if flag is None:  # TensorRT 11 removed precision flags: networks are strongly typed
            log.warning(
                "TensorRT %s has no BuilderFlag.%s; precision follows the graph's types", trt.__version__, flag_name
            )
        else:
            config.set_flag(flag)
    if spec.sparsity_2_4:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if spec.dla_core is not None:
        cores = int(builder.num_DLA_cores)
        if spec.dla_core >= cores:
            raise ModelLoadError(
                f"{BUILD_SPEC_NAME} asks for DLA core {spec.dla_core}, but this device has {cores} DLA core(s); "
                "compile the package for this device (dla_core null runs on the GPU)"
            )
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = spec.dla_core
        if spec.allow_gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    for profile in spec.optimization_profiles:
        trt_profile = builder.create_optimization_profile()
        for r in profile.inputs:
            trt_profile.set_shape(r.name, r.min, r.opt, r.max)
        if config.add_optimization_profile(trt_profile) < 0:
            raise ModelLoadError(
                f"TensorRT rejected an optimization profile from {BUILD_SPEC_NAME}{_recent_errors(logger)}"
            )

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelLoadError(f"TensorRT could not build an engine from {onnx_path.name}{_recent_errors(logger)}")
    return bytes(memoryview(plan))


def _numpy_dtype(trt: ModuleType, trt_dtype: Any, name: str) -> np.dtype[Any]:
    try:
        dtype: np.dtype[Any] = np.dtype(trt.nptype(trt_dtype))
    except TypeError:
        raise ModelLoadError(f"engine tensor {name!r} has type {trt_dtype}, which numpy cannot hold") from None
    return dtype


class _TensorRTModel(LoadedModel):
    """A deserialized engine with one execution context and its device buffers. Not thread-safe."""

    def __init__(self, trt: ModuleType, cudart: ModuleType, runtime: Any, engine: Any, spec: BuildSpec) -> None:
        self._runtime = runtime  # must outlive the engine
        self._engine = engine
        self._spec = spec
        self._context = engine.create_execution_context()
        if self._context is None:
            raise ModelLoadError("TensorRT could not create an execution context (out of device memory?)")
        self._profile = 0
        inputs: list[TensorInfo] = []
        outputs: list[TensorInfo] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(None if int(d) < 0 else int(d) for d in engine.get_tensor_shape(name))
            info = TensorInfo(name, shape, _numpy_dtype(trt, engine.get_tensor_dtype(name), name))
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(info)
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self._buffers = _DeviceBuffers(cudart)

    def run(self, feeds: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        if len(feeds) != len(self.inputs):
            raise InputError(f"the engine takes {len(self.inputs)} inputs, got {len(feeds)}")
        arrays = [np.ascontiguousarray(f) for f in feeds]
        for info, array in zip(self.inputs, arrays, strict=True):
            if array.dtype != info.dtype:
                raise InputError(f"input {info.name!r} must be {info.dtype}, got {array.dtype}")
        self._select_profile({i.name: a.shape for i, a in zip(self.inputs, arrays, strict=True)})
        context = self._context
        for info, array in zip(self.inputs, arrays, strict=True):
            if not context.set_input_shape(info.name, array.shape):
                raise InputError(
                    f"input {info.name!r} has shape {array.shape}; the engine accepts "
                    f"{describe_profiles(self._spec.optimization_profiles, info.name)}"
                )
            context.set_tensor_address(info.name, self._buffers.upload(info.name, array))
        results = []
        for info in self.outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(info.name))
            if any(d < 0 for d in shape):
                raise ModelLoadError(
                    f"output {info.name!r} has a data-dependent shape {shape}; edgeship's TensorRT backend needs "
                    "output shapes that follow from the input shapes"
                )
            out = np.empty(shape, dtype=info.dtype)
            context.set_tensor_address(info.name, self._buffers.reserve(info.name, out.nbytes))
            results.append(out)
        if not context.execute_async_v3(self._buffers.stream_handle):
            raise ModelLoadError("TensorRT failed to enqueue the engine (see the TensorRT log above)")
        for info, out in zip(self.outputs, results, strict=True):
            self._buffers.download(info.name, out)
        self._buffers.synchronize()  # also keeps `arrays` alive until the copies to the device are done
        return results

    def _select_profile(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        if self._engine.num_optimization_profiles <= 1:
            return
        index = choose_profile(self._spec.optimization_profiles, shapes)
        if index is None:
            name, shape = next(iter(shapes.items()))
            raise InputError(
                f"no optimization profile accepts these input shapes (input {name!r}: {shape}; allowed "
                f"{describe_profiles(self._spec.optimization_profiles, name)})"
            )
        if index != self._profile:
            if not self._context.set_optimization_profile_async(index, self._buffers.stream_handle):
                raise ModelLoadError(f"TensorRT could not switch to optimization profile {index}")
            self._profile = index

    def close(self) -> None:
        self._context = None
        self._engine = None
        self._buffers.close()


class TensorRTBackend(Backend):
    """Runs ``tensorrt-onnx`` packages with TensorRT (10 or newer) on an NVIDIA GPU or DLA.

    Options: ``cache_dir`` (default ``~/.cache/edgeship/engines``); threads and delegates are
    ignored (the build spec chooses GPU or DLA).
    """

    name = "tensorrt"
    formats = ("tensorrt-onnx",)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("tensorrt") is None:
            return TENSORRT_MISSING
        if not _cuda_python_installed():
            return CUDA_PYTHON_MISSING
        return _cuda_device_problem()

    @classmethod
    def load(cls, artifact: Path, manifest: Manifest, options: BackendOptions) -> LoadedModel:
        """Build (or take from the cache) an engine for ``artifact`` and open it.

        Raises ``BackendUnavailableError`` without TensorRT, cuda-python or a CUDA device;
        ``ArtifactError`` for a missing or invalid ``build_spec.json``; ``ModelLoadError``
        when TensorRT is too old or refuses the graph, the spec or the engine.
        """
        reason = cls.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"backend 'tensorrt' cannot run here: {reason}")
        spec_path = artifact.parent / BUILD_SPEC_NAME
        if not artifact.is_file():
            raise ArtifactError(f"the ONNX graph {artifact} is missing or not a file")
        try:
            spec = BuildSpec.from_json(spec_path.read_bytes())
            package_digest = package_sha256(artifact)
        except FileNotFoundError as exc:
            raise ArtifactError(
                f"{Path(exc.filename).name} is missing beside {artifact.name}; a tensorrt-onnx package holds "
                f"the ONNX graph and {BUILD_SPEC_NAME} in one folder"
            ) from None
        except OSError as exc:
            raise ArtifactError(f"cannot read the TensorRT package files in {artifact.parent}: {exc}") from None

        trt = _import_tensorrt()
        check_tensorrt_version(trt.__version__, spec.min_tensorrt_version)
        cudart = _import_cudart()
        gpu_name, capability = _cuda_device_identity(cudart)
        key = EngineCacheKey(gpu_name, capability, str(trt.__version__), package_digest, spec.sha256())
        cache = EngineCache((options.cache_dir or DEFAULT_CACHE_DIR).expanduser())

        logger = _shared_logger(trt)
        runtime = trt.Runtime(logger)
        if spec.dla_core is not None:
            runtime.DLA_core = spec.dla_core
        engine = load_or_build(
            cache,
            key,
            build=lambda: _build_engine(trt, logger, artifact, spec),
            deserialize=runtime.deserialize_cuda_engine,
        )
        return _TensorRTModel(trt, cudart, runtime, engine, spec)
