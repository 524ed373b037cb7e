"""``edgeship pkg``: inspect, verify and unpack model packages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from edgeship.runtime.package import (
    Manifest,
    TrustedKeys,
    VerifiedManifest,
    read_manifest,
    unpack_package,
    verify_package,
)
from edgeship.runtime.package.reader import Progress as ProgressCallback

app = typer.Typer(no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)

KeyOption = typer.Option(
    ..., "--key", "-k", metavar="KEY.pub", help="Trusted public key (PEM). Repeat for several keys."
)


@contextmanager
def _progress(label: str) -> Iterator[ProgressCallback]:
    """A byte progress bar on stderr that appears only once bytes start to flow."""
    stderr = Console(stderr=True)
    bar = Progress(
        TextColumn(label),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    )
    task = bar.add_task(label, total=None)
    started = False

    def update(done: int, total: int) -> None:
        nonlocal started
        if not started:
            bar.start()
            started = True
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if started:
            bar.stop()


@app.command("inspect")
def inspect(
    package: Path = typer.Argument(..., metavar="PACKAGE", help="Package file (.edgepkg)."),
    key: list[Path] = typer.Option(
        [], "--key", "-k", metavar="KEY.pub", help="Trusted public key; when given, the signature is checked."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show a package's manifest. Reads only the manifest; use 'verify' to check every file."""
    trusted = TrustedKeys.load(key) if key else None
    verified = read_manifest(package, trusted_keys=trusted, check_signature=trusted is not None)
    if as_json:
        typer.echo(json.dumps(verified.manifest.to_json(), indent=2))
        return
    _print_manifest(verified)


@app.command("verify")
def verify(
    package: Path = typer.Argument(..., metavar="PACKAGE", help="Package file (.edgepkg)."),
    key: list[Path] = KeyOption,
    installed_version: int | None = typer.Option(
        None, "--installed-version", metavar="N", help="Version already installed; the package must be newer."
    ),
) -> None:
    """Check the signature, the manifest and the SHA-256 of every file. Exits non-zero on any problem."""
    trusted = TrustedKeys.load(key)
    with _progress("verifying") as progress:
        verified = verify_package(
            package, trusted_keys=trusted, last_installed_version=installed_version, progress=progress
        )
    m = verified.manifest
    console.print(
        f"[green]OK[/] {m.name} v{m.version} ({m.target}, {m.format}, {m.precision}): "
        f"{len(m.files)} files, {m.total_size} bytes, signed by {verified.signed_by[:16] if verified.signed_by else '?'}"
    )


@app.command("unpack")
def unpack(
    package: Path = typer.Argument(..., metavar="PACKAGE", help="Package file (.edgepkg)."),
    out: Path = typer.Option(
        ..., "--out", "-o", metavar="DIR", help="Destination directory; must not exist or be empty."
    ),
    key: list[Path] = KeyOption,
    installed_version: int | None = typer.Option(
        None, "--installed-version", metavar="N", help="Version already installed; the package must be newer."
    ),
) -> None:
    """Verify a package and unpack it into a new directory, all or nothing."""
    trusted = TrustedKeys.load(key)
    with _progress("unpacking") as progress:
        verified = unpack_package(
            package, out, trusted_keys=trusted, last_installed_version=installed_version, progress=progress
        )
    m = verified.manifest
    console.print(f"[green]unpacked[/] {m.name} v{m.version}: {len(m.files)} files into {out}")


def _print_manifest(verified: VerifiedManifest) -> None:
    m: Manifest = verified.manifest
    signature = f"[green]valid[/], key {verified.signed_by[:16]}" if verified.signed_by else "not checked (no --key)"
    console.print(f"[bold]{m.name}[/] version {m.version}" + (f" ({m.label})" if m.label else ""))
    console.print(f"target {m.target}, format {m.format}, precision {m.precision}, artifact {m.artifact_path}")
    console.print(f"signature: {signature}")
    if m.created:
        console.print(f"created: {m.created}")
    tensors = Table("kind", "name", "dtype", "shape", "quantization", title="tensors", title_justify="left")
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for t in specs:
            shape = "x".join("?" if d is None else str(d) for d in t.shape) or "scalar"
            q = t.quantization
            quant = (
                ""
                if q is None
                else f"scale {q.scale[0]:.4g}, zero {q.zero_point[0]}" + (" per-axis" if len(q.scale) > 1 else "")
            )
            tensors.add_row(kind, t.name, t.dtype, shape, quant)
    console.print(tensors)
    files = Table("path", "size", "sha256", title=f"files ({m.total_size} bytes)", title_justify="left")
    for f in m.files:
        files.add_row(f.path, str(f.size), f.sha256[:16])
    console.print(files)
    if m.provenance.tools:
        console.print("tools: " + ", ".join(f"{k} {v}" for k, v in sorted(m.provenance.tools.items())))
