"""The command line as a whole: every command listed with a one-line help, fast to start."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from dalle_data.cli import app

COMMANDS = [
    "fetch",
    "normalize",
    "filter",
    "make-sample",
    "train-tokenizer",
    "plan-download",
    "download",
    "finalize",
    "verify",
    "card",
    "inspect",
    "train-extend",
    "generate",
    "init",
    "evaluate",
    "evaluate-colours",
    "collection",
    "publish",
]


def test_help_lists_every_command_with_a_one_line_help():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    listed = {}
    for line in result.output.splitlines():
        parts = line.strip("│ ").split(None, 1)
        if parts and parts[0] in COMMANDS:
            listed[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
    assert sorted(listed) == sorted(COMMANDS)
    assert all(len(text) > 10 for text in listed.values()), listed


def test_every_command_explains_its_options():
    runner = CliRunner()
    for command in COMMANDS:
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (command, result.output)
        assert "Usage:" in result.output


def test_help_does_not_import_torch():
    code = "import sys, dalle_data.cli; print('torch' in sys.modules, 'img2dataset' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False"], result.stderr
