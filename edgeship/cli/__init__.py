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

# (module holding a Typer sub-app named ``app``, group name, help, modules of which one must be importable)
_GROUPS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("edgeship.cli.keys", "keys", "Create signing keys.", ()),
    ("edgeship.cli.pkg", "pkg", "Inspect, verify and unpack model packages.", ()),
    ("edgeship.cli.targets", "targets", "List and show device target profiles.", ()),
    ("edgeship.cli.agent", "agent", "Run the device agent; install packages locally; show its state.", ("paho",)),
    ("edgeship.cli.fleet", "fleet", "Set up and run the fleet manager; push, enroll, roll out.", ("fastapi",)),
]
# Single commands: (module, function name, needs one of these modules). run/bench need a backend.
_BACKEND_LIBS = ("ai_edge_litert", "tflite_runtime", "tensorflow", "onnxruntime", "tensorrt", "coremltools")
_COMMANDS: list[tuple[str, str, tuple[str, ...]]] = [
    ("edgeship.cli.runtime_cmds", "run", _BACKEND_LIBS),
    ("edgeship.cli.runtime_cmds", "bench", _BACKEND_LIBS),
    ("edgeship.cli.compile", "compile", ("torch",)),
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


def _installed(requires: tuple[str, ...]) -> bool:
    return not requires or any(importlib.util.find_spec(m) is not None for m in requires)


def _register_groups() -> None:
    for module, name, help_text, requires in _GROUPS:
        if _installed(requires):
            app.add_typer(importlib.import_module(module).app, name=name, help=help_text)
    for module, name, requires in _COMMANDS:
        if _installed(requires):
            app.command(name)(getattr(importlib.import_module(module), name))


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
