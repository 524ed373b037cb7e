"""docs/cli.md shows every command's ``--help`` as the code prints it (``python -m tests.cli_docs`` rewrites it)."""

from __future__ import annotations

import pytest

from tests.cli_docs import DOC, blocks, commands, render

# Groups (their help lists subcommands, each shown on its own) and commands the page describes by
# reference ("rollout resume|abort|approve take the same options as rollout pause").
NOT_SHOWN = {
    ("keys",),
    ("pkg",),
    ("targets",),
    ("fleet", "token"),
    ("fleet", "enroll-token"),
    ("fleet", "rollout"),
    ("fleet", "maintenance"),
    ("fleet", "rollout", "resume"),
    ("fleet", "rollout", "abort"),
    ("fleet", "rollout", "approve"),
}

pytest.importorskip("fastapi")  # the fleet commands appear with the fleet extra only (not in the 3.10 venv)


def test_every_help_block_in_docs_cli_md_is_what_the_code_prints():
    doc = DOC.read_text()
    lines = doc.splitlines()
    stale = [" ".join(words) for words, start, end in blocks(doc) if "\n".join(lines[start:end]) != render(words)]
    assert not stale, f"docs/cli.md is out of date for: {stale}; run python -m tests.cli_docs"


def test_every_command_has_its_help_in_docs_cli_md():
    shown = {tuple(words) for words, _, _ in blocks(DOC.read_text())}
    missing = [" ".join(c) for c in commands() if tuple(c) not in shown and tuple(c) not in NOT_SHOWN]
    assert not missing, (
        f"docs/cli.md has no --help for: {missing}; add a 'Usage: edgeship ...' line, run python -m tests.cli_docs"
    )
