"""Every README command that can run offline runs exactly as printed.

The commands run in bash as printed. Snakemake would fetch from the internet (or build for
minutes), so a shell function adds `-n` to each snakemake call (a dry run); they run from
a folder holding the repository's Snakefile, rule files and configs and the local files
the README's examples name.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    """The shell commands of the README's bash blocks, continuation lines and quotes that
    span lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    commands = []
    for block in blocks:
        pending = ""
        for line in block.replace("\\\n", " ").splitlines():
            pending += line + "\n"
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # a quote still open: the command goes on
                continue
            if words:
                commands.append(pending.strip())
            pending = ""
    return commands


def _words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


OFFLINE = [
    c
    for c in readme_commands()
    if _words(c)[0] == "snakemake" or _words(c) == ["dalle-data", "--help"]
]


def test_readme_has_the_commands_this_checks() -> None:
    assert any("cc12m_shards" in c and "fraction: 0.01" in c for c in OFFLINE)
    assert any("format: table" in c for c in OFFLINE)
    assert any("format: folder" in c for c in OFFLINE)


@pytest.mark.parametrize("command", OFFLINE)
def test_readme_command_runs_as_printed(command: str, tmp_path: Path) -> None:
    for name in ("Snakefile", "pipelines", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    # The local files the examples name (a LAION part, a photo folder, a train override).
    (tmp_path / "laion-part-00000.parquet").write_bytes(b"")
    (tmp_path / "my-photos").mkdir()
    (tmp_path / "my-train.yaml").write_text("train:\n  epochs: 1\n")
    dry = 'snakemake() { command snakemake "$@" -n; }\n'
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-c", dry + command],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
