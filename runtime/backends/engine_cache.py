"""The on-device cache of TensorRT engines, and the policy of when a cached engine may be used.

Files only, no TensorRT: ``EngineCacheKey`` (everything an engine depends on) and its
digest, ``package_sha256`` of the files an engine is built from, the decision whether a
cached engine may be used (``judge_cache_entry``), the cache directory (``EngineCache``)
and the load-or-rebuild policy (``load_or_build``), which takes the build and the
deserialization as functions.

Engine cache invariants (``EngineCache``):

* Layout: ``<cache_dir>/<digest>.engine`` and ``<digest>.json`` (the key that built it).
* Each file is written atomically (``edgeship.runtime.durable.write_atomic``: temp file,
  fsync, rename, fsync of the directory); the key is written after the engine, so a key
  file vouches for a complete engine.
* A cached engine is used only when its key file exists, parses, and equals the current
  key in every field. Otherwise it is deleted (with a warning) and rebuilt.
* A cached engine TensorRT cannot deserialize is deleted and rebuilt once; if the fresh
  engine cannot be deserialized either, ``ModelLoadError``.
* The cache is not a trust boundary: a key file says what an engine was built for, it
  does not authenticate it. The cache directory is created private to its user (0700),
  and so are its files (0600).
* ``prune`` deletes the engines of packages no longer installed (the device agent passes
  the packages of its slots), and whatever cannot be used: engines without a readable
  key, keys without an engine, temporary files of an interrupted write.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TypeVar

from edgeship.errors import ModelLoadError
from edgeship.runtime.durable import fsync_dir, write_atomic

# The cache logs under the backend's logger: its messages are about the backend's engines, and
# logging configured for edgeship.runtime.backends.tensorrt keeps covering them.
log = logging.getLogger("edgeship.runtime.backends.tensorrt")

DEFAULT_CACHE_DIR = Path("~/.cache/edgeship/engines")
_PACKAGE_METADATA = frozenset({"manifest.json", "manifest.sig"})


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
        """Write the engine, then its key, each atomically and durably. Raises ``OSError`` (disk full, read-only)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.engine_path(key), engine, mode=0o600)
        write_atomic(self.key_path(key), key.to_json(), mode=0o600)

    def discard(self, key: EngineCacheKey) -> None:
        """Delete the entry for ``key``, key first so a half-deleted entry is never judged a hit."""
        for path in (self.key_path(key), self.engine_path(key)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def prune(self, keep_package_sha256: set[str]) -> list[Path]:
        """Delete every engine not built from one of ``keep_package_sha256`` (``package_sha256`` values).

        Also deleted: engines whose key file is missing or unreadable, key files without
        an engine, and temporary files left by an interrupted write. Each entry goes key
        first, as in ``discard``. Returns the deleted paths (sorted); a missing cache
        directory is an empty cache. Raises ``OSError`` when a file cannot be deleted.
        """
        try:
            names = sorted(p.name for p in self.directory.iterdir())
        except FileNotFoundError:
            return []
        present = set(names)
        doomed: list[Path] = []
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                doomed.append(self.directory / name)  # a write_atomic temporary file
                continue
            stem, dot, suffix = name.rpartition(".")
            if not dot or suffix not in ("engine", "json"):
                continue  # not ours: leave it
            if suffix == "json":
                if f"{stem}.engine" not in present:
                    doomed.append(self.directory / name)
                continue
            key_file = self.directory / f"{stem}.json"
            if not self._keeps(key_file, keep_package_sha256):
                doomed += [key_file] if key_file.name in present else []
                doomed.append(self.directory / name)
        for path in doomed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if doomed:
            with contextlib.suppress(OSError):
                fsync_dir(self.directory)
            log.info("pruned %d file(s) from the TensorRT engine cache %s", len(doomed), self.directory)
        return sorted(doomed)

    @staticmethod
    def _keeps(key_file: Path, keep: set[str]) -> bool:
        try:
            key = EngineCacheKey.from_json(key_file.read_bytes())
        except (OSError, ValueError, UnicodeDecodeError, TypeError):
            return False
        return key.package_sha256 in keep


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
