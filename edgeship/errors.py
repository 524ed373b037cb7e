"""The one small hierarchy of errors edgeship raises.

Every message is meant for a person: it says what is wrong and, where there is
something to do, what to do. The CLI prints ``error: <message>`` and exits
non-zero; the traceback is shown only with ``--debug``.
"""

from __future__ import annotations


class EdgeshipError(Exception):
    """Base of every error edgeship raises on purpose."""

    exit_code = 1


class UsageError(EdgeshipError):
    """The caller asked for something that cannot be done as asked (bad option, missing file)."""

    exit_code = 2


class KeyFileError(EdgeshipError):
    """A signing or public key file is missing, unreadable, of the wrong type or wrongly protected."""


class PackageError(EdgeshipError):
    """A model package is unusable. Subclasses say why; nothing was installed or extracted."""

    exit_code = 3


class PackageFormatError(PackageError):
    """The file is not a well-formed edgeship package (not a tar, truncated, wrong member order)."""


class UnsafeMemberError(PackageError):
    """A member could escape or abuse the destination: absolute path, ``..``, link, device, FIFO."""


class SizeLimitError(PackageError):
    """A member, the member count or the total expansion is over the configured cap."""


class ManifestError(PackageError):
    """``manifest.json`` is not valid JSON or does not match the manifest schema."""


class SignatureError(PackageError):
    """The manifest signature is missing, malformed or does not match the manifest bytes."""


class UntrustedKeyError(SignatureError):
    """The manifest is signed, but by none of the keys the caller trusts."""


class IntegrityError(PackageError):
    """A member's size or SHA-256 differs from the manifest, or a listed member is missing/extra."""


class VersionRollbackError(PackageError):
    """The package version is not newer than the version already installed."""


class UnpackError(PackageError):
    """Writing the unpacked files failed (destination exists, disk full, permissions)."""


class ArtifactError(PackageError):
    """The model file inside a (validly signed) package is damaged, truncated or of the wrong format."""


class BackendUnavailableError(EdgeshipError):
    """No installed backend can run this artifact here (library missing, wrong OS, no GPU)."""


class ModelLoadError(EdgeshipError):
    """The backend's native library refused to load the model (unsupported op, bad engine, out of memory)."""


class InputError(UsageError):
    """Inputs passed to ``Session.run`` have the wrong names, shapes or dtypes."""


class SessionClosedError(EdgeshipError):
    """``Session.run`` (or another call that needs the model) after ``Session.close()``."""


class ConfigError(UsageError):
    """A configuration file (agent.yaml, fleet settings) is missing, malformed, or has a wrong or unknown key."""


class UpdateError(EdgeshipError):
    """An over-the-air update could not be applied. Subclasses say why; the active model is untouched."""


class DownloadError(UpdateError):
    """A package or metadata download failed (network, HTTP status, server does not honour Range)."""


class UpdateTrustError(UpdateError):
    """The fleet's signed update metadata (TUF) refused what was offered."""


class MetadataExpiredError(UpdateTrustError):
    """The fleet's TUF metadata has expired (the repository must refresh its timestamp); retried later."""


class MetadataRollbackError(UpdateTrustError):
    """The fleet served TUF metadata older than metadata the device already trusts (a replay or freeze attack)."""


class TargetNotListedError(UpdateTrustError):
    """A command names a package that the fleet's signed targets metadata does not list."""


class TargetMismatchError(UpdateTrustError):
    """A downloaded package's length or hash differs from the fleet's signed targets metadata."""


class BrokerError(EdgeshipError):
    """A local MQTT broker process (mosquitto) could not be started, did not listen, or died."""


class NotFoundError(UsageError):
    """Something named by the caller does not exist (a device, package, rollout or token id); HTTP 404."""


class ConflictError(UsageError):
    """The request contradicts the current state (the name exists, the rollout is not in a state that allows it); HTTP 409."""


class AuthError(UsageError):
    """A token is missing, unknown, expired, used up or revoked; HTTP 401."""
