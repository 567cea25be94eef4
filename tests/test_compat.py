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
        "import sys, dalle_data, dalle_data.config, dalle_data.model.output_name\n"
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


def test_img2dataset_processes_run_without_torch_and_wandb():
    """What img2dataset's runner and workers get: webdataset's torch-less path, no wandb."""
    result = run(
        "import importlib.util, os, sys\n"
        "os.environ['DALLE_DATA_IMG2DATASET_PROCESS'] = '1'\n"
        "import dalle_data\n"
        "import img2dataset, webdataset, wandb\n"
        "print(sys.modules['torch'] is None, importlib.util.find_spec('torch') is None)\n"
        "try:\n"
        "    import torch\n"
        "except ModuleNotFoundError:\n"
        "    print('no torch')\n"
        "try:\n"
        "    wandb.init()\n"
        "except AttributeError as err:\n"
        "    print('enable_wandb=False' in str(err))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True True", "no torch", "True"]


SPAWNING_SCRIPT = """
import multiprocessing, sys
import dalle_data.compat


def child(queue):
    import webdataset

    queue.put(sys.modules["torch"] is None)


if __name__ == "__main__":
    if sys.argv[1] == "img2dataset":
        dalle_data.compat.for_img2dataset()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    print(queue.get())
    process.join()
"""


def test_img2dataset_mode_reaches_the_processes_it_spawns(tmp_path):
    """As img2dataset's logger and workers get it: their main module imports dalle_data."""
    script = tmp_path / "spawning.py"
    script.write_text(SPAWNING_SCRIPT)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}

    def torch_absent_in_child(mode: str) -> str:
        result = subprocess.run(
            [sys.executable, str(script), mode], capture_output=True, text=True, env=env
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert torch_absent_in_child("img2dataset") == "True"
    assert torch_absent_in_child("plain") == "False"
