"""The pure trust core (PackageTrust and its MemberLedger), tested directly and exhaustively."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeship.errors import IntegrityError, PackageError, SignatureError, UnsafeMemberError, UsageError
from edgeship.runtime.package import TrustedKeys, generate_key, sign_manifest
from edgeship.runtime.package.verify import PackageTrust, VerifiedManifest
from tests.tarcraft import manifest_bytes, manifest_for

pytestmark = pytest.mark.py310

KEY = generate_key()
TRUSTED = TrustedKeys.of([KEY.public_key()])
LISTABLE = ("a.bin", "model/m.onnx", "model/m.onnx.data", "golden/v.npz", "z")
STRAYS = ("evil.so", "model/evil.so", "../up", "/abs", "manifest.json", "model//m.onnx")


def signed(contents: dict[str, bytes]) -> tuple[bytes, bytes]:
    raw = manifest_bytes(manifest_for(contents))
    return raw, sign_manifest(raw, [KEY])


def verified_for(contents: dict[str, bytes], **trust_options: object) -> tuple[PackageTrust, VerifiedManifest]:
    trust = PackageTrust(TRUSTED, **trust_options)  # type: ignore[arg-type]
    return trust, trust.manifest(*signed(contents))


# ---------------------------------------------------------------- the ledger, against a reference model


@dataclass(frozen=True)
class Op:
    kind: str  # "admit" or "confirm"
    path: str
    right: bool = True  # admit: listed size (else off by one); confirm: listed hash (else another)


def reference(ops: list[Op], listed: set[str], hashes: bool) -> int | None:
    """Index of the first op a correct ledger refuses (len(ops) = at finish), or None if it accepts."""
    admitted: set[str] = set()
    confirmed: set[str] = set()
    for i, op in enumerate(ops):
        if op.kind == "admit":
            if op.path not in listed or op.path in admitted or not op.right:
                return i
            admitted.add(op.path)
        else:
            if op.path not in admitted or op.path in confirmed or not op.right:
                return i
            confirmed.add(op.path)
    if admitted != listed or (hashes and confirmed != listed):
        return len(ops)
    return None


contents_strategy = st.dictionaries(st.sampled_from(LISTABLE), st.binary(max_size=24), min_size=1)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, bytes], list[Op], bool]:
    contents = draw(contents_strategy)
    hashes = draw(st.booleans())
    order = draw(st.permutations(sorted(contents)))
    if draw(st.booleans()):  # as an archive reader: each file admitted, then confirmed
        ops = [op for p in order for op in (Op("admit", p), Op("confirm", p))]
    else:  # as a directory walk: every file admitted, then every file hashed
        ops = [Op("admit", p) for p in order] + [Op("confirm", p) for p in order]
    if not hashes and draw(st.booleans()):
        ops = [op for op in ops if op.kind == "admit"]
    names = st.sampled_from(LISTABLE + STRAYS)
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["delete", "insert", "swap", "spoil"]))
        if edit == "insert" or not ops:
            op = Op(draw(st.sampled_from(["admit", "confirm"])), draw(names), draw(st.booleans()))
            ops.insert(draw(st.integers(0, len(ops))), op)
            continue
        i = draw(st.integers(0, len(ops) - 1))
        if edit == "delete":
            del ops[i]
        elif edit == "swap":
            j = draw(st.integers(0, len(ops) - 1))
            ops[i], ops[j] = ops[j], ops[i]
        else:
            ops[i] = Op(ops[i].kind, ops[i].path, right=False)
    return contents, ops, hashes


# At least 300 examples: at 50, a ledger that never asked for hashes slipped through now and then.
@settings(max_examples=max(300, settings.default.max_examples))
@given(scenarios())
def test_ledger_accepts_exactly_when_every_listed_file_arrives_once_intact(scenario):
    contents, ops, hashes = scenario
    raw, signature = signed(contents)
    # Sizes only is allowed for a manifest pinned by its digest (the pin itself is tested below).
    trust = PackageTrust(TRUSTED, manifest_digest=None if hashes else hashlib.sha256(raw).hexdigest())
    ledger = trust.members(trust.manifest(raw, signature), sizes_only=not hashes)
    expected_refusal = reference(ops, set(contents), hashes)
    refused_at: int | None = None
    for i, op in enumerate(ops):
        data = contents.get(op.path, b"")
        try:
            if op.kind == "admit":
                entry = ledger.admit(op.path, len(data) + (0 if op.right else 1))
                assert (entry.path, entry.size) == (op.path, len(data))
            else:
                digest = hashlib.sha256(data if op.right else data + b"!").hexdigest()
                ledger.confirm(op.path, digest)
        except (PackageError, UsageError) as exc:
            refused_at = i
            assert _plausible(exc, op), (op, exc)
            break
    if refused_at is None:
        try:
            ledger.finish()
        except IntegrityError:
            refused_at = len(ops)
    assert refused_at == expected_refusal, (ops, refused_at, expected_refusal)
    if refused_at is not None:
        with pytest.raises((IntegrityError, UsageError)):
            ledger.finish()  # a refused ledger stays refused


def _plausible(exc: Exception, op: Op) -> bool:
    """The refusal has the type today's readers raise for what went wrong."""
    if op.kind == "confirm":
        return isinstance(exc, (IntegrityError, UsageError))
    if op.path in ("../up", "/abs", "manifest.json", "model//m.onnx"):
        return isinstance(exc, UnsafeMemberError) and "unsafe member name" in str(exc)
    return isinstance(exc, (IntegrityError, UnsafeMemberError))


def test_ledger_messages_name_the_file_and_what_is_wrong():
    contents = {"model/m.onnx": b"onnx", "golden/v.npz": b"npz"}
    trust, verified = verified_for(contents)
    ledger = trust.members(verified)
    with pytest.raises(IntegrityError, match=r"member 'model/m.onnx' is 5 bytes in the archive but 4"):
        ledger.admit("model/m.onnx", 5)
    ledger = trust.members(verified)
    ledger.admit("model/m.onnx", 4)
    with pytest.raises(UnsafeMemberError, match="appears twice"):
        ledger.admit("model/m.onnx", 4)
    ledger = trust.members(verified, directory="/slots/a")
    with pytest.raises(IntegrityError, match=r"evil.so in /slots/a is not listed in the manifest"):
        ledger.admit("evil.so", 1)
    ledger = trust.members(verified, directory="/slots/a")
    ledger.admit("model/m.onnx", 4)
    with pytest.raises(IntegrityError, match=r"model/m.onnx in /slots/a does not match its SHA-256"):
        ledger.confirm("model/m.onnx", hashlib.sha256(b"ONNX").hexdigest())
    ledger = trust.members(verified)
    with pytest.raises(IntegrityError, match=r"member 'golden/v.npz' and 1 more listed in the manifest is missing"):
        ledger.finish()


def test_an_accepted_ledger_takes_no_more_files():
    contents = {"m.onnx": b"x"}
    trust, verified = verified_for(contents)
    ledger = trust.members(verified)
    ledger.admit("m.onnx", 1)
    ledger.confirm("m.onnx", hashlib.sha256(b"x").hexdigest())
    ledger.finish()
    with pytest.raises(UsageError, match="already accepted"):
        ledger.admit("m.onnx", 1)


# ---------------------------------------------------------------- the manifest, pinned by digest


def test_digest_is_the_sha256_of_the_exact_manifest_bytes():
    raw, sig = signed({"m.onnx": b"x"})
    verified = PackageTrust(TRUSTED).manifest(raw, sig)
    assert verified.digest == hashlib.sha256(raw).hexdigest()


def test_pinned_manifest_must_be_byte_identical():
    raw, sig = signed({"m.onnx": b"x"})
    digest = hashlib.sha256(raw).hexdigest()
    assert PackageTrust(TRUSTED, manifest_digest=digest).manifest(raw, sig).digest == digest
    edited = raw.replace(b'"version":1', b'"version": 1')  # same meaning, other bytes: re-signed
    with pytest.raises(IntegrityError, match=r"changed since the slot was installed.*reinstall"):
        PackageTrust(TRUSTED, manifest_digest=digest).manifest(edited, sign_manifest(edited, [KEY]))


def test_pinned_manifest_still_needs_its_signature():
    raw, _ = signed({"m.onnx": b"x"})
    digest = hashlib.sha256(raw).hexdigest()
    stranger = sign_manifest(raw, [generate_key()])
    with pytest.raises(SignatureError):
        PackageTrust(TRUSTED, manifest_digest=digest).manifest(raw, stranger)
    verified = PackageTrust(None, check_signature=False, manifest_digest=digest).manifest(raw, b"")
    assert verified.signed_by is None


@pytest.mark.parametrize("digest", ["abc", "0" * 63, "G" * 64, "A" * 64])
def test_malformed_digest_is_a_usage_error(digest: str):
    with pytest.raises(UsageError, match="not a SHA-256 in lowercase hex"):
        PackageTrust(TRUSTED, manifest_digest=digest)


def test_contents_go_unhashed_only_for_a_pinned_manifest():
    trust, verified = verified_for({"m.onnx": b"x"})
    with pytest.raises(UsageError, match="pinned by its digest"):
        trust.members(verified, sizes_only=True)
