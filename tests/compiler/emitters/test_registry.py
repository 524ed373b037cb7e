"""Targets and emitters agree: what a profile offers, its format's emitter builds, and plan() says so first.

``edgeship.targets`` is the one source of truth for formats, precisions and Core ML OS minimums;
these tests fail when an emitter and the target tables drift apart (a Jetson profile offering a
precision its emitter refuses only after the export, two Core ML OS tables).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeship import targets
from edgeship.compiler import Recipe, SourceModel, compile_model, emitters, plan
from edgeship.compiler.coreml import check_request
from edgeship.compiler.emitters import EmitRequest, Emitted, Emitter
from edgeship.errors import UsageError
from edgeship.runtime.package import generate_key
from edgeship.runtime.package.manifest import TensorSpec
from edgeship.targets.builtin import BUILTIN_PROFILES
from edgeship.targets.profile import COREML_SPEC_VERSIONS, PRECISIONS_BY_FORMAT, ProfileError


def _source(kind: str = "torch") -> SourceModel:
    """A source record without a model behind it: plan() must decide from the kind and shapes alone."""
    spec = TensorSpec("x", "float32", (1, 4))
    return SourceModel(kind, (spec,), (TensorSpec("y", "float32", (1, 2)),), {"x": np.zeros((1, 4), np.float32)}, "0")


@pytest.fixture(scope="module")
def linear() -> SourceModel:
    torch = pytest.importorskip("torch")
    from edgeship.compiler import from_module

    torch.manual_seed(0)
    return from_module(torch.nn.Linear(4, 2).eval(), np.ones((1, 4), np.float32), input_names=["x"], output_names=["y"])


@pytest.fixture
def jetson_tensorrt_7():
    profile = targets.register(
        targets.TargetProfile(
            name="test-jetson-trt7",
            description="a JetPack 4 board with TensorRT 7.1 (before explicit Q/DQ)",
            format="tensorrt-onnx",
            precisions=("fp16", "int8-qdq", "fp32"),
            runtime="tensorrt",
            runtime_version="7.1",
            gpu_arch="sm_72",
            compute_capability="7.2",
        )
    )
    yield profile
    targets.unregister(profile.name)


@pytest.mark.parametrize("profile", BUILTIN_PROFILES, ids=lambda p: p.name)
def test_every_precision_a_builtin_profile_offers_is_built_by_its_formats_emitter(profile):
    emitter = emitters.get(profile.format)
    assert emitter.format == profile.format
    for precision in profile.precisions:
        assert precision in emitter.precisions, (profile.name, precision)
        emitter.check(profile, precision)  # raises UsageError if the emitter would refuse it
    assert plan(_source(), [profile.name], Recipe.from_dict({"variants": {profile.name: list(profile.precisions)}}))


@pytest.mark.parametrize("fmt", targets.FORMATS)
def test_each_format_has_an_emitter_that_builds_every_precision_the_format_carries(fmt):
    # A user profile validated against PRECISIONS_BY_FORMAT must never reach an emitter that refuses it.
    assert set(emitters.get(fmt).precisions) == PRECISIONS_BY_FORMAT[fmt]


def test_every_emitter_format_has_a_builtin_profile():
    offered = {p.format for p in BUILTIN_PROFILES}
    for fmt, emitter in emitters.all_emitters().items():
        assert fmt in offered, f"emitter {type(emitter).__name__} has no target profile"


def test_jetson_profiles_offer_fp32_and_the_tensorrt_emitter_builds_it():
    emitter = emitters.get("tensorrt-onnx")
    for name in ("jetson-orin-nano", "jetson-agx-orin", "jetson-xavier-nx"):
        assert "fp32" in targets.get(name).precisions
        emitter.check(targets.get(name), "fp32")


def test_unknown_format_is_one_line_naming_it_and_the_known_ones():
    with pytest.raises(UsageError) as info:
        emitters.get("openvino")
    message = str(info.value)
    assert "\n" not in message and "'openvino'" in message
    assert all(fmt in message for fmt in targets.FORMATS)


def test_register_refuses_formats_and_precisions_the_targets_do_not_know():
    class OpenVino(Emitter):
        format = "openvino"
        precisions = ("fp32",)

        def emit(self, request: EmitRequest) -> Emitted:
            raise NotImplementedError

    with pytest.raises(ValueError, match="'openvino' is not a target format"):
        emitters.register(OpenVino)

    class Int4Onnx(Emitter):
        format = "onnx"
        precisions = ("fp32", "int4-block")

        def emit(self, request: EmitRequest) -> Emitted:
            raise NotImplementedError

    with pytest.raises(ValueError, match=r"int4-block"):
        emitters.register(Int4Onnx)

    class SecondOnnx(Emitter):
        format = "onnx"
        precisions = ("fp32",)

        def emit(self, request: EmitRequest) -> Emitted:
            raise NotImplementedError

    with pytest.raises(ValueError, match="already has emitter OnnxEmitter"):
        emitters.register(SecondOnnx)
    with pytest.raises(TypeError):
        emitters.register(object)  # type: ignore[type-var]
    assert type(emitters.get("onnx")).__name__ == "OnnxEmitter"


def test_a_registered_emitter_is_the_one_compile_uses(linear, tmp_path):
    seen: list[tuple[str, str]] = []

    class Recording(Emitter):
        format = "onnx"
        precisions = ("fp32",)

        def emit(self, request: EmitRequest) -> Emitted:
            seen.append((request.profile.name, request.precision))
            raise UsageError("recorded")

    emitters.register(Recording, replace=True)
    try:
        # The profile offers int8-dynamic, this emitter does not build it: refused in plan, in one line.
        refused = Recipe.from_dict({"variants": {"linux-x86_64": ["fp32", "int8-dynamic"]}})
        with pytest.raises(UsageError) as info:
            compile_model(linear, ["linux-x86_64"], tmp_path / "refused", generate_key(), recipe=refused)
        assert str(info.value) == (
            "target linux-x86_64 cannot run precision 'int8-dynamic': the onnx emitter builds fp32; "
            "the target offers fp32"
        )
        assert seen == [] and list((tmp_path / "refused").iterdir()) == []
        report = compile_model(linear, ["linux-x86_64"], tmp_path / "dist", generate_key())
    finally:
        emitters.unregister("onnx")
    assert seen == [("linux-x86_64", "fp32")] and report.variants[0].error == "recorded"
    assert type(emitters.get("onnx")).__name__ == "OnnxEmitter"  # the built-in one comes back


def test_plan_refuses_what_the_emitter_cannot_build_before_any_work(jetson_tensorrt_7, tmp_path):
    recipe = Recipe.from_dict({"variants": {jetson_tensorrt_7.name: ["fp16", "int8-qdq"]}})
    out = tmp_path / "dist"
    with pytest.raises(UsageError) as info:
        compile_model(_source(), [jetson_tensorrt_7.name], out, generate_key(), recipe=recipe)
    message = str(info.value)
    assert "\n" not in message
    assert jetson_tensorrt_7.name in message and "'int8-qdq'" in message and "7.1" in message
    assert "offers fp16, fp32" in message
    assert list(out.iterdir()) == []  # nothing was exported: the source has no model to export anyway


@pytest.mark.parametrize(
    ("kind", "target", "match"),
    [
        ("keras", "ios17", "Keras and SavedModel sources compile to TFLite targets only"),
        ("onnx", "android-arm64", "ONNX sources compile to ONNX and TensorRT targets only; pass the PyTorch"),
        ("onnx", "ios18", "needs a coreml artifact, which edgeship does not build from ONNX sources"),
    ],
)
def test_a_source_the_targets_emitter_cannot_convert_is_refused_in_plan(kind, target, match):
    with pytest.raises(UsageError, match=match):
        plan(_source(kind), [target], Recipe())


def test_core_ml_emitter_and_profiles_read_one_os_table():
    # For every OS and precision: a profile can be built exactly when the emitter accepts the request.
    for min_os in COREML_SPEC_VERSIONS:
        for precision in PRECISIONS_BY_FORMAT["coreml"]:
            try:
                targets.TargetProfile(
                    name="t", description="d", format="coreml", precisions=(precision,), runtime="coreml",
                    runtime_version="8", min_os=min_os,
                )  # fmt: skip
                profile_ok = True
            except ProfileError:
                profile_ok = False
            try:
                check_request(precision, min_os)
                emitter_ok = True
            except UsageError as exc:
                emitter_ok = False
                assert min_os in str(exc) and precision in str(exc)
            assert profile_ok == emitter_ok, (min_os, precision)


def test_tensorrt_fp32_reaches_the_build_spec(linear, tmp_path: Path):
    from edgeship.runtime.backends.tensorrt_spec import BuildSpec

    profile = targets.get("jetson-orin-nano")
    emitted = emitters.get(profile.format).emit(EmitRequest(linear, profile, "fp32", tmp_path / "a"))
    spec = BuildSpec.from_json(emitted.files["model/build_spec.json"].read_bytes())
    assert spec.precision == "fp32" and spec.min_tensorrt_version == "10.3"
    assert emitted.format == "tensorrt-onnx" and emitted.precision == "fp32" and "fp32" in emitted.route
    assert not any(n.startswith("calibration") for n in emitted.notes)
