"""The dependency shims: `import dalle_data` makes `import dalle_pytorch` work, offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(code: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}  # no WANDB_* set by the caller
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_dalle_pytorch_imports_after_dalle_data():
    result = run(
        "import dalle_data, os\n"
        "import dalle_pytorch\n"
        "from dalle_pytorch import DALLE, DiscreteVAE, VQGanVAE\n"
        "print(os.environ['WANDB_MODE'], os.environ['NO_ALBUMENTATIONS_UPDATE'])"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["disabled", "1"]
    assert "pkg_resources is deprecated" not in result.stderr


def test_dalle_pytorch_alone_fails_without_the_shim():
    """Guards the reason the shim exists: drop it when taming stops needing it."""
    result = run("import dalle_pytorch")
    assert result.returncode != 0
    assert "pytorch_lightning.utilities.distributed" in result.stderr


def test_importing_dalle_data_stays_cheap():
    """Also what the Snakefile imports when it parses: every `snakemake` start pays for it."""
    result = run(
        "import sys, dalle_data, dalle_data.config, dalle_data.naming\n"
        "print('torch' in sys.modules)"
    )
    assert result.stdout.strip() == "False", result.stderr


def test_no_other_module_patches_dependencies():
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "dalle_data").rglob("*.py")
        if path.name != "compat.py"
        and any(marker in path.read_text() for marker in ("sys.modules[", "sys.meta_path"))
    ]
    assert offenders == []
