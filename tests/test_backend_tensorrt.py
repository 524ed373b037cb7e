"""TensorRT backend up to the library boundary: build spec, versions, engine cache, profiles, availability.

TensorRT cannot be installed here, so everything that calls it runs in hil/test_tensorrt_device.py
on a Jetson. What is tested here is the pure logic the backend relies on, with real files on disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from edgeship.errors import ArtifactError, BackendUnavailableError, ModelLoadError
from edgeship.runtime.backends import tensorrt as trt_backend
from edgeship.runtime.backends.base import BackendOptions
from edgeship.runtime.backends.engine_cache import (
    CacheState,
    EngineCache,
    EngineCacheKey,
    judge_cache_entry,
    load_or_build,
    package_sha256,
)
from edgeship.runtime.backends.tensorrt import TensorRTBackend
from edgeship.runtime.backends.tensorrt_spec import (
    BUILD_SPEC_NAME,
    BuildSpec,
    OptimizationProfile,
    ShapeRange,
    check_network_inputs,
    check_tensorrt_version,
    choose_profile,
    parse_version,
    precision_flags,
    version_at_least,
)
from tests.package_fixtures import draft_manifest

# Device-side code: these also run under Python 3.10 in the device-side venv.
pytestmark = pytest.mark.py310

FULL_SPEC: dict[str, Any] = {
    "precision": "int8",
    "min_tensorrt_version": "10.0",
    "workspace_mib": 1024,
    "optimization_profiles": [
        {"x": {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}},
        {"x": {"min": [9, 3, 32, 32], "opt": [16, 3, 32, 32], "max": [32, 3, 32, 32]}},
    ],
    "dla_core": 0,
    "allow_gpu_fallback": True,
    "sparsity_2_4": True,
    "builder_optimization_level": 4,
}

KEY = EngineCacheKey(
    gpu_name="Orin",
    compute_capability="8.7",
    tensorrt_version="10.3.0.30",
    package_sha256="a" * 64,
    spec_sha256="b" * 64,
)


def spec_bytes(**changes: Any) -> bytes:
    obj = dict(FULL_SPEC)
    for key, value in changes.items():
        if value is _DELETE:
            obj.pop(key)
        else:
            obj[key] = value
    return json.dumps(obj).encode()


_DELETE = object()


# --- build spec -------------------------------------------------------------------------


def test_full_build_spec_parses_into_typed_fields():
    spec = BuildSpec.from_json(spec_bytes())
    assert spec.precision == "int8"
    assert spec.min_tensorrt_version == "10.0"
    assert spec.workspace_mib == 1024
    assert spec.dla_core == 0 and spec.allow_gpu_fallback and spec.sparsity_2_4
    assert spec.builder_optimization_level == 4
    assert spec.optimization_profiles[0] == OptimizationProfile(
        (ShapeRange("x", (1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32)),)
    )
    assert len(spec.optimization_profiles) == 2


def test_minimal_build_spec_takes_documented_defaults():
    spec = BuildSpec.from_json(b'{"precision": "fp16", "min_tensorrt_version": "10", "workspace_mib": 256}')
    assert spec == BuildSpec("fp16", "10", 256, (), None, False, False, 3)


def test_build_spec_round_trips_and_its_hash_ignores_layout():
    spec = BuildSpec.from_json(spec_bytes())
    assert BuildSpec.from_json(spec.to_json()) == spec
    reordered = json.dumps(dict(reversed(list(FULL_SPEC.items()))), indent=4).encode()
    assert BuildSpec.from_json(reordered).sha256() == spec.sha256()
    assert BuildSpec.from_json(spec_bytes(workspace_mib=2048)).sha256() != spec.sha256()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("precision", "bf16"),
        ("precision", None),
        ("min_tensorrt_version", "ten"),
        ("min_tensorrt_version", 10),
        ("min_tensorrt_version", "10.0-rc1"),
        ("workspace_mib", 0),
        ("workspace_mib", -5),
        ("workspace_mib", True),
        ("workspace_mib", 1.5),
        ("workspace_mib", "1024"),
        ("optimization_profiles", {"x": {}}),
        ("optimization_profiles", [[]]),
        ("optimization_profiles", [{}]),
        ("optimization_profiles", [{"x": [1, 2, 3]}]),
        ("dla_core", -1),
        ("dla_core", "0"),
        ("dla_core", True),
        ("allow_gpu_fallback", "yes"),
        ("allow_gpu_fallback", 1),
        ("sparsity_2_4", None),
        ("builder_optimization_level", 6),
        ("builder_optimization_level", -1),
        ("builder_optimization_level", 3.0),
    ],
)
def test_each_invalid_field_is_an_artifact_error_naming_it(field: str, value: Any):
    with pytest.raises(ArtifactError, match=rf"build_spec\.json: {field}"):
        BuildSpec.from_json(spec_bytes(**{field: value}))


@pytest.mark.parametrize(
    ("profile", "where"),
    [
        ({"x": {"min": [2], "opt": [1], "max": [3]}}, "optimization_profiles\\[0\\].x"),
        ({"x": {"min": [1], "opt": [4], "max": [3]}}, "optimization_profiles\\[0\\].x"),
        ({"x": {"min": [1, 3], "opt": [1], "max": [1]}}, "optimization_profiles\\[0\\].x"),
        ({"x": {"min": [-1], "opt": [1], "max": [1]}}, "optimization_profiles\\[0\\].x.min"),
        ({"x": {"min": [1], "opt": [1.5], "max": [2]}}, "optimization_profiles\\[0\\].x.opt"),
        ({"x": {"min": [1], "opt": [1]}}, "optimization_profiles\\[0\\].x.max"),
        ({"x": {"min": [1], "opt": [1], "max": [1], "mid": [1]}}, "optimization_profiles\\[0\\].x.mid"),
    ],
)
def test_bad_shape_ranges_name_the_profile_and_input(profile: dict[str, Any], where: str):
    with pytest.raises(ArtifactError, match=where):
        BuildSpec.from_json(spec_bytes(optimization_profiles=[profile]))


def test_profiles_must_all_cover_the_same_inputs():
    profiles = [
        {"x": {"min": [1], "opt": [1], "max": [1]}},
        {"y": {"min": [1], "opt": [1], "max": [1]}},
    ]
    with pytest.raises(ArtifactError, match=r"optimization_profiles\[1\] covers inputs \['y'\]"):
        BuildSpec.from_json(spec_bytes(optimization_profiles=profiles))


def test_a_misspelt_key_is_an_error_naming_it_not_ignored():
    data = json.loads(spec_bytes())
    data["builder_optimisation_level"] = 5
    with pytest.raises(ArtifactError, match="builder_optimisation_level is not a known key"):
        BuildSpec.from_json(json.dumps(data).encode())


@pytest.mark.parametrize("field", BuildSpec.REQUIRED)
def test_missing_required_field_is_named(field: str):
    with pytest.raises(ArtifactError, match=f"{field} is required"):
        BuildSpec.from_json(spec_bytes(**{field: _DELETE}))


def test_dla_core_needs_a_reduced_precision():
    with pytest.raises(ArtifactError, match="dla_core needs precision fp16 or int8"):
        BuildSpec.from_json(spec_bytes(precision="fp32"))


@pytest.mark.parametrize("data", [b"", b"\xff\xfe", b"[1, 2]", b'"int8"', b"{"])
def test_non_object_or_non_json_spec_is_an_artifact_error(data: bytes):
    with pytest.raises(ArtifactError, match=BUILD_SPEC_NAME):
        BuildSpec.from_json(data)


def test_precision_flags_let_int8_fall_back_to_fp16():
    assert precision_flags("fp32") == ()
    assert precision_flags("fp16") == ("FP16",)
    assert set(precision_flags("int8")) == {"INT8", "FP16"}


# --- versions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("installed", "required", "ok"),
    [
        ("10.3.0.30", "10.0", True),
        ("10.0", "10", True),
        ("10", "10.0.0", True),
        ("10.0.0b6", "10.0", True),
        ("9.9.9", "10.0", False),
        ("10.2", "10.10", False),
        ("10.10.0", "10.9", True),
        ("8.6.2.3", "8.6.2.4", False),
        ("11.0.0", "10.7", True),
    ],
)
def test_versions_compare_numerically(installed: str, required: str, ok: bool):
    assert version_at_least(installed, required) is ok


def test_too_old_tensorrt_is_a_load_error_naming_both_versions():
    with pytest.raises(ModelLoadError, match=r"TensorRT >= 10\.3.*TensorRT 8\.6\.2 is installed"):
        check_tensorrt_version("8.6.2", "10.3")
    check_tensorrt_version("10.3.0.30", "10.3")


def test_version_parse_rejects_non_versions():
    assert parse_version(" 10.3.0.30 ") == (10, 3, 0, 30)
    with pytest.raises(ValueError, match="not a version"):
        parse_version("latest")


# --- cache key ----------------------------------------------------------------------------


def test_cache_key_digest_is_stable_across_processes_and_releases():
    # A change to this value orphans every engine cached on every device: change it on purpose only.
    assert KEY.digest() == "8837c07c954c9095e33851a59a1f079b70e6013c835dee9648f9118bfc47c00a"
    code = (
        "from edgeship.runtime.backends.engine_cache import EngineCacheKey as K;"
        f"print(K('Orin','8.7','10.3.0.30','{'a' * 64}','{'b' * 64}').digest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == KEY.digest()


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(EngineCacheKey)])
def test_cache_key_digest_changes_with_every_field(field: str):
    changed = dataclasses.replace(KEY, **{field: getattr(KEY, field) + "x"})
    assert changed.digest() != KEY.digest()
    assert field in " ".join(changed.differences(KEY))


def test_cache_key_json_round_trips_and_rejects_other_shapes():
    assert EngineCacheKey.from_json(KEY.to_json()) == KEY
    data = json.loads(KEY.to_json())
    with pytest.raises(ValueError, match="exactly the fields"):
        EngineCacheKey.from_json(json.dumps({**data, "extra": "1"}).encode())
    with pytest.raises(ValueError, match="exactly the fields"):
        EngineCacheKey.from_json(json.dumps({k: v for k, v in data.items() if k != "gpu_name"}).encode())
    with pytest.raises(ValueError, match="string"):
        EngineCacheKey.from_json(json.dumps({**data, "compute_capability": 8.7}).encode())


def make_package(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(b"onnx graph bytes")
    (root / "model.onnx.data").write_bytes(b"external weights")
    (root / BUILD_SPEC_NAME).write_bytes(spec_bytes())
    (root / "manifest.json").write_bytes(b"{}")
    (root / "manifest.sig").write_bytes(b"sig")
    (root / "golden").mkdir(exist_ok=True)
    (root / "golden" / "vectors.npz").write_bytes(b"golden")
    return root / "model.onnx"


@pytest.mark.parametrize("member", ["model.onnx", "model.onnx.data", BUILD_SPEC_NAME])
def test_package_hash_covers_graph_weights_and_spec(tmp_path: Path, member: str):
    onnx = make_package(tmp_path)
    before = package_sha256(onnx)
    with (tmp_path / member).open("ab") as f:
        f.write(b" ")
    assert package_sha256(onnx) != before


def test_package_hash_ignores_signature_manifest_and_subfolders(tmp_path: Path):
    onnx = make_package(tmp_path)
    before = package_sha256(onnx)
    for member in ("manifest.json", "manifest.sig", "golden/vectors.npz"):
        (tmp_path / member).write_bytes(b"re-signed, renumbered")
    assert package_sha256(onnx) == before


def test_package_hash_counts_file_names(tmp_path: Path):
    onnx = make_package(tmp_path)
    before = package_sha256(onnx)
    (tmp_path / "model.onnx.data").rename(tmp_path / "model.onnx.weights")
    assert package_sha256(onnx) != before


# --- cache decisions (pure) ---------------------------------------------------------------


def test_no_engine_is_a_miss():
    assert judge_cache_entry(KEY, engine_present=False, stored_key=KEY.to_json()).state is CacheState.MISS


def test_engine_with_equal_key_is_a_hit():
    assert judge_cache_entry(KEY, engine_present=True, stored_key=KEY.to_json()).state is CacheState.HIT


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(EngineCacheKey)])
def test_engine_whose_stored_key_differs_in_any_field_is_refused(field: str):
    stored = dataclasses.replace(KEY, **{field: "something else"})
    verdict = judge_cache_entry(KEY, engine_present=True, stored_key=stored.to_json())
    assert verdict.state is CacheState.REFUSED
    assert field in verdict.reason and "something else" in verdict.reason


@pytest.mark.parametrize("stored", [None, b"", b"not json", b"[]", b'{"gpu_name": "Orin"}', b"\xff"])
def test_engine_with_missing_or_unreadable_key_is_refused(stored: bytes | None):
    assert judge_cache_entry(KEY, engine_present=True, stored_key=stored).state is CacheState.REFUSED


def test_lookup_reads_the_fake_cache_files_on_disk(tmp_path: Path):
    cache = EngineCache(tmp_path)
    assert cache.lookup(KEY).state is CacheState.MISS
    cache.engine_path(KEY).write_bytes(b"engine")
    assert cache.lookup(KEY).state is CacheState.REFUSED  # engine without key: an interrupted write
    cache.key_path(KEY).write_bytes(KEY.to_json())
    assert cache.lookup(KEY).state is CacheState.HIT
    tampered = json.loads(KEY.to_json())
    tampered["compute_capability"] = "7.2"  # an engine built on a Xavier, copied to an Orin
    cache.key_path(KEY).write_text(json.dumps(tampered))
    verdict = cache.lookup(KEY)
    assert verdict.state is CacheState.REFUSED and "compute_capability: '7.2' -> '8.7'" in verdict.reason


def test_store_writes_engine_and_key_under_the_digest_and_leaves_no_temp_files(tmp_path: Path):
    cache = EngineCache(tmp_path / "engines")
    cache.store(KEY, b"engine bytes")
    names = sorted(p.name for p in (tmp_path / "engines").iterdir())
    assert names == [f"{KEY.digest()}.engine", f"{KEY.digest()}.json"]
    assert cache.read_engine(KEY) == b"engine bytes"
    assert EngineCacheKey.from_json(cache.key_path(KEY).read_bytes()) == KEY
    assert stat.S_IMODE((tmp_path / "engines").stat().st_mode) == 0o700
    cache.discard(KEY)
    assert list((tmp_path / "engines").iterdir()) == []
    cache.discard(KEY)  # discarding nothing is fine


# --- load-or-build policy with stand-ins for TensorRT -----------------------------------------


class FakeTensorRT:
    """Stands in for builder and runtime: counts builds, and can reject chosen plans."""

    def __init__(self) -> None:
        self.builds = 0
        self.rejected: set[bytes] = set()
        self.raise_on: set[bytes] = set()

    def build(self) -> bytes:
        self.builds += 1
        return f"plan #{self.builds}".encode()

    def deserialize(self, plan: bytes) -> str | None:
        if plan in self.raise_on:
            raise RuntimeError("Serialization assertion failed: magic tag mismatch")
        return None if plan in self.rejected else f"engine from {plan.decode(errors='replace')}"


def test_first_load_builds_and_caches_second_load_uses_the_cache(tmp_path: Path):
    cache, fake = EngineCache(tmp_path), FakeTensorRT()
    assert load_or_build(cache, KEY, fake.build, fake.deserialize) == "engine from plan #1"
    assert load_or_build(cache, KEY, fake.build, fake.deserialize) == "engine from plan #1"
    assert fake.builds == 1


def test_cached_engine_with_tampered_key_is_deleted_rebuilt_and_warned_about(tmp_path: Path, caplog):
    cache, fake = EngineCache(tmp_path), FakeTensorRT()
    cache.store(KEY, b"plan from another GPU")
    cache.key_path(KEY).write_bytes(dataclasses.replace(KEY, gpu_name="Xavier").to_json())
    with caplog.at_level(logging.WARNING, logger=trt_backend.__name__):
        engine = load_or_build(cache, KEY, fake.build, fake.deserialize)
    assert engine == "engine from plan #1" and fake.builds == 1
    assert "refusing cached TensorRT engine" in caplog.text and "gpu_name: 'Xavier' -> 'Orin'" in caplog.text
    assert EngineCacheKey.from_json(cache.key_path(KEY).read_bytes()) == KEY
    assert cache.read_engine(KEY) == b"plan #1"


@pytest.mark.parametrize("failure", ["null engine", "exception"])
def test_cached_engine_that_fails_to_deserialize_is_rebuilt_once(tmp_path: Path, caplog, failure: str):
    cache, fake = EngineCache(tmp_path), FakeTensorRT()
    cache.store(KEY, b"corrupt plan")
    (fake.rejected if failure == "null engine" else fake.raise_on).add(b"corrupt plan")
    with caplog.at_level(logging.WARNING, logger=trt_backend.__name__):
        assert load_or_build(cache, KEY, fake.build, fake.deserialize) == "engine from plan #1"
    assert fake.builds == 1
    assert "failed to load" in caplog.text and "rebuilding once" in caplog.text
    assert cache.read_engine(KEY) == b"plan #1"


def test_rebuilt_engine_that_also_fails_is_a_model_load_error_and_leaves_no_cache_entry(tmp_path: Path):
    cache, fake = EngineCache(tmp_path), FakeTensorRT()
    cache.store(KEY, b"corrupt plan")
    fake.rejected.update({b"corrupt plan", b"plan #1"})
    with pytest.raises(ModelLoadError, match="could not load it: deserialize_cuda_engine returned no engine"):
        load_or_build(cache, KEY, fake.build, fake.deserialize)
    assert fake.builds == 1
    assert cache.lookup(KEY).state is CacheState.MISS


def test_fresh_engine_that_fails_to_deserialize_is_a_model_load_error(tmp_path: Path):
    cache, fake = EngineCache(tmp_path), FakeTensorRT()
    fake.raise_on.add(b"plan #1")
    with pytest.raises(ModelLoadError, match="RuntimeError: Serialization assertion failed"):
        load_or_build(cache, KEY, fake.build, fake.deserialize)
    assert cache.lookup(KEY).state is CacheState.MISS


def test_build_errors_propagate_and_cache_nothing(tmp_path: Path):
    def refuse() -> bytes:
        raise ModelLoadError("TensorRT's ONNX parser refused model.onnx")

    with pytest.raises(ModelLoadError, match="parser refused"):
        load_or_build(EngineCache(tmp_path), KEY, refuse, FakeTensorRT().deserialize)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_cache_still_returns_the_built_engine(tmp_path: Path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    fake = FakeTensorRT()
    with caplog.at_level(logging.WARNING, logger=trt_backend.__name__):
        assert (
            load_or_build(EngineCache(blocker / "engines"), KEY, fake.build, fake.deserialize) == "engine from plan #1"
        )
    assert "could not cache the TensorRT engine" in caplog.text


# --- profiles against the network -----------------------------------------------------------

PROFILES = BuildSpec.from_json(spec_bytes()).optimization_profiles


def test_profiles_that_cover_the_dynamic_batch_pass():
    check_network_inputs({"x": (-1, 3, 32, 32)}, PROFILES)
    check_network_inputs({"x": (1, 3, 32, 32)}, ())


@pytest.mark.parametrize(
    ("inputs", "profiles", "message"),
    [
        ({"x": (-1, 3, 32, 32)}, (), "has no optimization_profiles"),
        ({"input": (-1, 3, 32, 32)}, PROFILES, "names input 'x', which the ONNX graph does not have"),
        ({"x": (-1, 3, 32)}, PROFILES, "rank 4"),
        ({"x": (-1, 3, 64, 64)}, PROFILES, "which the graph fixes at 64"),
        ({"x": (-1, 3, 32, 32), "mask": (-1, 32)}, PROFILES, "input 'mask' has dynamic shape"),
    ],
)
def test_profiles_that_do_not_fit_the_network_are_load_errors(inputs, profiles, message: str):
    with pytest.raises(ModelLoadError, match=message):
        check_network_inputs(inputs, profiles)


def test_run_picks_the_profile_whose_ranges_hold_the_shapes():
    assert choose_profile(PROFILES, {"x": (4, 3, 32, 32)}) == 0
    assert choose_profile(PROFILES, {"x": (32, 3, 32, 32)}) == 1
    assert choose_profile(PROFILES, {"x": (33, 3, 32, 32)}) is None
    assert choose_profile(PROFILES, {"x": (4, 3, 32)}) is None
    assert choose_profile((), {"x": (1, 3, 32, 32)}) == 0


# --- availability here -------------------------------------------------------------------------


@pytest.mark.skipif(trt_backend.importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed")
def test_unavailable_reason_says_how_to_get_tensorrt():
    reason = TensorRTBackend.unavailable_reason()
    assert reason is not None and "tensorrt" in reason and "python3-libnvinfer" in reason


def test_unavailable_reason_names_cuda_python_when_only_tensorrt_is_there(monkeypatch):
    real = trt_backend.importlib.util.find_spec
    monkeypatch.setattr(
        trt_backend.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "tensorrt" else (None if name == "cuda" else real(name, *a)),
    )
    reason = TensorRTBackend.unavailable_reason()
    assert reason is not None and "cuda-python" in reason


@pytest.mark.skipif(trt_backend.importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed")
def test_load_without_tensorrt_is_backend_unavailable_not_import_error(tmp_path: Path):
    onnx = make_package(tmp_path)
    manifest = draft_manifest(format="tensorrt-onnx", artifact_path="model.onnx", precision="int8")
    with pytest.raises(BackendUnavailableError, match=r"backend 'tensorrt' cannot run here: .*python3-libnvinfer"):
        TensorRTBackend.load(onnx, manifest, BackendOptions(cache_dir=tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


@pytest.fixture
def pretend_tensorrt_is_there(monkeypatch) -> None:
    """Let load() past the availability check; any use of TensorRT beyond its version fails loudly."""
    monkeypatch.setattr(TensorRTBackend, "unavailable_reason", classmethod(lambda cls: None))
    fake = types.SimpleNamespace(__version__="8.6.2.3")
    monkeypatch.setattr(trt_backend, "_import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_backend, "_import_cudart", lambda: pytest.fail("CUDA used before the checks"))


def test_load_checks_the_tensorrt_version_before_touching_the_gpu(tmp_path: Path, pretend_tensorrt_is_there):
    onnx = make_package(tmp_path / "pkg")
    manifest = draft_manifest(format="tensorrt-onnx", artifact_path="model.onnx", precision="int8")
    with pytest.raises(ModelLoadError, match=r"needs TensorRT >= 10\.0, but TensorRT 8\.6\.2\.3 is installed"):
        TensorRTBackend.load(onnx, manifest, BackendOptions(cache_dir=tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_load_without_a_build_spec_is_an_artifact_error(tmp_path: Path, pretend_tensorrt_is_there):
    onnx = make_package(tmp_path / "pkg")
    (tmp_path / "pkg" / BUILD_SPEC_NAME).unlink()
    manifest = draft_manifest(format="tensorrt-onnx", artifact_path="model.onnx", precision="int8")
    with pytest.raises(ArtifactError, match=r"build_spec\.json is missing beside model\.onnx"):
        TensorRTBackend.load(onnx, manifest, BackendOptions())
    with pytest.raises(ArtifactError, match="is missing or not a file"):
        TensorRTBackend.load(tmp_path / "pkg" / "absent.onnx", manifest, BackendOptions())


def test_load_with_an_invalid_build_spec_names_the_field(tmp_path: Path, pretend_tensorrt_is_there):
    onnx = make_package(tmp_path / "pkg")
    (tmp_path / "pkg" / BUILD_SPEC_NAME).write_bytes(spec_bytes(workspace_mib=0))
    manifest = draft_manifest(format="tensorrt-onnx", artifact_path="model.onnx", precision="int8")
    with pytest.raises(ArtifactError, match="workspace_mib must be an integer > 0"):
        TensorRTBackend.load(onnx, manifest, BackendOptions())


def test_backend_declares_its_name_and_format():
    assert TensorRTBackend.name == "tensorrt"
    assert TensorRTBackend.formats == ("tensorrt-onnx",)


def test_importing_the_backends_loads_no_native_library():
    code = (
        "import sys, edgeship.runtime.backends.tensorrt, edgeship.runtime.backends.coreml;"
        "print(' '.join(m for m in ('tensorrt', 'cuda', 'coremltools', 'torch', 'onnx', 'tensorflow') if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing the backends loaded {result.stdout.strip()}"
