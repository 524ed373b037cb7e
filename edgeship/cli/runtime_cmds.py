"""``edgeship run`` and ``edgeship bench``: run a package's model on this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from edgeship.errors import UsageError

console = Console(highlight=False, soft_wrap=True)

KEY = typer.Option([], "--key", "-k", metavar="KEY.pub", help="Trusted public key (PEM); repeat for several.")
NO_VERIFY = typer.Option(
    False, "--no-verify-signature", help="Skip the signature check (hashes are still checked). For local experiments."
)
BACKEND = typer.Option("auto", "--backend", "-b", metavar="NAME", help="litert, onnxruntime, tensorrt, coreml or auto.")
THREADS = typer.Option(None, "--threads", "-t", metavar="N", help="Intra-op threads (default: the library's).")


def _open(package: Path, key: list[Path], no_verify: bool, **kwargs: Any) -> Any:
    import edgeship.runtime as rt

    if not key and not no_verify:
        raise UsageError("pass the publisher's public key with --key (or --no-verify-signature to skip the check)")
    return rt.open(package, trusted_keys=key or None, verify_signature=not no_verify, **kwargs)


def run(
    package: Path = typer.Argument(..., metavar="PACKAGE", help="Package file (.edgepkg) or unpacked directory."),
    inputs: list[str] = typer.Option(
        ...,
        "--input",
        "-i",
        metavar="FILE|NAME=FILE",
        help="x.npy (one-input model), inputs.npz (arrays by input name), or name=path.npy; repeatable.",
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", metavar="FILE.npz", help="Save outputs here instead of printing."
    ),
    raw: bool = typer.Option(False, "--raw", help="Pass and return the model's own dtypes (no (de)quantization)."),
    key: list[Path] = KEY,
    no_verify: bool = NO_VERIFY,
    backend: str = BACKEND,
    threads: int | None = THREADS,
) -> None:
    """Run a package's model once on inputs from .npy/.npz files and print or save the outputs."""
    with _open(package, key, no_verify, backend=backend, threads=threads, raw=raw, stats=False) as session:
        feeds = _load_inputs(inputs, [t.name for t in session.inputs])
        result = session.run(feeds)
    if out is not None:
        np.savez(out, **result)
        console.print(f"saved {', '.join(result)} to {out}")
        return
    for name, value in result.items():
        console.print(f"[bold]{name}[/] {value.dtype} {tuple(value.shape)}")
        with np.printoptions(precision=5, suppress=True, threshold=64, linewidth=100):
            console.print(str(value))
        if value.ndim == 2 and value.shape[1] > 1 and value.dtype.kind == "f":
            console.print(f"argmax per row: {value.argmax(axis=1).tolist()}")


def _load_inputs(specs: list[str], names: list[str]) -> dict[str, Any]:
    feeds: dict[str, Any] = {}
    for spec in specs:
        name, sep, path_text = spec.partition("=")
        path = Path(path_text if sep else name)
        if not path.is_file():
            raise UsageError(f"input file {path} does not exist")
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UsageError(f"{path} is not a .npy or .npz file: {exc}") from None
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                feeds.update({k: data[k] for k in data.files})
        elif sep:
            feeds[name] = data
        elif len(names) == 1:
            feeds[names[0]] = data
        else:
            raise UsageError(f"the model has inputs {', '.join(names)}: pass name=path.npy for each, or one .npz")
    return feeds


def bench(
    package: Path = typer.Argument(..., metavar="PACKAGE", help="Package file (.edgepkg) or unpacked directory."),
    runs: int = typer.Option(100, "--runs", "-n", min=1, metavar="N", help="Timed runs."),
    warmup: int = typer.Option(10, "--warmup", min=0, metavar="N", help="Untimed runs first."),
    batch: int = typer.Option(1, "--batch", min=1, metavar="N", help="Batch size for a dynamic batch dimension."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    key: list[Path] = KEY,
    no_verify: bool = NO_VERIFY,
    backend: str = BACKEND,
    threads: int | None = THREADS,
) -> None:
    """Measure latency (min/median/p90/p99), throughput and peak memory of a package's model here."""
    from edgeship.runtime.bench import benchmark

    with _open(package, key, no_verify, backend=backend, threads=threads, stats=False) as session:
        stderr = Console(stderr=True)
        with Progress(
            TextColumn("benchmarking"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
            disable=as_json or not stderr.is_terminal,
        ) as bar:
            task = bar.add_task("bench", total=runs)
            result = benchmark(
                session,
                runs=runs,
                warmup=warmup,
                batch=batch,
                progress=lambda done, _t: bar.update(task, completed=done),
            )
        m = session.manifest
    if as_json:
        typer.echo(json.dumps({"package": m.name, "version": m.version, **result.to_json()}, indent=2))
        return
    console.print(f"{m.name} v{m.version} ({m.format}, {m.precision}) on {result.backend}, batch {result.batch}:")
    console.print(
        f"  latency ms: min {result.min_ms:.3f}  median {result.median_ms:.3f}  p90 {result.p90_ms:.3f}  "
        f"p99 {result.p99_ms:.3f}  ({result.runs} runs after {result.warmup} warm-up)"
    )
    console.print(
        f"  throughput: {result.throughput_per_s:.1f} runs/s, {result.samples_per_s:.1f} samples/s;  "
        f"peak RSS {result.peak_rss_mib:.0f} MiB"
    )
