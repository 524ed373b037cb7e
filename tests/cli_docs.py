"""docs/cli.md holds the ``--help`` of every command it shows; this module renders them from the code.

``python -m tests.cli_docs`` rewrites each ``Usage: edgeship ...`` block of docs/cli.md from the current
``--help`` (80 columns) and says which commands of the CLI have no block; ``tests/test_cli_docs.py``
fails when a block differs from the code or a command is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
_USAGE = re.compile(r"^Usage: edgeship((?: [a-z][a-z0-9-]*)*) \[OPTIONS\]")


def render(command: list[str]) -> str:
    """``edgeship <command> --help`` as docs/cli.md shows it (``edgeship``, not ``python -m edgeship``)."""
    result = subprocess.run(
        [sys.executable, "-m", "edgeship", *command, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "80", "TERM": "dumb", "NO_COLOR": "1"},
        timeout=120,
        check=True,
    )
    text = result.stdout.replace("Usage: python -m edgeship", "Usage: edgeship")
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def blocks(doc: str) -> list[tuple[list[str], int, int]]:
    """(command words, first line, line after the last) of every ``Usage:`` block in ``doc``."""
    lines = doc.splitlines()
    found: list[tuple[list[str], int, int]] = []
    for i, line in enumerate(lines):
        m = _USAGE.match(line)
        if not m:
            continue
        end = i + 1
        while end < len(lines) and not lines[end].startswith(("Usage: ", "```")):
            end += 1
        while end > i + 1 and not lines[end - 1].strip():
            end -= 1
        found.append((m.group(1).split(), i, end))
    return found


def commands(prefix: list[str] | None = None) -> list[list[str]]:
    """Every command and group of the CLI, from the help's ``Commands:`` lists."""
    prefix = prefix or []
    out = [prefix]
    listed = render(prefix).split("\nCommands:\n", 1)
    if len(listed) == 2:
        for line in listed[1].splitlines():
            m = re.match(r"^  ([a-z][a-z0-9-]*)\b", line)
            if m:
                out += commands([*prefix, m.group(1)])
    return out


def rewrite() -> list[list[str]]:
    """Rewrite docs/cli.md's blocks from the code; return the commands without a block."""
    lines = DOC.read_text().splitlines()
    for words, start, end in reversed(blocks(DOC.read_text())):
        lines[start:end] = render(words).splitlines()
    DOC.write_text("\n".join(lines) + "\n")
    shown = {tuple(w) for w, _, _ in blocks(DOC.read_text())}
    return [c for c in commands() if tuple(c) not in shown]


if __name__ == "__main__":
    missing = rewrite()
    for command in missing:
        print(f"no block in docs/cli.md for: edgeship {' '.join(command)}")
