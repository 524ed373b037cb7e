"""The edgeship model package (``.edgepkg``): a signed, verifiable tar. See docs/package-format.md."""

from edgeship.runtime.package.directory import verify_directory
from edgeship.runtime.package.manifest import (
    FORMATS,
    SCHEMA_VERSION,
    FileEntry,
    Golden,
    Manifest,
    Preprocessing,
    Provenance,
    Quantization,
    TensorSpec,
    manifest_schema,
)
from edgeship.runtime.package.reader import read_manifest, unpack_package, verify_package
from edgeship.runtime.package.signing import (
    TrustedKeys,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_signature,
    write_keypair,
)
from edgeship.runtime.package.verify import (
    DEFAULT_LIMITS,
    Limits,
    MemberLedger,
    PackageTrust,
    VerifiedManifest,
    check_manifest,
)
from edgeship.runtime.package.writer import collect_directory, write_package

__all__ = [
    "DEFAULT_LIMITS",
    "FORMATS",
    "SCHEMA_VERSION",
    "FileEntry",
    "Golden",
    "Limits",
    "Manifest",
    "MemberLedger",
    "PackageTrust",
    "Preprocessing",
    "Provenance",
    "Quantization",
    "TensorSpec",
    "TrustedKeys",
    "VerifiedManifest",
    "check_manifest",
    "collect_directory",
    "generate_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "manifest_schema",
    "read_manifest",
    "sign_manifest",
    "unpack_package",
    "verify_directory",
    "verify_package",
    "verify_signature",
    "write_keypair",
    "write_package",
]
