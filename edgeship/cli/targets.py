"""``edgeship targets``: list and show the device target profiles the compiler knows."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeship import targets
from edgeship.errors import UsageError

app = typer.Typer(no_args_is_help=True)
# Piped output (scripts, tests) gets a wide table instead of rich's 80-column default; columns
# fold rather than cut, so a name or precision is never shown truncated.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)

JsonOption = typer.Option(False, "--json", help="Print JSON instead of a table.")


@app.command("list")
def list_targets(as_json: bool = JsonOption) -> None:
    """List every target: format, runtime and version, default and other precisions."""
    profiles = targets.all_targets()
    if as_json:
        typer.echo(json.dumps([p.to_dict() for p in profiles], indent=2))
        return
    table = Table("name", "format", "runtime", "default", "other precisions")
    for column in table.columns:
        column.overflow = "fold"
    for p in profiles:
        table.add_row(
            p.name, p.format, f"{p.runtime} {p.runtime_version}", p.default_precision, ", ".join(p.precisions[1:])
        )
    console.print(table)
    console.print("details: edgeship targets show NAME")


@app.command("show")
def show(
    name: str = typer.Argument(..., metavar="NAME", help="Target name, as in 'edgeship targets list'."),
    as_json: bool = JsonOption,
) -> None:
    """Show one target: every field, its quirks with their evidence, and its op-version limits."""
    try:
        p = targets.get(name)
    except targets.UnknownTargetError as exc:
        raise UsageError(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(p.to_dict(), indent=2))
        return
    console.print(f"[bold]{p.name}[/]: {escape(p.description)}")
    fields = Table.grid(padding=(0, 2))
    rows = [
        ("format", p.format),
        ("runtime", f"{p.runtime} {p.runtime_version}"),
        ("precisions", f"{p.default_precision} (default)" + "".join(f", {q}" for q in p.precisions[1:])),
        ("min OS", p.min_os),
        ("GPU", f"{p.gpu_arch} (compute capability {p.compute_capability})" if p.gpu_arch else None),
        ("memory budget", f"{p.memory_mib} MiB" if p.memory_mib else None),
        ("delegates", ", ".join(p.delegates) or None),
        ("dynamic batch", "yes" if p.dynamic_batch else "no"),
    ]
    for label, value in rows:
        fields.add_row(label, "-" if value is None else escape(value))
    console.print(fields)
    for q in p.quirks:
        console.print(f"\n[bold]quirk {q.id}[/]: {escape(q.text)}")
        if q.evidence:
            console.print(f"  evidence: {escape(q.evidence)}")
    if p.max_op_versions:
        _print_op_versions(p.max_op_versions)


def _print_op_versions(max_op_versions: Mapping[str, int]) -> None:
    loadable = sorted((op, v) for op, v in max_op_versions.items() if v > 0)
    absent = sorted(op for op, v in max_op_versions.items() if v == 0)
    per_row = 3
    table = Table(
        *(["op", "max"] * per_row), title="highest builtin op version the runtime loads", title_justify="left"
    )
    for column in table.columns:
        column.overflow = "fold"
    for i in range(0, len(loadable), per_row):
        chunk = loadable[i : i + per_row]
        table.add_row(*[cell for op, v in chunk for cell in (op, str(v))])
    console.print()
    console.print(table)
    if absent:
        console.print(f"no kernel at all ({len(absent)}): {', '.join(absent)}")
