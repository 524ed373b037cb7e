"""Structural check of a Core ML ``.mlpackage`` directory: ``check_mlpackage``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, NoReturn

from edgeship.errors import ArtifactError
from edgeship.runtime.artifact_checks.model_file import REBUILD, map_file
from edgeship.runtime.artifact_checks.protobuf import VARINT, ProtoReader

_MAX_MANIFEST_BYTES = 1 << 20
_MAX_PACKAGE_ENTRIES = 10_000  # a real .mlpackage holds a handful of files


def check_mlpackage(path: str | os.PathLike[str]) -> None:
    """Raise ``ArtifactError`` unless ``path`` is a structurally sound Core ML ``.mlpackage`` directory.

    Checked: a directory of only directories and regular files (no symlinks, devices or
    FIFOs, at most 10000 entries); ``Manifest.json`` is a JSON object whose
    ``itemInfoEntries`` paths are relative and stay inside ``Data/``, and whose
    ``rootModelIdentifier`` entry names a non-empty model spec there; the spec's
    top-level protobuf wire format is sound and has a ``specificationVersion``.
    Not checked: the ML program inside the spec, and the weight files.
    """
    path = Path(path)
    name = str(path)
    try:
        info = path.lstat()
    except OSError as exc:
        raise ArtifactError(
            f"{name}: cannot find the Core ML package ({exc.strerror}); the package is incomplete"
        ) from exc
    if not stat.S_ISDIR(info.st_mode):
        raise ArtifactError(f"{name} is not a Core ML .mlpackage directory; the package holds the wrong file")
    _check_tree(path)
    manifest = _read_manifest(path / "Manifest.json", name)
    entries = manifest.get("itemInfoEntries")
    root_id = manifest.get("rootModelIdentifier")
    if not isinstance(entries, dict) or not isinstance(root_id, str) or not isinstance(entries.get(root_id), dict):
        raise ArtifactError(f"{name}: Manifest.json lacks itemInfoEntries or its rootModelIdentifier entry; {REBUILD}")
    for entry in entries.values():
        item = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(item, str) or not _is_safe_relative(item):
            raise ArtifactError(
                f"{name}: Manifest.json lists item path {item!r}, not a relative path inside Data/; {REBUILD}"
            )
    spec = path / "Data" / entries[root_id]["path"]
    try:
        spec_info = spec.lstat()
    except OSError as exc:
        raise ArtifactError(
            f"{name}: the root model spec Data/{entries[root_id]['path']} is missing; {REBUILD}"
        ) from exc
    if not stat.S_ISREG(spec_info.st_mode) or spec_info.st_size == 0:
        raise ArtifactError(f"{name}: the root model spec {spec} is empty or not a regular file; {REBUILD}")
    with map_file(spec, "Core ML model spec") as buf:
        pb = ProtoReader(buf, str(spec), "Core ML model spec")
        versions = [field for field in pb.fields(0, pb.size, "the spec") if field.number == 1]
        if not versions or versions[-1].wire_type != VARINT or versions[-1].value == 0:
            pb.fail("it has no specificationVersion")


def _check_tree(root: Path) -> None:
    def refuse(error: OSError) -> NoReturn:
        raise ArtifactError(f"{root}: cannot list the Core ML package ({error}); the package is incomplete") from error

    count = 0
    for directory, dirnames, filenames in os.walk(root, onerror=refuse, followlinks=False):
        for entry in (*dirnames, *filenames):
            count += 1
            if count > _MAX_PACKAGE_ENTRIES:
                raise ArtifactError(
                    f"{root} holds more than {_MAX_PACKAGE_ENTRIES} files; a Core ML package holds a handful"
                )
            full = os.path.join(directory, entry)
            try:
                mode = os.lstat(full).st_mode
            except OSError as exc:
                refuse(exc)
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                kind = "a symbolic link" if stat.S_ISLNK(mode) else "a special file"
                relative = os.path.relpath(full, root)
                raise ArtifactError(
                    f"{root} contains {kind} {relative!r}; a Core ML package holds only directories and regular files; {REBUILD}"
                )


def _read_manifest(manifest: Path, name: str) -> dict[str, Any]:
    try:
        info = manifest.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_MANIFEST_BYTES:
            raise ArtifactError(
                f"{name}: Manifest.json is not a regular file of at most {_MAX_MANIFEST_BYTES} bytes; {REBUILD}"
            )
        with manifest.open("rb") as f:
            document = json.loads(f.read(_MAX_MANIFEST_BYTES + 1))
    except OSError as exc:
        raise ArtifactError(
            f"{name} has no readable Manifest.json ({exc.strerror}); it is not a complete Core ML package"
        ) from exc
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{name}: Manifest.json is not valid JSON ({exc}); {REBUILD}") from exc
    if not isinstance(document, dict):
        raise ArtifactError(f"{name}: Manifest.json is not a JSON object; {REBUILD}")
    return document


def _is_safe_relative(item: str) -> bool:
    if "\\" in item or "\x00" in item:
        return False
    return all(part not in ("", ".", "..") for part in item.split("/"))
