"""compile_model: source -> one validated, signed package per (target, precision).

Every request is checked before any work starts (unknown target, a precision the target
cannot run, a known runtime defect, data that does not fit the model, an unwritable output
directory), so a bad request fails in a second with one line, and nothing is left in the
output directory. Packages are written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeship import __version__
from edgeship import targets as target_profiles
from edgeship.compiler import data as datasets
from edgeship.compiler import emitters, quality
from edgeship.compiler import report as reports
from edgeship.compiler.emitters import EmitRequest
from edgeship.compiler.emitters.base import ConversionCache
from edgeship.compiler.recipe import Recipe
from edgeship.compiler.search import budget as search_budget
from edgeship.compiler.source import SourceModel
from edgeship.compiler.validate import Metrics, stage, validate
from edgeship.errors import EdgeshipError, UsageError
from edgeship.runtime.package import Manifest, Provenance, write_package
from edgeship.runtime.stats import compute_baseline

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
DYNAMIC_INT8_QUIRK = "dynamic-int8-fc-per-channel-wrong"
_TOOLS = ("torch", "litert-torch", "ai-edge-quantizer", "ai-edge-litert", "onnx", "onnxruntime", "coremltools")


@dataclass
class VariantResult:
    target: str
    precision: str
    format: str
    route: str
    package: Path | None
    metrics: Metrics
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    gate: str | None = None  # the quality budget the variant was held to (``quality.Budget.describe``)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "precision": self.precision,
            "format": self.format,
            "route": self.route,
            "package": str(self.package) if self.package else None,
            "metrics": self.metrics.to_json(),
            "notes": self.notes,
            "error": self.error,
            "gate": self.gate,
        }


@dataclass
class CompileReport:
    name: str
    version: int
    variants: list[VariantResult]
    report_json: Path
    report_html: Path
    #: Per target searched for a budget: every candidate tried, the winner and why (``search_target``).
    searches: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def failed(self) -> list[VariantResult]:
        return [v for v in self.variants if v.error is not None]


def plan(
    source: SourceModel, targets: Sequence[str], recipe: Recipe
) -> list[tuple[target_profiles.TargetProfile, str]]:
    """Resolve (target, precision) pairs; raise ``UsageError`` for anything that cannot be built.

    Does no export or conversion: the target's profile says what it runs, and the emitter registered
    for its format (``emitters.get(profile.format)``) says what it can build from this source."""
    if not targets:
        raise UsageError("name at least one target (--target); 'edgeship targets list' shows them")
    unknown_in_recipe = sorted(set(recipe.variants) - set(targets))
    if unknown_in_recipe:
        raise UsageError(
            f"the recipe lists variants for {', '.join(unknown_in_recipe)}, which is not among the --target values"
        )
    out = []
    for name in targets:
        try:
            profile = target_profiles.get(name)
        except target_profiles.UnknownTargetError as exc:
            raise UsageError(str(exc)) from None
        emitter = emitters.get(profile.format)
        if source.kind not in emitter.sources:
            raise UsageError(_wrong_source(name, profile.format, source.kind))
        if source.dynamic_batch and not profile.dynamic_batch:
            raise UsageError(f"target {name} does not run a dynamic batch dimension; compile with a static batch")
        for precision in recipe.variants.get(name, (profile.default_precision,)):
            plan_one(source, profile, precision)
            out.append((profile, precision))
    return out


def compile_model(
    source: SourceModel,
    targets: Sequence[str],
    out_dir: str | Path,
    signing_key: Ed25519PrivateKey,
    *,
    recipe: Recipe | None = None,
    calibration: datasets.Dataset | None = None,
    evaluation: datasets.Dataset | None = None,
    training: datasets.Dataset | None = None,
    name: str | None = None,
    progress: Progress | None = None,
    budget: search_budget.Budget | None = None,
) -> CompileReport:
    """Compile ``source`` for every target and precision, validate each artifact, write signed packages.

    Raises ``UsageError`` for a request that cannot be built (before any work starts). A variant
    that fails while building (a converter error) or misses its quality budget on the held-out data
    (``compiler/quality.py``: the recipe's, else a default per precision) is reported in its
    ``VariantResult.error`` and gets no package; the others still do.

    When the recipe lists ``passes`` (prune, distill), they run first on a working copy of the
    source, with ``training`` data (labels where a loss needs them); every variant is emitted from
    the result and validated against it in fp32 (the source stays the provenance hash).

    With a ``budget`` (or, without one, for a target the recipe names no precision for when
    ``calibration`` is given), the target's precision is searched instead: see ``search_target``.
    Raises ``UsageError`` for ``budget.max_accuracy_drop`` without labelled held-out data.
    """
    recipe = recipe or Recipe()
    say = progress or (lambda _msg: None)
    out = _writable(Path(out_dir))
    variants = plan(source, targets, recipe)
    name = name or recipe.name or "model"
    calib = datasets.check_against(calibration, source.inputs, "calibration data") if calibration is not None else None
    evaluation = (
        datasets.check_against(evaluation, source.inputs, "evaluation data") if evaluation is not None else None
    )
    if calib is not None:
        calib = calib.take(recipe.calibration_samples)
    if evaluation is not None:
        held_out = evaluation
    elif calib is not None and len(calib) > 1:
        calib, held_out = datasets.split(calib, recipe.held_out)
    else:
        held_out = datasets.Dataset({k: v for k, v in source.example.items()}, source="example inputs")
    if budget is not None and budget.max_accuracy_drop is not None and held_out.labels is None:
        raise UsageError(
            "--max-accuracy-drop needs labels: give --eval data with a 'labels' array, or use --min-cosine"
        )
    batch = source.feed_batch
    # Passes (prune, distill) change the model: the variants are then held to the model the passes made
    # (a conversion's fidelity); what the passes themselves cost is in their report entries. The
    # quantize.* passes mean to keep the function: variants are held to the model before them.
    working, pass_entries, held_to = _run_passes(source, recipe, calib, training, held_out, say)
    if held_out.reference:
        missing = [t.name for t in source.outputs if t.name not in held_out.reference]
        if missing:
            raise UsageError(f"evaluation data has reference outputs but not for {', '.join(missing)}")
        reference = {t.name: held_out.reference[t.name] for t in source.outputs}
    else:
        what = (
            "source"
            if held_to is source
            else "model the passes made"
            if held_to is working
            else "model before quantize.*"
        )
        say(f"reference outputs of the fp32 {what} on {len(held_out)} held-out samples")
        reference = _reference(held_to, held_out, batch)
    base_in = calib if calib is not None else held_out
    baseline = compute_baseline(
        {k: [v] for k, v in base_in.inputs.items()}, {k: [v] for k, v in _reference(working, base_in, batch).items()}
    )
    tools = _tools()
    ctx = _Build(
        source, out, name, held_out, reference, baseline, tools, signing_key, say, calib, working, pass_entries,
        training=training,
    )  # fmt: skip
    searched = _searched_targets(targets, recipe, budget, calib)
    results: list[VariantResult] = []
    searches: dict[str, dict[str, Any]] = {}
    ctx.root = Path(tempfile.mkdtemp(prefix=".edgeship-build-", dir=out))
    ctx.cache = ConversionCache(ctx.root / ".fp32-cache")
    try:
        for profile, precision in variants:
            if profile.name in searched:
                if profile.name not in searches:
                    result, searches[profile.name] = search_target(ctx, profile, recipe, budget)
                    results.append(result)
                continue
            say(f"{profile.name}: {profile.format} {precision}")
            result, built = _build(ctx, profile, precision, recipe, f"{profile.name}-{precision}")
            if built is not None:
                verdict = quality.check(recipe, precision, result.metrics, searched="sensitivity" in result.route)
                result.gate = verdict.budget.describe()
                result.notes += [f"quality gate not checked here: {what}" for what in verdict.unchecked]
                if verdict.passed:
                    _package(ctx, result, built, recipe)
                else:
                    result.error = verdict.reason
            results.append(result)
    finally:
        shutil.rmtree(ctx.root, ignore_errors=True)
    report = {
        "name": name,
        "version": recipe.version,
        "source_sha256": source.sha256,
        "edgeship": __version__,
        "tools": tools,
        "calibration_samples": 0 if calib is None else len(calib),
        "held_out_samples": len(held_out),
        "passes": pass_entries,
        "variants": [r.to_json() for r in results],
    }
    if searches:
        report["search"] = searches
        winners = [(t, s["winner_precision"]) for t, s in searches.items() if s["winner_precision"]]
        if len(winners) == 1 and len(searches) == len(results):
            report["winner"] = {"target": winners[0][0], "precision": winners[0][1]}
    json_path, html_path = out / f"{name}-v{recipe.version}-report.json", out / f"{name}-v{recipe.version}-report.html"
    reports.write_json(json_path, report)
    reports.write_html(html_path, report)
    return CompileReport(name, recipe.version, results, json_path, html_path, searches)


@dataclass
class _Build:
    """What every variant build of one compile shares."""

    source: SourceModel
    out: Path
    name: str
    held_out: datasets.Dataset
    reference: dict[str, np.ndarray]
    baseline: dict[str, Any]
    tools: dict[str, str]
    key: Ed25519PrivateKey
    say: Progress
    calib: datasets.Dataset | None
    working: SourceModel
    """What the emitters convert: the source, or the model the recipe's passes made of it."""
    passes: list[dict[str, Any]]
    root: Path = Path()
    #: The working model's fp32 conversions, shared by every variant and search candidate.
    cache: ConversionCache | None = None
    #: Training data (``--train``) for a pass the budget search runs (``quantize.qat``).
    training: datasets.Dataset | None = None


@dataclass
class _Built:
    """An emitted and validated artifact, not yet packaged."""

    emitted: Any
    draft: Manifest
    golden: bytes | None
    tolerance: Any


def _build(
    ctx: _Build, profile: target_profiles.TargetProfile, precision: str, recipe: Recipe, tag: str
) -> tuple[VariantResult, _Built | None]:
    """Emit and validate one artifact in ``ctx.root / tag``; no gate, no package. A converter that
    fails makes a ``VariantResult`` with ``error`` set (and no ``_Built``)."""
    work = ctx.root / tag
    work.mkdir(parents=True)
    try:
        with converter_output(work / "convert.log"):
            emitted = emitters.get(profile.format).emit(
                EmitRequest(
                    ctx.working, profile, precision, work / "artifact", ctx.calib, recipe, tuple(ctx.passes), ctx.cache
                )
            )
    except Exception as exc:
        if not isinstance(exc, EdgeshipError):  # a converter crashed: report it, keep the other variants
            log.debug("emitter crashed", exc_info=True)
            lines = str(exc).strip().splitlines()
            # Keep what the converter printed: the build directory is removed at the end.
            kept = ctx.out / f"{ctx.name}-{tag}-v{recipe.version}.convert.log"
            shutil.copyfile(work / "convert.log", kept)
            exc = UsageError(
                f"the {profile.format} converter failed: {type(exc).__name__}: {lines[0] if lines else ''} "
                f"(converter output: {kept})"
            )
        return VariantResult(profile.name, precision, profile.format, "-", None, Metrics(0, None), error=str(exc)), None
    draft = Manifest(
        name=ctx.name,
        version=recipe.version,
        label=recipe.label,
        target=profile.name,
        format=emitted.format,
        precision=precision,
        artifact_path=emitted.artifact,
        inputs=emitted.inputs,
        outputs=emitted.outputs,
        files=(),
        provenance=Provenance(tools=ctx.tools, recipe=_recipe_json(recipe), source_sha256=ctx.source.sha256),
    )
    ctx.say(f"{profile.name}: validating {precision} through the runtime")
    root = stage(emitted, work / "stage")
    try:
        with converter_output(work / "validate.log"):
            metrics, golden, tolerance = validate(
                emitted,
                draft,
                root,
                ctx.working,
                ctx.held_out,
                ctx.reference,
                golden_cases=recipe.golden_cases,
                latency_runs=recipe.latency_runs,
                backend=_validation_backend(profile.format),
            )
    except EdgeshipError as exc:
        # The runtime could not load or run this artifact (an ONNX Runtime graph optimizer refusing a Q/DQ
        # graph, say): that variant fails with the reason; the others go on.
        failed = Metrics(0, None, size_bytes=emitted.size_bytes)
        error = f"validation could not run the artifact: {exc}"
        return VariantResult(profile.name, precision, emitted.format, emitted.route, None, failed, error=error), None
    metrics.needs_hardware.extend(emitters.get(profile.format).needs_hardware)
    result = VariantResult(profile.name, precision, emitted.format, emitted.route, None, metrics, list(emitted.notes))
    return result, _Built(emitted, draft, golden, tolerance)


def _package(ctx: _Build, result: VariantResult, built: _Built, recipe: Recipe) -> None:
    """Write the signed package of a validated variant that passed its gate; sets ``result.package``."""
    precision, target = result.precision, result.target
    contents: dict[str, Any] = dict(built.emitted.files)
    contents["baseline/stats.json"] = json.dumps(ctx.baseline).encode()
    contents["report/report.json"] = json.dumps(
        {
            "target": target,
            "precision": precision,
            "route": result.route,
            "metrics": result.metrics.to_json(),
            "notes": result.notes,
            "passes": ctx.passes,
        },
        indent=2,
        default=str,
    ).encode()
    final = dataclasses.replace(
        built.draft, golden=built.tolerance, baseline_path="baseline/stats.json", report_path="report/report.json"
    )
    if built.golden is not None:
        contents["golden/vectors.npz"] = built.golden
    package = ctx.out / f"{ctx.name}-{target}-{precision}-v{recipe.version}.edgepkg"
    ctx.say(f"{target}: writing {package.name}")
    write_package(package, final, contents, [ctx.key])
    result.package = package
    if target_profiles.get(target).runtime == "tflite-runtime" and built.golden is not None:
        ctx.say(f"{target}: checking {package.name} with tflite-runtime")
        _check_with_tflite_runtime(result, ctx.key, ctx.root)


#: The cosine the layer search aims for in a mixed-precision candidate when the budget sets none
#: (an accuracy budget): int8 layers set apart until the calibration data reaches it.
MIXED_DEFAULT_COSINE = 0.995
#: The layer search measures on the calibration data and the budget is checked on held-out data,
#: where the same model lands a little lower (MiniLM: 0.995 searched, 0.9944 held out); the
#: search aims this share of the gap to 1 above the budget's cosine (0.995 -> 0.996).
MIXED_HEADROOM = 0.2


def mixed_target(cosine: float) -> float:
    """The calibration cosine a mixed candidate searches to for a held-out ``cosine``."""
    return round(cosine + (1.0 - cosine) * MIXED_HEADROOM, 6)


def _searched_targets(
    targets: Sequence[str], recipe: Recipe, budget: search_budget.Budget | None, calib: datasets.Dataset | None
) -> set[str]:
    """Targets whose precision the budget search chooses: every target with a budget; without one,
    those the recipe names no precision for, when calibration data is given (the default budget)."""
    if budget is not None:
        return set(targets)
    if calib is None:
        return set()
    return {t for t in targets if t not in recipe.variants}


def search_target(
    ctx: _Build, profile: target_profiles.TargetProfile, recipe: Recipe, budget: search_budget.Budget | None
) -> tuple[VariantResult, dict[str, Any]]:
    """Choose the target's artifact with the budget search and package only the winner.

    Candidates (``search_budget.candidates``): the precisions the recipe names for the target, else
    every precision it offers that this request can build but ``search_budget.OPT_IN`` (w8a16),
    smallest artifact first; then other
    calibrations and mixed precision where the emitter has them; fp16 and fp32 last. Each is built
    through the normal emit + validate path on the held-out data. A candidate's budget is the
    user's (``budget``) merged with the quality gate's (``quality.budget``: the recipe's
    ``validation`` keys, else the default per precision; stricter for float precisions when the
    user sets no cosine). Returns the target's ``VariantResult`` (the winner, packaged, with the
    search's reason in its notes; or, when nothing holds, the closest candidate's figures with
    ``error`` naming it) and the search's JSON for the report.
    """
    user = budget or search_budget.Budget()
    emitter = emitters.get(profile.format)
    if profile.name in recipe.variants:
        wanted = list(recipe.variants[profile.name])
    else:
        wanted = [p for p in profile.precisions if p not in search_budget.OPT_IN]
    buildable = []
    for precision in wanted:
        try:
            plan_one(ctx.source, profile, precision)
        except UsageError:
            continue
        buildable.append(precision)
    merged = dataclasses.replace(
        recipe,
        min_cosine=user.min_cosine if user.min_cosine is not None else recipe.min_cosine,
        max_accuracy_drop=user.max_accuracy_drop if user.max_accuracy_drop is not None else recipe.max_accuracy_drop,
    )
    has_labels = ctx.held_out.labels is not None

    def budget_of(candidate: search_budget.Candidate) -> search_budget.Budget:
        gate = quality.budget(merged, candidate.precision, has_labels=has_labels, searched=False)
        return search_budget.Budget(gate.min_cosine, gate.max_accuracy_drop, user.max_size_mb, user.max_latency_ms)

    mixed = mixed_target(
        user.min_cosine if user.min_cosine is not None else recipe.quantize.min_cosine or MIXED_DEFAULT_COSINE
    )
    candidates = search_budget.candidates(
        buildable or list(wanted),
        calibration_methods=emitter.calibration_methods if ctx.calib is not None else {},
        layer_search=emitter.layer_search,
        mixed_cosine=mixed,
        smoothing=search_budget.ACTIVATION_QUANTIZED if _smoothable(ctx, recipe) else (),
        qat=search_budget.STATIC_ACTIVATIONS if _trainable(ctx, recipe) else (),
    )
    built: dict[str, tuple[VariantResult, _Built | None, Recipe, _Build]] = {}
    seconds: dict[str, float] = {}
    # The model after quantize.smooth / quantize.qat: computed once, for the first candidate needing it.
    with_pass: dict[str, tuple[_Build, Recipe] | str] = {}

    def evaluate(candidate: search_budget.Candidate) -> search_budget.CandidateResult:
        ctx.say(f"{profile.name}: budget search, candidate {candidate.name}")
        variant_recipe = dataclasses.replace(
            recipe,
            variants={**recipe.variants, profile.name: (candidate.precision,)},
            calibration_method=candidate.calibration or recipe.calibration_method,
            quantize=dataclasses.replace(recipe.quantize, min_cosine=candidate.min_cosine),
        )
        build_ctx = ctx
        extra = "quantize.qat" if candidate.kind == "qat" else None
        if candidate.kind == "smoothed" or candidate.smoothed:
            extra = "quantize.smooth"
        if extra is not None:
            if extra not in with_pass:
                with_pass[extra] = _with_pass(ctx, recipe, extra)
            made = with_pass[extra]
            if isinstance(made, str):
                return search_budget.CandidateResult(0, error=made)
            build_ctx, passed = made
            variant_recipe = dataclasses.replace(variant_recipe, passes=passed.passes)
        tag = f"{profile.name}-search-{len(built)}-{candidate.precision}"
        began = time.perf_counter()
        result, artifact = _build(build_ctx, profile, candidate.precision, variant_recipe, tag)
        seconds[candidate.name] = time.perf_counter() - began
        built[candidate.name] = (result, artifact, variant_recipe, build_ctx)
        m = result.metrics
        return search_budget.CandidateResult(
            m.size_bytes, m.cosine_min, m.accuracy_drop_points, m.latency_median_ms, result.error
        )

    found = search_budget.search(candidates, evaluate, budget_of)
    report = found.to_json()
    for trial_json, trial in zip(report["trials"], found.trials):
        trial_json["metrics"] = built[trial.candidate.name][0].metrics.to_json()
        trial_json["seconds"] = round(seconds[trial.candidate.name], 2)  # build + validation wall time
    report["budget"] = user.describe() if budget is not None else "the default quality gate"
    report["winner_precision"] = found.winner.candidate.precision if found.winner else None
    chosen = found.winner or found.best
    assert chosen is not None
    result, artifact, variant_recipe, build_ctx = built[chosen.candidate.name]
    result.gate = chosen.budget.describe()
    result.notes = [f"budget search: {found.reason}", *result.notes]
    if found.winner is None:
        result.error = (
            f"budget search: {found.reason}. No package written: relax the budget (--min-cosine, "
            "--max-accuracy-drop, --max-size-mb, --max-latency-ms), or give more representative calibration data"
        )
    elif artifact is not None:
        _package(build_ctx, result, artifact, variant_recipe)
    return result, report


def _smoothable(ctx: _Build, recipe: Recipe) -> bool:
    """Whether the budget search tries smoothed PTQ: calibration data, a PyTorch transformer (a
    LayerNorm and a Linear), and a recipe that does not smooth already."""
    if ctx.calib is None or ctx.working.kind != "torch" or any(s.name == "quantize.smooth" for s in recipe.passes):
        return False
    from edgeship.compiler.passes.smooth import applies_to

    return applies_to(ctx.working.module)


def _trainable(ctx: _Build, recipe: Recipe) -> bool:
    """Whether the budget search tries QAT: calibration data (the pass distils from the fp32 model,
    so it needs no labels), a PyTorch model, and a recipe that does not train for int8 already."""
    return (
        ctx.calib is not None and ctx.working.kind == "torch" and all(s.name != "quantize.qat" for s in recipe.passes)
    )


def _with_pass(ctx: _Build, recipe: Recipe, name: str) -> tuple[_Build, Recipe] | str:
    """The build context with the working model after pass ``name`` at its defaults
    (``quantize.smooth``, ``quantize.qat``) and the recipe that lists the pass (so the provenance
    reproduces the artifact); or why it cannot be."""
    from edgeship.compiler.passes import get, run_passes
    from edgeship.compiler.recipe import PassStep

    settings = get(name).configure({}, name)
    try:
        working = run_passes(
            ctx.working,
            [(name, settings)],
            calibration=ctx.calib,
            training=ctx.training,
            seed=recipe.seed + len(recipe.passes),
            progress=ctx.say,
        )
    except UsageError as exc:
        return str(exc)
    # Its own conversion cache: the compile's holds the conversions of the model before the pass.
    passed_ctx = dataclasses.replace(
        ctx,
        working=working.as_source(),
        passes=[*ctx.passes, *working.history],
        cache=ConversionCache(ctx.root / f".fp32-cache-{name}"),
    )
    return passed_ctx, dataclasses.replace(recipe, passes=(*recipe.passes, PassStep(name, settings)))


def plan_one(source: SourceModel, profile: target_profiles.TargetProfile, precision: str) -> None:
    """Raise ``UsageError`` when ``precision`` cannot be built for ``profile`` from ``source`` (``plan``'s rules)."""
    if precision == "int8-dynamic" and profile.has_quirk(DYNAMIC_INT8_QUIRK):
        raise UsageError(
            f"target {profile.name}: its runtime computes wrong results for dynamic-int8 fully-connected layers with "
            "per-channel weights (measured accuracy 0.108); use int8-weight-only or int8-static"
        )
    if precision not in profile.precisions:
        raise UsageError(
            f"target {profile.name} cannot run precision {precision!r}; it runs {', '.join(profile.precisions)}"
        )
    emitters.get(profile.format).check(profile, precision)


def _wrong_source(target: str, fmt: str, kind: str) -> str:
    """One line: the target's emitter does not convert this kind of source, and which targets do."""
    names = {"torch": "PyTorch", "keras": "Keras and SavedModel", "onnx": "ONNX"}
    known = emitters.all_emitters()
    able = [known[f].label or f for f in target_profiles.FORMATS if f in known and kind in known[f].sources]
    hint = "; pass the PyTorch model (.pt2) for this target" if "torch" in emitters.get(fmt).sources else ""
    return (
        f"target {target} needs a {fmt} artifact, which edgeship does not build from {names.get(kind, kind)} "
        f"sources; {names.get(kind, kind)} sources compile to {' and '.join(able) or 'no'} targets only{hint}"
    )


#: Passes that keep the model's function and make int8 lose less. Variants are held to the model
#: before them: what they change in fp32 (QAT moves the weights) counts against the budget.
QUANTIZE_PASSES = frozenset({"quantize.smooth", "quantize.qat"})


def _run_passes(
    source: SourceModel,
    recipe: Recipe,
    calib: datasets.Dataset | None,
    training: datasets.Dataset | None,
    held_out: datasets.Dataset,
    say: Progress,
) -> tuple[SourceModel, list[dict[str, Any]], SourceModel]:
    """The model to emit (the source itself when the recipe lists no passes), the passes' report
    entries, and the model variants are held to: the one after the last pass that is not a
    ``QUANTIZE_PASSES`` pass (a pruned or distilled model is meant to differ from its source; a
    smoothed or QAT-trained one is not)."""
    if not recipe.passes:
        return source, [], source
    from edgeship.compiler.passes import run_passes

    if training is not None:
        training = datasets.check_against(training, source.inputs, "training data")
    steps = [(step.name, step.settings) for step in recipe.passes]
    cut = max((i + 1 for i, (name, _) in enumerate(steps) if name not in QUANTIZE_PASSES), default=0)
    working = run_passes(
        source,
        steps,
        calibration=calib,
        training=training,
        evaluation=held_out,
        seed=recipe.seed,
        progress=say,
        snapshot_after=cut if 0 < cut < len(steps) else None,
    )
    made = working.as_source()
    held_to = source if cut == 0 else made if cut == len(steps) else working.snapshot
    assert held_to is not None
    return made, working.history, held_to


def tflite_runtime_python() -> Path | None:
    """A Python that has tflite-runtime (and edgeship's base install): ``EDGESHIP_TFLITE_RUNTIME_PYTHON``,
    else ``.venv-tflite`` in the working directory or beside the edgeship source tree."""
    import os

    env = os.environ.get("EDGESHIP_TFLITE_RUNTIME_PYTHON")
    candidates = [Path(env)] if env else []
    candidates += [
        Path.cwd() / ".venv-tflite/bin/python",
        Path(__file__).resolve().parents[1] / ".venv-tflite/bin/python",
    ]
    return next((p for p in candidates if p.is_file()), None)


def _check_with_tflite_runtime(result: VariantResult, key: Ed25519PrivateKey, workdir: Path) -> None:
    """Run the package's golden vectors in a tflite-runtime interpreter (a numpy-1 venv), in a child process
    (``edgeship.runtime.check.run_check``, as the device agent checks a slot).

    A failure removes the package: the device would compute something else than the host did."""
    from edgeship.runtime.check import run_check
    from edgeship.runtime.package.signing import public_key_pem

    python = tflite_runtime_python()
    assert result.package is not None
    if python is None:
        result.metrics.needs_hardware.append(
            "golden vectors in tflite-runtime: no interpreter found (set EDGESHIP_TFLITE_RUNTIME_PYTHON)"
        )
        return
    pub = workdir / "check.pub"
    pub.write_bytes(public_key_pem(key.public_key()))
    check = run_check(
        result.package,
        trusted_key_paths=[pub],
        runs=0,
        threads=1,
        python=python,
        options={"interpreter": "tflite_runtime"},
        timeout=600,
        nice=0,
    )
    if check.ok:
        version = (check.library or "").removeprefix("tflite_runtime").strip() or "?"
        result.metrics.checked_here.append(f"golden vectors in tflite-runtime {version} (subprocess)")
        return
    golden_failures = check.golden["failures"] if check.code == "golden_failed" and check.golden else []
    why = "; ".join(golden_failures[:2]) if golden_failures else check.message
    result.error = f"tflite-runtime does not reproduce the golden vectors: {why}"
    result.package.unlink(missing_ok=True)
    result.package = None


@contextlib.contextmanager
def converter_output(path: Path) -> Iterator[None]:
    """Send what converters print (progress lines, warnings, native logs) to ``path`` instead of the terminal.

    Works on file descriptors 1 and 2, so native libraries' output is captured too. The CLI draws its
    own progress on a duplicate of the terminal's descriptor taken before, so that stays visible.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _validation_backend(fmt: str) -> str:
    # Each emitter names the backend its artifacts are checked on here (TensorRT Q/DQ graphs in
    # ONNX Runtime, Core ML through the reference evaluator).
    return emitters.get(fmt).validation_backend


def _reference(source: SourceModel, data: datasets.Dataset, batch: int) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {t.name: [] for t in source.outputs}
    for feed in data.batches(batch):
        for k, v in source.reference(feed).items():
            parts[k].append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _writable(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".edgeship-write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"output directory {out} is not writable: {exc.strerror}") from None
    return out


def _tools() -> dict[str, str]:
    out = {"edgeship": __version__}
    for dist in _TOOLS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _recipe_json(recipe: Recipe) -> dict[str, Any]:
    # Every field, in the shape Recipe.from_dict reads: the provenance reproduces the artifact.
    return recipe.to_dict()
