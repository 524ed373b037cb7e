"""The compile recipe: typed, validated, loadable from YAML; a typo is an error that names the key.

```yaml
name: digits-cnn            # package name (default: the model file's stem)
version: 4                  # package version, monotonic per (name, target)
label: nightly              # optional
variants:                   # per target, the precisions to emit (default: the target's default)
  android-arm64: [fp32, int8-dynamic, int8-static]
  linux-x86_64: [fp32, int8-dynamic]
calibration:
  samples: 256              # calibration samples used (taken from --calib)
  method: minmax            # static int8 activation ranges: minmax, percentile or entropy (ONNX
                            #   and TensorRT int8-qdq; TFLite and Core ML calibrate with minmax only)
validation:
  held_out: 128             # samples kept out of calibration to validate on
  golden_cases: 8           # golden vectors written into each package
  latency_runs: 50          # host latency runs per artifact
  max_accuracy_drop: null   # points; a variant that drops more gets no package (the quality gate)
  min_cosine: null          # worst held-out sample's cosine to the fp32 source (worst output); a number,
                            #   or per precision {int8-static: 0.98}; null: the default gate (below)
tflite:
  static_io: int8           # int8-static artifacts take int8 (default) or float I/O
quantize:                   # what stays in float: global -> per-op-type -> per-node-name, later wins
  min_cosine: 0.995         # optional: set the most sensitive layers apart until the worst calibration
  max_float_fraction: 0.25  #   sample reaches this cosine to fp32 (at most this share of layers) ...
  fallback: auto            #   ... as int8 weights with float compute (weight-only), float, or auto:
                            #   weight-only, then float if weight-only cannot reach min_cosine
  reduce_range: false       # onnx int8-dynamic: 7-bit weights (x86 CPUs without VNNI saturate 8-bit)
  global: {skip: false}
  types: {Gather: {skip: true}}
  names: {"/classifier/Gemm": {skip: true}}
  smooth: {alpha: 0.5}      # settings of the quantize.smooth pass, when passes lists it
passes: [prune.channels]    # compiler passes run in order on the model before any artifact is built
seed: 0                     # seeds every training step of the passes (same seed, same weights)
prune:                      # one settings section per pass: family -> kind (docs/passes.md lists the keys)
  channels: {ratio: 0.5, epochs: 3}
```

The quality gate: a variant whose held-out validation misses its budget gets no package and
fails the compile. The budget is the recipe's (``validation.min_cosine``,
``validation.max_accuracy_drop``, and ``quantize.min_cosine`` for the quantized variants the
layer search built); without one, the default per precision of ``compiler/quality.py`` applies
(fp32/fp16: cosine >= 0.999; quantized: cosine >= 0.99, or an accuracy drop <= 1 point when the
evaluation data has labels). ``min_cosine: 0`` turns the cosine check off for that precision.

Op types and node names are the artifact's own: ONNX op types and node names for onnx and
tensorrt targets; TFLite op types (FULLY_CONNECTED) and op scopes or output tensor names for
tflite targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeship.errors import UsageError

#: How static int8 calibration turns activation statistics into ranges (``calibration.method``).
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class LayerRule:
    skip: bool | None = None


@dataclass(frozen=True)
class QuantizeRules:
    """Layer overrides resolved global -> per-op-type -> per-node-name."""

    global_rule: LayerRule = LayerRule(skip=False)
    min_cosine: float | None = None
    max_float_fraction: float = 0.25
    fallback: str = "auto"
    reduce_range: bool = False
    types: dict[str, LayerRule] = field(default_factory=dict)
    names: dict[str, LayerRule] = field(default_factory=dict)

    def skipped(self, op_type: str, name: str) -> bool:
        skip = bool(self.global_rule.skip)
        for rule in (self.types.get(op_type), self.names.get(name)):
            if rule is not None and rule.skip is not None:
                skip = rule.skip
        return skip

    @property
    def any(self) -> bool:
        return bool(self.global_rule.skip) or bool(self.types) or bool(self.names)


#: The recipe's own ``quantize`` keys; the section also holds the settings of ``quantize.*`` passes.
QUANTIZE_KEYS = frozenset({"global", "types", "names", "min_cosine", "max_float_fraction", "fallback", "reduce_range"})


@dataclass(frozen=True)
class PassStep:
    """One compiler pass to run: its registered name and its validated settings (defaults filled in)."""

    name: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class Recipe:
    name: str | None = None
    version: int = 1
    label: str | None = None
    variants: dict[str, tuple[str, ...]] = field(default_factory=dict)
    calibration_samples: int = 256
    calibration_method: str = "minmax"
    held_out: int = 128
    golden_cases: int = 8
    latency_runs: int = 50
    max_accuracy_drop: float | None = None
    #: The gate's cosine budget: one number for every precision, or per precision (others: the default).
    min_cosine: float | dict[str, float] | None = None
    tflite_static_io: str = "int8"
    quantize: QuantizeRules = QuantizeRules()
    passes: tuple[PassStep, ...] = ()
    seed: int = 0

    def min_cosine_for(self, precision: str) -> float | None:
        """The recipe's cosine budget for ``precision`` (``validation.min_cosine``), None when it sets none."""
        if isinstance(self.min_cosine, dict):
            return self.min_cosine.get(precision)
        return self.min_cosine

    def to_dict(self) -> dict[str, Any]:
        """The recipe as the mapping ``from_dict`` reads (every field, defaults included), so
        ``Recipe.from_dict(r.to_dict()) == r``. This is what a package's provenance records."""
        q = self.quantize
        return {
            **passes_to_dict(self),
            "name": self.name,
            "version": self.version,
            "label": self.label,
            "variants": {k: list(v) for k, v in self.variants.items()},
            "calibration": {"samples": self.calibration_samples, "method": self.calibration_method},
            "validation": {
                "held_out": self.held_out,
                "golden_cases": self.golden_cases,
                "latency_runs": self.latency_runs,
                "max_accuracy_drop": self.max_accuracy_drop,
                "min_cosine": dict(self.min_cosine) if isinstance(self.min_cosine, dict) else self.min_cosine,
            },
            "tflite": {"static_io": self.tflite_static_io},
            "quantize": {
                **passes_to_dict(self).get("quantize", {}),
                "min_cosine": q.min_cosine,
                "max_float_fraction": q.max_float_fraction,
                "fallback": q.fallback,
                "reduce_range": q.reduce_range,
                "global": {"skip": q.global_rule.skip},
                "types": {k: {"skip": v.skip} for k, v in q.types.items()},
                "names": {k: {"skip": v.skip} for k, v in q.names.items()},
            },
        }

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text("utf-8"))
        except OSError as exc:
            raise UsageError(f"cannot read recipe {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise UsageError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(data or {}, str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        """Validate and build; raises ``UsageError`` naming the first unknown key or bad value."""
        from edgeship.compiler import passes

        families = {n.split(".", 1)[0] for n in passes.names()}
        top = _mapping(
            data,
            where,
            {"name", "version", "label", "variants", "calibration", "validation", "quantize", "tflite"}
            | {"passes", "seed"}
            | families,
        )
        tflite = _mapping(top.get("tflite", {}), f"{where}: tflite", {"static_io"})
        static_io = tflite.get("static_io", "int8")
        if static_io not in ("int8", "float"):
            raise UsageError(f"{where}: tflite.static_io must be int8 or float, not {static_io!r}")
        calibration = _mapping(top.get("calibration", {}), f"{where}: calibration", {"samples", "method"})
        method = calibration.get("method", "minmax")
        if method not in CALIBRATION_METHODS:
            raise UsageError(
                f"{where}: calibration.method must be one of {', '.join(CALIBRATION_METHODS)}, not {method!r}"
            )
        validation = _mapping(
            top.get("validation", {}),
            f"{where}: validation",
            {"held_out", "golden_cases", "latency_runs", "max_accuracy_drop", "min_cosine"},
        )
        quantize = _mapping(
            top.get("quantize", {}),
            f"{where}: quantize",
            set(QUANTIZE_KEYS) | {n.split(".", 1)[1] for n in passes.names() if n.startswith("quantize.")},
        )
        reduce_range = quantize.get("reduce_range", False)
        if not isinstance(reduce_range, bool):
            raise UsageError(f"{where}: quantize.reduce_range must be true or false, not {reduce_range!r}")
        fallback = quantize.get("fallback", "auto")
        if fallback not in ("auto", "weight-only", "float"):
            raise UsageError(f"{where}: quantize.fallback must be auto, weight-only or float, not {fallback!r}")
        min_cosine = _float_or_none(quantize.get("min_cosine"), f"{where}: quantize.min_cosine")
        fraction = _float_or_none(quantize.get("max_float_fraction", 0.25), f"{where}: quantize.max_float_fraction")
        if min_cosine is not None and min_cosine > 1:
            raise UsageError(f"{where}: quantize.min_cosine is a cosine in 0..1, not {min_cosine}")
        if fraction is None or not 0 < fraction <= 1:
            raise UsageError(
                f"{where}: quantize.max_float_fraction is the share of layers the layer search may set apart, in "
                f"(0, 1], not {fraction}; to keep every layer int8, leave quantize.min_cosine unset (no layer "
                "search) and name the precision instead of giving a budget"
            )
        variants: dict[str, tuple[str, ...]] = {}
        for target, precisions in _mapping(top.get("variants", {}), f"{where}: variants", None).items():
            if isinstance(precisions, str):
                precisions = [precisions]
            if not isinstance(precisions, list) or not precisions or not all(isinstance(p, str) for p in precisions):
                raise UsageError(f"{where}: variants.{target} must be a precision or a list of precisions")
            variants[str(target)] = tuple(precisions)
        return cls(
            name=_opt(top, "name", str, where),
            version=_int(top.get("version", 1), f"{where}: version", 1),
            label=_opt(top, "label", str, where),
            variants=variants,
            calibration_samples=_int(calibration.get("samples", 256), f"{where}: calibration.samples", 1),
            calibration_method=method,
            held_out=_int(validation.get("held_out", 128), f"{where}: validation.held_out", 1),
            golden_cases=_int(validation.get("golden_cases", 8), f"{where}: validation.golden_cases", 1),
            latency_runs=_int(validation.get("latency_runs", 50), f"{where}: validation.latency_runs", 1),
            max_accuracy_drop=_float_or_none(
                validation.get("max_accuracy_drop"), f"{where}: validation.max_accuracy_drop"
            ),
            min_cosine=_cosine_budget(validation.get("min_cosine"), f"{where}: validation.min_cosine"),
            tflite_static_io=static_io,
            passes=_passes(top, families, where),
            seed=_int(top.get("seed", 0), f"{where}: seed", 0),
            quantize=QuantizeRules(
                _rule(quantize.get("global", {"skip": False}), f"{where}: quantize.global"),
                min_cosine,
                fraction,
                fallback,
                reduce_range,
                {
                    str(k): _rule(v, f"{where}: quantize.types.{k}")
                    for k, v in _mapping(quantize.get("types", {}), f"{where}: quantize.types", None).items()
                },
                {
                    str(k): _rule(v, f"{where}: quantize.names.{k}")
                    for k, v in _mapping(quantize.get("names", {}), f"{where}: quantize.names", None).items()
                },
            ),
        )


def _cosine_budget(value: Any, where: str) -> float | dict[str, float] | None:
    """A cosine in 0..1, or a mapping precision -> cosine in 0..1, or None."""
    if isinstance(value, dict):
        return {str(k): _cosine(v, f"{where}.{k}") for k, v in value.items()}
    return None if value is None else _cosine(value, where)


def _cosine(value: Any, where: str) -> float:
    number = _float_or_none(value, where)
    if number is None or number > 1:
        raise UsageError(f"{where} must be a cosine in 0..1 (or, for min_cosine, a mapping precision -> cosine)")
    return number


def _passes(top: dict[str, Any], families: set[str], where: str) -> tuple[PassStep, ...]:
    """The ``passes`` list, each with its settings section validated by the pass itself."""
    from edgeship.compiler import passes

    listed = top.get("passes", [])
    if isinstance(listed, str):
        listed = [listed]
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        raise UsageError(f"{where}: passes must be a list of pass names ({', '.join(passes.names())})")
    steps = []
    for name in listed:
        try:
            step = passes.get(name)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
        family, kind = name.split(".", 1)
        section = _mapping(top.get(family, {}) or {}, f"{where}: {family}", None)
        steps.append(PassStep(name, step.configure(section.get(kind), f"{where}: {name}")))
    for family in families:
        section = _mapping(top.get(family, {}) or {}, f"{where}: {family}", None)
        for kind in section:
            if family == "quantize" and kind in QUANTIZE_KEYS:
                continue  # the quantizer's own rules share the section with the quantize.* passes
            name = f"{family}.{kind}"
            if name not in listed:
                known = [n for n in passes.names() if n.startswith(family + ".")]
                if name not in known:
                    import difflib

                    guess = difflib.get_close_matches(name, known, n=1)
                    hint = f"did you mean {guess[0]!r}?" if guess else f"known: {', '.join(known)}"
                    raise UsageError(f"{where}: {family}.{kind} is not a compiler pass ({hint})")
                raise UsageError(f"{where}: settings for {name} but passes does not list it; add it to passes")
    return tuple(steps)


def passes_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe's passes in ``Recipe.from_dict`` form (``passes``, ``seed``, one section per family).

    A student module given through the Python API is recorded by its class name only: it has no YAML form.
    """
    out: dict[str, Any] = {"passes": [s.name for s in recipe.passes], "seed": recipe.seed}
    for step in recipe.passes:
        family, kind = step.name.split(".", 1)
        out.setdefault(family, {})[kind] = {
            k: (v if v is None or isinstance(v, (str, int, float, bool, list, dict)) else f"<{type(v).__name__}>")
            for k, v in step.settings.items()
        }
    return out


def _mapping(value: Any, where: str, allowed: set[str] | None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a mapping, not {type(value).__name__}")
    if allowed is not None:
        unknown = sorted(set(map(str, value)) - allowed)
        if unknown:
            import difflib

            guess = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else f" (known: {', '.join(sorted(allowed))})"
            raise UsageError(f"{where}: unknown key {unknown[0]!r}{hint}")
    return value


def _rule(value: Any, where: str) -> LayerRule:
    rule = _mapping(value, where, {"skip"})
    skip = rule.get("skip")
    if skip is not None and not isinstance(skip, bool):
        raise UsageError(f"{where}.skip must be true or false")
    return LayerRule(skip)


def _int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{where} must be an integer >= {minimum}, not {value!r}")
    return value


def _float_or_none(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UsageError(f"{where} must be a number >= 0 or null, not {value!r}")
    return float(value)


def _opt(top: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = top.get(key)
    if value is not None and not isinstance(value, kind):
        raise UsageError(f"{where}: {key} must be a {kind.__name__}")
    return value
