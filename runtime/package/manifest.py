"""The manifest of a model package: typed records, JSON (de)serialisation and schema checks.

A manifest is checked three ways before anything trusts it: its bytes against the
signature (``signing``), its JSON against ``manifest.schema.json``, and its member
paths against the path rules below (no JSON Schema can express "no two paths that
collide on a case-insensitive file system").
"""

from __future__ import annotations

import functools
import json
import math
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jsonschema

from edgeship.errors import ManifestError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
FORMATS = ("tflite", "onnx", "coreml", "tensorrt-onnx")
DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    import jsonschema  # imported on first validation: it is a quarter of the runtime's import time

    text = resources.files("edgeship.runtime.package").joinpath("manifest.schema.json").read_text("utf-8")
    schema = json.loads(text)
    # JSON Schema counts 3.0 as an integer; a manifest must write integers without a
    # fraction or exponent, so that every reader parses sizes and versions the same way.
    strict_types = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    )
    strict = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=strict_types)  # type: ignore[no-untyped-call]
    validator: jsonschema.protocols.Validator = strict(schema)
    return validator


def manifest_schema() -> dict[str, Any]:
    """Return the manifest JSON Schema (draft 2020-12) as a dict."""
    schema: dict[str, Any] = _validator().schema  # type: ignore[assignment]
    return schema


def validate_member_path(path: str) -> None:
    """Raise ``ManifestError`` unless ``path`` is a safe, normalised, relative POSIX path.

    Safe means: not empty, no leading ``/``, no ``\\``, no NUL or control characters,
    no empty, ``.`` or ``..`` segment, at most 1024 bytes, and not one of the two
    reserved names (``manifest.json``, ``manifest.sig``).
    """
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"member path {path!r} is not valid Unicode (lone surrogate)") from None
    if not path or len(encoded) > 1024:
        raise ManifestError(f"member path {path!r} is empty or longer than 1024 bytes")
    if path.startswith("/") or "\\" in path or any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise ManifestError(f"member path {path!r} is absolute or contains '\\' or control characters")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise ManifestError(f"member path {path!r} has an empty, '.' or '..' segment")
    if _fold(path.split("/")[0]) in _RESERVED_FOLDED:
        raise ManifestError(f"member path {path!r} is reserved for the package's own metadata")


def _fold(path: str) -> str:
    """The key two paths collide on: NFC-normalised and case-folded, as APFS and HFS+ compare names."""
    return unicodedata.normalize("NFC", path).casefold()


_RESERVED_FOLDED = frozenset(_fold(n) for n in RESERVED_NAMES)


def check_path_set(paths: list[str]) -> None:
    """Raise ``ManifestError`` if the paths collide: duplicates (also after Unicode
    normalisation and case folding, because macOS and iOS file systems compare names
    that way) or a path that is both a file and a directory (``a`` and ``a/b``)."""
    seen: dict[str, str] = {}
    for path in paths:
        folded = _fold(path)
        if folded in seen:
            raise ManifestError(
                f"member paths {seen[folded]!r} and {path!r} collide (duplicate or differ only in case)"
            )
        seen[folded] = path
    for path in paths:
        parts = _fold(path).split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in seen:
                raise ManifestError(f"member path {seen[prefix]!r} is a file but {path!r} uses it as a directory")


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of a tensor: ``real = scale * (q - zero_point)``, per ``axis`` or per tensor."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"scale": list(self.scale), "zero_point": list(self.zero_point), "axis": self.axis}


@dataclass(frozen=True)
class Preprocessing:
    """Numeric preprocessing the runtime applies to a float input before the model sees it.

    Order: optional layout transpose, then ``x * scale``, then ``(x - mean) / std`` per channel.
    """

    layout_from: str | None = None
    layout_to: str | None = None
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.layout_from is not None and self.layout_to is not None:
            out["layout"] = {"from": self.layout_from, "to": self.layout_to}
        if self.scale is not None:
            out["scale"] = self.scale
        if self.mean is not None:
            out["mean"] = list(self.mean)
        if self.std is not None:
            out["std"] = list(self.std)
        return out


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a model input or output; ``None`` in a shape is a dynamic dimension."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    quantization: Quantization | None = None
    preprocessing: Preprocessing | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.quantization is not None:
            out["quantization"] = self.quantization.to_json()
        if self.preprocessing is not None:
            out["preprocessing"] = self.preprocessing.to_json()
        return out


@dataclass(frozen=True)
class FileEntry:
    """One member of the package other than the manifest and its signature."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Golden:
    """Where the golden vectors live and how close a runtime's outputs must be to them."""

    path: str
    rtol: float
    atol: float
    cosine_min: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "rtol": self.rtol, "atol": self.atol}
        if self.cosine_min is not None:
            out["cosine_min"] = self.cosine_min
        return out


@dataclass(frozen=True)
class Provenance:
    """What produced the artifact: the recipe, a hash of the source model and tool versions."""

    tools: dict[str, str] = field(default_factory=dict)
    recipe: dict[str, Any] | None = None
    source_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "source_sha256": self.source_sha256, "tools": dict(self.tools)}


@dataclass(frozen=True)
class Manifest:
    """A parsed, schema-valid manifest. Build one with ``Manifest.from_json`` or the package writer."""

    name: str
    version: int
    target: str
    format: str
    precision: str
    artifact_path: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: tuple[FileEntry, ...]
    provenance: Provenance = field(default_factory=Provenance)
    label: str | None = None
    created: str | None = None
    golden: Golden | None = None
    baseline_path: str | None = None
    report_path: str | None = None

    @property
    def total_size(self) -> int:
        """Sum of the sizes of every listed member, in bytes."""
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        """Return the entry for ``path``; raise ``KeyError`` when the manifest does not list it."""
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def artifact_files(self) -> tuple[FileEntry, ...]:
        """The members that make up the artifact: the file at ``artifact_path`` or every file under it."""
        prefix = self.artifact_path + "/"
        return tuple(f for f in self.files if f.path == self.artifact_path or f.path.startswith(prefix))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "name": self.name, "version": self.version}
        if self.label is not None:
            out["label"] = self.label
        if self.created is not None:
            out["created"] = self.created
        out.update(
            {
                "target": self.target,
                "format": self.format,
                "precision": self.precision,
                "artifact": {"path": self.artifact_path},
                "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs],
            }
        )
        if self.golden is not None:
            out["golden"] = self.golden.to_json()
        if self.baseline_path is not None:
            out["baseline"] = {"path": self.baseline_path}
        if self.report_path is not None:
            out["report"] = {"path": self.report_path}
        out["provenance"] = self.provenance.to_json()
        out["files"] = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files]
        return out

    def to_bytes(self) -> bytes:
        """Serialise to the canonical bytes that are signed: UTF-8 JSON, sorted keys, no extra spaces."""
        data = self.to_json()
        check_manifest_json(data)
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and check manifest bytes; raise ``ManifestError`` naming the first problem found."""
        try:
            obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ManifestError(f"manifest.json is not valid UTF-8 JSON: {exc}") from None
        return cls.from_json(obj)

    @classmethod
    def from_json(cls, obj: Any) -> Manifest:
        """Build a manifest from decoded JSON after schema and path checks."""
        check_manifest_json(obj)
        files = tuple(FileEntry(f["path"], f["size"], f["sha256"]) for f in obj["files"])
        golden = obj.get("golden")
        manifest = cls(
            name=obj["name"],
            version=obj["version"],
            label=obj.get("label"),
            created=obj.get("created"),
            target=obj["target"],
            format=obj["format"],
            precision=obj["precision"],
            artifact_path=obj["artifact"]["path"],
            inputs=tuple(_tensor_from_json(t) for t in obj["inputs"]),
            outputs=tuple(_tensor_from_json(t) for t in obj["outputs"]),
            files=files,
            provenance=Provenance(
                tools=dict(obj["provenance"]["tools"]),
                recipe=obj["provenance"].get("recipe"),
                source_sha256=obj["provenance"].get("source_sha256"),
            ),
            golden=None
            if golden is None
            else Golden(golden["path"], float(golden["rtol"]), float(golden["atol"]), golden.get("cosine_min")),
            baseline_path=obj["baseline"]["path"] if "baseline" in obj else None,
            report_path=obj["report"]["path"] if "report" in obj else None,
        )
        return manifest


def _tensor_from_json(obj: dict[str, Any]) -> TensorSpec:
    q = obj.get("quantization")
    p = obj.get("preprocessing")
    return TensorSpec(
        name=obj["name"],
        dtype=obj["dtype"],
        shape=tuple(obj["shape"]),
        quantization=None
        if q is None
        else Quantization(tuple(float(s) for s in q["scale"]), tuple(q["zero_point"]), q.get("axis")),
        preprocessing=None
        if p is None
        else Preprocessing(
            layout_from=p["layout"]["from"] if "layout" in p else None,
            layout_to=p["layout"]["to"] if "layout" in p else None,
            scale=p.get("scale"),
            mean=tuple(p["mean"]) if "mean" in p else None,
            std=tuple(p["std"]) if "std" in p else None,
        ),
    )


def check_manifest_json(obj: Any) -> None:
    """Raise ``ManifestError`` unless ``obj`` matches the schema and its paths are consistent.

    Beyond the schema: every path is safe, no two paths collide, and the artifact,
    golden, baseline and report paths each name listed members.
    """
    _check_strings(obj)
    if (
        isinstance(obj, dict)
        and "schema_version" in obj
        and not (type(obj["schema_version"]) is int and obj["schema_version"] == SCHEMA_VERSION)
    ):
        raise ManifestError(
            f"manifest schema_version {obj['schema_version']!r} is not supported (this edgeship reads "
            f"{SCHEMA_VERSION}); upgrade edgeship or rebuild the package"
        )
    from jsonschema.exceptions import best_match

    error = best_match(_validator().iter_errors(obj))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ManifestError(f"manifest does not match the schema at {where}: {_short(error.message)}")
    paths = [f["path"] for f in obj["files"]]
    for path in paths:
        validate_member_path(path)
    check_path_set(paths)
    listed = set(paths)
    artifact = obj["artifact"]["path"]
    if artifact not in listed and not any(p.startswith(artifact + "/") for p in paths):
        raise ManifestError(f"artifact path {artifact!r} names no listed member")
    for key in ("golden", "baseline", "report"):
        if key in obj and obj[key]["path"] not in listed:
            raise ManifestError(f"{key} path {obj[key]['path']!r} is not a listed member")
    for kind in ("inputs", "outputs"):
        names = [t["name"] for t in obj[kind]]
        if len(set(names)) != len(names):
            raise ManifestError(f"manifest {kind} repeat a tensor name: {names}")
        for tensor in obj[kind]:
            _check_quantization(kind[:-1], tensor)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Readers differ on which duplicate wins; two readers must never see two manifests.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_strings(obj: Any, where: str = "") -> None:
    """No string (key or value) may hold control characters or unpaired surrogates."""
    if isinstance(obj, str):
        if any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in obj):
            raise ManifestError(
                f"manifest string at {where or '(top level)'} holds a control character or a lone surrogate"
            )
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _check_strings(key, where)
            _check_strings(value, f"{where}/{key}" if where else str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            _check_strings(value, f"{where}/{i}")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ManifestError(f"manifest number at {where} is not finite")


def _check_quantization(kind: str, tensor: dict[str, Any]) -> None:
    q = tensor.get("quantization")
    if q is None:
        return
    name, rank = tensor["name"], len(tensor["shape"])
    if len(q["scale"]) != len(q["zero_point"]):
        raise ManifestError(
            f"{kind} {name!r}: quantization has {len(q['scale'])} scales but {len(q['zero_point'])} zero points"
        )
    axis = q.get("axis")
    if len(q["scale"]) > 1:
        if axis is None or not 0 <= axis < rank:
            raise ManifestError(f"{kind} {name!r}: per-axis quantization needs an axis in 0..{rank - 1}, got {axis}")
        dim = tensor["shape"][axis]
        if dim is not None and dim != len(q["scale"]):
            raise ManifestError(f"{kind} {name!r}: {len(q['scale'])} scales for axis {axis} of size {dim}")
    elif axis is not None and not 0 <= axis < rank:
        raise ManifestError(f"{kind} {name!r}: quantization axis {axis} is outside the tensor's rank {rank}")


def _short(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."
