"""The model file as the checks see it: read-only memory-mapped bytes, and the advice a refusal ends with."""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeship.errors import ArtifactError

Buffer = bytes | mmap.mmap
REBUILD = "re-export the model and rebuild the package"


@contextmanager
def map_file(path: Path, kind: str) -> Iterator[Buffer]:
    """Yield the read-only bytes of the regular file ``path`` (memory-mapped; ``b""`` when empty).

    Opened non-blocking so that a FIFO planted in place of the model cannot hang the check.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot open the {kind} ({exc.strerror}); the package is incomplete") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactError(f"{path} is not a regular file, so not a {kind}; the package holds the wrong file")
        if info.st_size == 0:
            yield b""
            return
        try:
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError, OverflowError) as exc:
            raise ArtifactError(
                f"{path}: cannot map the {kind} into memory ({exc}); free memory or address space"
            ) from exc
        with mapped:
            yield mapped
    finally:
        os.close(fd)
