"""What a ``tensorrt-onnx`` package asks of the device's engine build, and the checks on it.

Pure logic, testable without TensorRT:

* ``BuildSpec``: ``build_spec.json`` beside the ONNX graph, parsed and validated, with its
  optimization profiles (``OptimizationProfile``, ``ShapeRange``) and the builder flags a
  precision needs (``precision_flags``).
* TensorRT versions: ``parse_version``, ``version_at_least``, ``check_tensorrt_version``.
* Optimization profiles against the parsed network (``check_network_inputs``) and against
  the shapes of a run (``choose_profile``, ``describe_profiles``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from edgeship.errors import ArtifactError, ModelLoadError

BUILD_SPEC_NAME = "build_spec.json"
PRECISIONS = ("fp16", "int8", "fp32")


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
