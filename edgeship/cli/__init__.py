"""The ``edgeship`` command line.

Errors from edgeship print as one line (``error: ...``) with a non-zero exit code;
``--debug`` shows the traceback instead. Command groups whose extra is not installed
are not shown at all (no ``compile`` without the ``compiler`` extra).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import typer
from rich.console import Console

from edgeship import __version__
from edgeship.errors import EdgeshipError

app = typer.Typer(
    name="edgeship",
    help="Compile models for edge devices, package them signed, and run them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err_console = Console(stderr=True, highlight=False)
_state = {"debug": False}

# (module holding a Typer sub-app named ``app``, group name, help, module that must be importable)
_GROUPS: list[tuple[str, str, str, str | None]] = [
    ("edgeship.cli.keys", "keys", "Create signing keys.", None),
    ("edgeship.cli.pkg", "pkg", "Inspect, verify and unpack model packages.", None),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgeship {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug


def _register_groups() -> None:
    for module, name, help_text, requires in _GROUPS:
        if requires is not None and importlib.util.find_spec(requires) is None:
            continue
        sub = importlib.import_module(module).app
        app.add_typer(sub, name=name, help=help_text)


_register_groups()


def main() -> None:
    """Entry point of the ``edgeship`` console script."""
    try:
        app(standalone_mode=True)
    except EdgeshipError as exc:
        if _state["debug"] or "--debug" in sys.argv[1:]:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
