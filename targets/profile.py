"""The target profile: what the compiler needs to know about a kind of device.

A profile is a small typed record. The compiler reads it to choose defaults (format,
precision, runtime) and to refuse impossible requests with a clear error, for example
int4 Core ML before iOS 18, or dynamic-int8 fully-connected layers with per-channel
weights on tflite-runtime 2.14, which runs them but computes wrong results.

A profile validates itself when it is constructed (``ProfileError`` names the profile,
the field and what is allowed), so a contradictory profile, such as a Core ML target
offering int4 before iOS 18, cannot exist, whether it is built in or registered by a user.

This module imports nothing of edgeship's (targets sit below every other part).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

#: Artifact formats; the same strings as the package manifest's ``format``.
FORMATS: tuple[str, ...] = ("tflite", "onnx", "coreml", "tensorrt-onnx")

#: The precision vocabulary. Every profile, recipe and manifest uses exactly these strings.
PRECISIONS: tuple[str, ...] = (
    "fp32",
    "fp16",
    "int8-dynamic",  # int8 weights, activations quantized at run time (dynamic range)
    "int8-weight-only",  # int8 weights dequantized to float; float compute
    "int8-static",  # full integer: int8 weights and activations from calibration
    "w8a16",  # TFLite 16x8: int8 weights, int16 activations from calibration
    "int8-qdq",  # explicit symmetric QuantizeLinear/DequantizeLinear in ONNX (TensorRT, ORT static)
    "w8a8",  # Core ML int8 weights and activations (iOS17 / macOS14 and later)
    "palettized-4bit",  # Core ML 4-bit look-up-table weights
    "int4-block",  # Core ML int4 per-block weights (iOS18 / macOS15 and later)
)

#: Which precisions each format can carry at all; a profile picks a subset for its device.
PRECISIONS_BY_FORMAT: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "tflite": frozenset({"fp32", "fp16", "int8-dynamic", "int8-weight-only", "int8-static", "w8a16"}),
        "onnx": frozenset({"fp32", "fp16", "int8-dynamic", "int8-qdq"}),
        "coreml": frozenset({"fp32", "fp16", "int8-weight-only", "w8a8", "palettized-4bit", "int4-block"}),
        "tensorrt-onnx": frozenset({"fp32", "fp16", "int8-qdq"}),
    }
)

#: Core ML deployment targets (spelled as coremltools' ``ct.target`` members, so the compiler can
#: pass ``getattr(ct.target, profile.min_os)``) -> the model specification version they run.
#: ML programs start at specification 6 (iOS15 / macOS12); values as in coremltools 9.0.
COREML_SPEC_VERSIONS: Mapping[str, int] = MappingProxyType(
    {
        **{f"iOS{v}": s for v, s in ((15, 6), (16, 7), (17, 8), (18, 9), (26, 10))},
        **{f"macOS{v}": s for v, s in ((12, 6), (13, 7), (14, 8), (15, 9), (26, 10))},
        **{f"tvOS{v}": s for v, s in ((15, 6), (16, 7), (17, 8), (18, 9), (26, 10))},
        **{f"watchOS{v}": s for v, s in ((8, 6), (9, 7), (10, 8), (11, 9), (26, 10))},
    }
)

#: Lowest Core ML specification version each Core ML precision needs. Weight compression
#: (constexpr ops) needs 7: coremltools raises an iOS15 model to 7 when it compresses weights;
#: activation quantization needs 8 (coremltools' AbstractActCompressionPass minimum is iOS17);
#: per-block int4 needs 9 (coremltools raises "per_block quantization is supported since iOS18").
COREML_MIN_SPEC: Mapping[str, int] = MappingProxyType(
    {"fp32": 6, "fp16": 6, "int8-weight-only": 7, "palettized-4bit": 7, "w8a8": 8, "int4-block": 9}
)

# The package manifest's identifier pattern: a target name must fit in a manifest.
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_QUIRK_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_OP_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
_COMPUTE_CAPABILITY = re.compile(r"^([1-9][0-9]?)\.([0-9])$")


class _ReadOnlyDict(dict):  # type: ignore[type-arg]
    """A dict that refuses changes: a registered profile's op table cannot be edited in place.

    A dict subclass rather than a MappingProxyType, so the field keeps its ``dict[str, int]``
    type for callers and ``json.dumps`` takes it as it is.
    """

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a target profile's max_op_versions is read-only; build a new TargetProfile")

    __setitem__ = __delitem__ = __ior__ = _refuse  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[type[_ReadOnlyDict], tuple[dict[str, int]]]:
        # copy, deepcopy and pickle rebuild from a plain dict instead of item by item.
        return (type(self), (dict(self),))


class ProfileError(ValueError):
    """A target profile contradicts itself or uses a word outside the vocabulary.

    The message names the profile and the field. Raised by ``TargetProfile(...)``.
    """


@dataclass(frozen=True)
class Quirk:
    """A known defect of the target's runtime that the compiler must work around or refuse.

    ``id`` is stable (code matches on it), ``text`` says what goes wrong, ``evidence`` says
    how it was established (a measurement, an issue link).
    """

    id: str
    text: str
    evidence: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "text": self.text, "evidence": self.evidence}


@dataclass(frozen=True)
class TargetProfile:
    """One kind of device.

    ``format``: the artifact format its runtime runs ("tflite", "onnx", "coreml", "tensorrt-onnx").
    ``precisions``: precisions the compiler may emit for it, the first being the default.
    ``runtime`` / ``runtime_version``: the inference library on the device and its version.
    ``min_os``: e.g. "iOS17" for Core ML deployment targets (a key of ``COREML_SPEC_VERSIONS``), else None.
    ``gpu_arch``: e.g. "sm_87" (Orin) for TensorRT targets, else None.
    ``compute_capability``: e.g. "8.7" for Jetson targets, else None.
    ``memory_mib``: memory available to the model process (a budget the compiler warns against).
    ``delegates``: accelerators the runtime can use ("xnnpack", "gpu", "nnapi", "ane", "dla", "cuda").
    ``max_op_versions``: for TFLite runtimes that lag behind the converter: builtin op name ->
    highest version the runtime loads, 0 when it has no kernel for the op at all (an artifact
    needing more is refused at compile time). An op not in the table is not checked.
    ``dynamic_batch``: whether the runtime handles a dynamic batch dimension.
    ``quirks``: defects the compiler must respect.

    Construction validates every field and raises ``ProfileError``; sequences are stored as
    tuples and ``max_op_versions`` as a read-only dict, so a registered profile cannot be
    changed behind the registry's back.
    """

    name: str
    description: str
    format: str
    precisions: tuple[str, ...]
    runtime: str
    runtime_version: str
    min_os: str | None = None
    gpu_arch: str | None = None
    compute_capability: str | None = None
    memory_mib: int | None = None
    delegates: tuple[str, ...] = ()
    max_op_versions: dict[str, int] = field(default_factory=dict, hash=False)
    dynamic_batch: bool = True
    quirks: tuple[Quirk, ...] = ()

    def __post_init__(self) -> None:
        # Callers may pass lists; store immutable values so the frozen record really is frozen.
        object.__setattr__(self, "precisions", tuple(self.precisions))
        object.__setattr__(self, "delegates", tuple(self.delegates))
        object.__setattr__(self, "quirks", tuple(self.quirks))
        object.__setattr__(self, "max_op_versions", _ReadOnlyDict(self.max_op_versions))
        self._validate()

    @property
    def default_precision(self) -> str:
        return self.precisions[0]

    @property
    def coreml_spec_version(self) -> int | None:
        """The Core ML specification version of ``min_os`` (8 for iOS17), or None for other formats."""
        return COREML_SPEC_VERSIONS.get(self.min_os or "") if self.format == "coreml" else None

    def has_quirk(self, quirk_id: str) -> bool:
        return any(q.id == quirk_id for q in self.quirks)

    def quirk(self, quirk_id: str) -> Quirk | None:
        """The quirk with this id, or None."""
        return next((q for q in self.quirks if q.id == quirk_id), None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (tuples as lists), plus ``default_precision``."""
        return {
            "name": self.name,
            "description": self.description,
            "format": self.format,
            "precisions": list(self.precisions),
            "default_precision": self.default_precision,
            "runtime": self.runtime,
            "runtime_version": self.runtime_version,
            "min_os": self.min_os,
            "gpu_arch": self.gpu_arch,
            "compute_capability": self.compute_capability,
            "memory_mib": self.memory_mib,
            "delegates": list(self.delegates),
            "max_op_versions": dict(self.max_op_versions),
            "dynamic_batch": self.dynamic_batch,
            "quirks": [q.to_dict() for q in self.quirks],
        }

    def _fail(self, message: str) -> ProfileError:
        return ProfileError(f"target profile {self.name!r}: {message}")

    def _validate(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise self._fail("name must be lower-case letters, digits, '.', '_' or '-' (at most 128)")
        for attr in ("description", "runtime", "runtime_version"):
            if not isinstance(getattr(self, attr), str) or not getattr(self, attr).strip():
                raise self._fail(f"{attr} must be a non-empty string")
        if self.format not in FORMATS:
            raise self._fail(f"unknown format {self.format!r}; use one of {', '.join(FORMATS)}")
        self._validate_precisions()
        self._validate_hardware()
        self._validate_ops_and_quirks()

    def _validate_precisions(self) -> None:
        if not self.precisions:
            raise self._fail("precisions is empty; the first one is the default")
        if len(set(self.precisions)) != len(self.precisions):
            raise self._fail(f"precisions {list(self.precisions)} repeat a value")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise self._fail(f"unknown precision {p!r}; use one of {', '.join(PRECISIONS)}")
            if p not in PRECISIONS_BY_FORMAT[self.format]:
                allowed = ", ".join(q for q in PRECISIONS if q in PRECISIONS_BY_FORMAT[self.format])
                raise self._fail(f"precision {p!r} does not exist in {self.format} artifacts (those carry {allowed})")
        if self.format == "coreml":
            spec = COREML_SPEC_VERSIONS.get(self.min_os or "")
            if spec is None:
                raise self._fail(
                    f"a Core ML target needs min_os, one of {', '.join(COREML_SPEC_VERSIONS)}; got {self.min_os!r}"
                )
            for p in self.precisions:
                if COREML_MIN_SPEC[p] > spec:
                    needs = [os for os, s in COREML_SPEC_VERSIONS.items() if s == COREML_MIN_SPEC[p]]
                    raise self._fail(
                        f"{p} needs Core ML specification {COREML_MIN_SPEC[p]} ({' / '.join(needs)}) "
                        f"but min_os {self.min_os} is specification {spec}"
                    )

    def _validate_hardware(self) -> None:
        if self.format == "tensorrt-onnx":
            match = _COMPUTE_CAPABILITY.match(self.compute_capability or "")
            if match is None:
                raise self._fail(
                    f"a TensorRT target needs compute_capability like '8.7'; got {self.compute_capability!r}"
                )
            arch = f"sm_{match.group(1)}{match.group(2)}"
            if self.gpu_arch != arch:
                raise self._fail(
                    f"compute capability {self.compute_capability} is gpu_arch {arch!r}, not {self.gpu_arch!r}"
                )
        if self.memory_mib is not None and (
            isinstance(self.memory_mib, bool) or not isinstance(self.memory_mib, int) or self.memory_mib <= 0
        ):
            raise self._fail(f"memory_mib must be a positive integer or None; got {self.memory_mib!r}")
        if any(not isinstance(d, str) or not d for d in self.delegates) or len(set(self.delegates)) != len(
            self.delegates
        ):
            raise self._fail(f"delegates must be distinct non-empty strings; got {list(self.delegates)}")

    def _validate_ops_and_quirks(self) -> None:
        if self.max_op_versions and self.format != "tflite":
            raise self._fail("max_op_versions applies to TFLite builtin ops only (format 'tflite')")
        for op, version in self.max_op_versions.items():
            if not isinstance(op, str) or not _OP_NAME.match(op):
                raise self._fail(f"max_op_versions key {op!r} is not a builtin op name like 'FULLY_CONNECTED'")
            if isinstance(version, bool) or not isinstance(version, int) or version < 0:
                raise self._fail(f"max_op_versions[{op!r}] must be an integer >= 0 (0: no kernel); got {version!r}")
        for q in self.quirks:
            if not isinstance(q, Quirk):
                raise self._fail(f"quirks must be Quirk records; got {q!r}")
            if not _QUIRK_ID.match(q.id) or not q.text.strip():
                raise self._fail(f"quirk {q.id!r} needs a lower-case id of letters, digits and '-', and a text")
        ids = [q.id for q in self.quirks]
        if len(set(ids)) != len(ids):
            raise self._fail(f"quirk ids repeat: {ids}")
