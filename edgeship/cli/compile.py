"""``edgeship compile``: one validated, signed package per target, with a progress display and a summary."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from edgeship.errors import UsageError

# The compiler sends converters' output (fd 1 and 2) to log files while it works; the progress display and
# the summary go to duplicates of the terminal's descriptors taken here, so they stay visible.
console = Console(
    highlight=False, soft_wrap=True, file=os.fdopen(os.dup(1), "w"), width=None if sys.stdout.isatty() else 150
)
status_console = Console(highlight=False, file=os.fdopen(os.dup(2), "w"))


def compile(
    model: Path = typer.Argument(..., metavar="MODEL", help="A torch.export program (.pt2) or an ONNX file (.onnx)."),
    target: list[str] = typer.Option(
        ..., "--target", "-t", metavar="NAME", help="Target profile; repeat for several (edgeship targets list)."
    ),
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="Where packages and the report go."),
    key: Path = typer.Option(..., "--key", "-k", metavar="KEY", help="Private signing key (edgeship keys generate)."),
    recipe: Path | None = typer.Option(
        None, "--recipe", "-r", metavar="recipe.yaml", help="Variants, calibration, validation, layer overrides."
    ),
    calib: Path | None = typer.Option(
        None, "--calib", metavar="DATA", help="Calibration data: .npz or folder of .npy named after the inputs."
    ),
    eval_data: Path | None = typer.Option(
        None, "--eval", metavar="DATA", help="Evaluation data (+ 'labels' array for accuracy)."
    ),
    train_data: Path | None = typer.Option(
        None, "--train", metavar="DATA", help="Training data for the recipe's passes (+ 'labels' array)."
    ),
    name: str | None = typer.Option(
        None, "--name", metavar="NAME", help="Package name (default: recipe name, else the model file's stem)."
    ),
    dynamic_batch: bool = typer.Option(
        False, "--dynamic-batch", help="Make the batch dimension dynamic where the target allows it."
    ),
    input_names: str | None = typer.Option(
        None, "--input-names", metavar="A,B", help="Input names (default: the program's argument names)."
    ),
    output_names: str | None = typer.Option(
        None, "--output-names", metavar="Y,Z", help="Output names (default: output, or output_0, output_1, ...)."
    ),
    passphrase_file: Path | None = typer.Option(
        None, "--passphrase-file", metavar="FILE", help="Passphrase of an encrypted key."
    ),
    min_cosine: float | None = typer.Option(
        None, "--min-cosine", metavar="COS", help="Budget: worst held-out sample's cosine to the fp32 source."
    ),
    max_accuracy_drop: float | None = typer.Option(
        None, "--max-accuracy-drop", metavar="POINTS", help="Budget: accuracy points lost (needs --eval labels)."
    ),
    max_size_mb: float | None = typer.Option(None, "--max-size-mb", metavar="MB", help="Budget: artifact size."),
    max_latency_ms: float | None = typer.Option(
        None, "--max-latency-ms", metavar="MS", help="Budget: median host latency."
    ),
) -> None:
    """Compile MODEL for each --target; validate every artifact through the runtime; write signed packages.

    With a budget (--min-cosine, --max-accuracy-drop, --max-size-mb, --max-latency-ms), or with --calib
    for a target the recipe names no precision for, each target's artifact is searched for: the
    cheapest candidate that holds the budget on held-out data is packaged (docs/compiler.md,
    "Accuracy budget")."""
    from edgeship.compiler import Recipe, compile_model, from_keras, from_onnx, from_pt2, load_data
    from edgeship.compiler.search.budget import Budget
    from edgeship.runtime.package import load_private_key

    if not model.exists():
        raise UsageError(f"model {model} does not exist")
    passphrase = None
    if passphrase_file is not None:
        passphrase = passphrase_file.read_text("utf-8").splitlines()[0].encode()
    signing_key = load_private_key(key, passphrase)
    budget = Budget(min_cosine, max_accuracy_drop, max_size_mb, max_latency_ms)
    the_recipe = Recipe.from_yaml(recipe) if recipe else Recipe()
    with status_console.status("loading the model") as status:
        if model.suffix == ".onnx":
            source = from_onnx(model)
        elif model.suffix in (".keras", ".h5") or (model / "saved_model.pb").is_file():
            source = from_keras(model, dynamic_batch=dynamic_batch)
        elif model.suffix in (".pt2", ".pt"):
            names = {k: v.split(",") for k, v in (("input_names", input_names), ("output_names", output_names)) if v}
            source = from_pt2(model, dynamic_batch=dynamic_batch, **names)
        else:
            raise UsageError(
                f"{model.name}: give a .pt2 (torch.export.save), an .onnx file, a .keras/.h5 model or a SavedModel directory"
            )
        calibration = load_data(calib, "calibration data") if calib else None
        evaluation = load_data(eval_data, "evaluation data") if eval_data else None
        training = load_data(train_data, "training data") if train_data else None
        report = compile_model(
            source,
            target,
            out,
            signing_key,
            recipe=the_recipe,
            calibration=calibration,
            evaluation=evaluation,
            training=training,
            name=name or the_recipe.name or model.stem,
            progress=lambda msg: status.update(msg),
            budget=None if budget.empty else budget,
        )
    table = Table(
        "target",
        "precision",
        "backend",
        "size KiB",
        "accuracy",
        "drop pts",
        "cos min",
        "latency ms",
        "package",
        title=f"{report.name} v{report.version}",
        title_justify="left",
    )
    for v in report.variants:
        m = v.metrics
        table.add_row(
            v.target,
            v.precision,
            m.backend or "-",
            f"{m.size_bytes / 1024:.1f}" if m.size_bytes else "-",
            _f(m.accuracy, 4),
            _f(m.accuracy_drop_points, 2),
            _f(m.cosine_min, 5),
            _f(m.latency_median_ms, 3),
            v.package.name if v.package else f"[red]failed: {v.error}[/]",
        )
    console.print(table)
    for searched, found in report.searches.items():
        _print_search(searched, found)
    for v in report.variants:
        if v.package is not None:
            console.print(f"wrote {v.package}")
    console.print(f"report: {report.report_html}")
    if report.failed:
        missed = [v for v in report.failed if v.target in report.searches and v.error]
        if len(missed) == 1 and len(report.failed) == 1:
            raise UsageError(f"{missed[0].target}: {missed[0].error}")
        raise UsageError(
            f"{len(report.failed)} of {len(report.variants)} variants failed; see the table and the report"
        )


def _print_search(target: str, found: dict[str, object]) -> None:
    """The candidates one budget search tried, in order, with their figures and verdicts."""
    table = Table(
        "candidate", "size KiB", "cos min", "drop pts", "latency ms", "build s", "verdict",
        title=f"{target}: budget search ({found['budget']})", title_justify="left",
    )  # fmt: skip
    trials = found["trials"]
    assert isinstance(trials, list)
    for t in trials:
        verdict = "[green]winner[/]" if t["name"] == found["winner"] else t["verdict"]
        table.add_row(
            t["name"], f"{t['size_bytes'] / 1024:.1f}" if t["size_bytes"] else "-", _f(t["cosine"], 5),
            _f(t["accuracy_drop"], 2), _f(t["latency_ms"], 3), _f(t.get("seconds"), 1), verdict,
        )  # fmt: skip
    console.print(table)
    console.print(f"{target}: {found['reason']}")


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
