"""Property-based checks of the package reader: no mutation gets past it, and none crashes it."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edgeship.errors import IntegrityError, ManifestError, PackageError, SizeLimitError, UnsafeMemberError
from edgeship.runtime.package import TrustedKeys, generate_key, unpack_package
from tests.tarcraft import Member, manifest_for, write_tar

pytestmark = pytest.mark.py310

KEY = generate_key()
TRUSTED = TrustedKeys.of([KEY.public_key()])
# Small members, so that headers and the manifest are a large share of the bytes mutated.
CONTENTS = {"model/model.tflite": b"TFL3" + bytes(range(60)), "golden/vectors.npz": b"PK\x03\x04" + b"g" * 40}
MEMBERS = [Member(p, d) for p, d in sorted(CONTENTS.items())]


def _valid_package() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return write_tar(Path(d) / "p.edgepkg", manifest_for(CONTENTS), MEMBERS, KEY).read_bytes()


VALID = _valid_package()


def _unpack(data: bytes) -> dict[str, bytes] | PackageError:
    """Unpack ``data``; return the unpacked files, or the PackageError raised. Anything else propagates."""
    with tempfile.TemporaryDirectory() as d:
        pkg = Path(d) / "p.edgepkg"
        pkg.write_bytes(data)
        dest = Path(d) / "out"
        try:
            unpack_package(pkg, dest, trusted_keys=TRUSTED, durable=False)
        except PackageError as exc:
            leftovers = sorted(p.name for p in Path(d).iterdir())
            assert leftovers == ["p.edgepkg"], f"failed unpack left {leftovers}"
            return exc
        return {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}


EXPECTED = _unpack(VALID)


def test_valid_package_unpacks():
    assert isinstance(EXPECTED, dict)
    assert {k: v for k, v in EXPECTED.items() if not k.startswith("manifest.")} == CONTENTS


mutation = st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=st.lists(mutation, min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, len(VALID))),
    tail=st.binary(max_size=64),
)
def test_random_byte_mutations_are_rejected_or_change_nothing(mutations, cut, tail):
    data = bytearray(VALID)
    for pos, value in mutations:
        data[pos] = value
    mutated = bytes(data[:cut] if cut is not None else data) + tail
    assume(mutated != VALID)
    result = _unpack(mutated)
    # Either a clean PackageError, or the mutation hit bytes that carry no content
    # (tar padding, end-of-archive blocks, an unused header field) and the files are identical.
    if not isinstance(result, PackageError):
        assert result == EXPECTED


# ---- manifest mutations, re-signed with the trusted key


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


BASE = manifest_for(CONTENTS)
# Leaves whose JSON type is fixed by the schema (no null, no alternative type).
RIGID_LEAVES = [
    ("version",),
    ("name",),
    ("target",),
    ("format",),
    ("precision",),
    ("artifact", "path"),
    ("inputs", 0, "name"),
    ("inputs", 0, "dtype"),
    ("inputs", 0, "shape"),
    ("outputs", 0, "name"),
    ("files", 0, "path"),
    ("files", 0, "size"),
    ("files", 1, "sha256"),
    ("provenance", "tools"),
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def invalid_manifests(draw) -> tuple[dict, tuple[type[PackageError], ...]]:
    """A manifest mutated in a way that must be refused, with the error classes that may refuse it."""
    m = copy.deepcopy(BASE)
    kind = draw(
        st.sampled_from(
            ["delete_required", "wrong_type", "extra_key", "file_hash", "file_size", "file_path", "schema_version"]
        )
    )
    if kind == "delete_required":
        field = draw(st.sampled_from(sorted(k for k in m if k not in ("label", "created"))))
        del m[field]
        return m, (ManifestError,)
    if kind == "wrong_type":
        path = draw(st.sampled_from(RIGID_LEAVES))
        value = draw(json_values)
        parent = _get(m, path[:-1])
        assume(type(value) is not type(parent[path[-1]]))
        parent[path[-1]] = value
        return m, (ManifestError,)
    if kind == "extra_key":
        dicts = [p for p in _paths(m) if isinstance(_get(m, p), dict) and p not in (("provenance", "tools"),)]
        where = _get(m, draw(st.sampled_from(dicts)))
        key = draw(st.text(min_size=1, max_size=10))
        assume(key not in where and not (where is m and key in ("label", "created", "golden", "baseline", "report")))
        where[key] = draw(json_values)
        return m, (ManifestError,)
    if kind == "schema_version":
        m["schema_version"] = draw(st.integers().filter(lambda v: v != 1))
        return m, (ManifestError,)
    i = draw(st.integers(0, len(m["files"]) - 1))
    entry = m["files"][i]
    if kind == "file_hash":
        entry["sha256"] = draw(
            st.text("0123456789abcdef", min_size=64, max_size=64).filter(lambda h: h != entry["sha256"])
        )
        return m, (IntegrityError,)
    if kind == "file_size":
        entry["size"] = draw(st.integers(0, 1 << 40).filter(lambda s: s != entry["size"]))
        return m, (IntegrityError, SizeLimitError)
    old = entry["path"]
    entry["path"] = draw(st.from_regex(r"[a-zA-Z0-9_./-]{1,30}", fullmatch=True).filter(lambda p: p != old))
    if m["artifact"]["path"] == old:
        m["artifact"]["path"] = entry["path"]
    return m, (ManifestError, IntegrityError, UnsafeMemberError)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=invalid_manifests())
def test_resigned_manifest_mutations_are_refused_by_schema_or_hash_checks(case):
    manifest, allowed = case
    with tempfile.TemporaryDirectory() as d:
        data = write_tar(Path(d) / "p.edgepkg", manifest, MEMBERS, KEY).read_bytes()
    result = _unpack(data)
    assert isinstance(result, allowed), f"expected one of {allowed}, got {result!r}"
