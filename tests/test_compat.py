"""The dependency shims: `import dalle_data` makes `import dalle_pytorch` work, offline."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_albumentations_loads_for_img2dataset_without_huggingface_hub_and_scipy_special():
    """albumentations imports huggingface_hub (0.25 s) only to push transforms to the Hub, and
    scipy.special (0.2 s) for one transform: in img2dataset's processes it loads, and
    resizes, without either; both still work afterwards for whoever needs them."""
    result = run(
        "import sys\n"
        "from dalle_data import compat\n"
        "compat.for_img2dataset(inherited=False)\n"
        "import numpy as np, albumentations as A\n"
        "image = A.SmallestMaxSize(max_size=8)(image=np.zeros((20, 30, 3), np.uint8))['image']\n"
        "special = type(sys.modules['scipy.special']).__name__\n"
        "print(image.shape, 'huggingface_hub' in sys.modules, special)\n"
        "import huggingface_hub\n"
        "from scipy.special import j1\n"
        "print(huggingface_hub.HfApi.__name__, float(j1(0.0)))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["(8, 12, 3) False _DeferredModule", "HfApi 0.0"]


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


FORKSERVER_SCRIPT = """
import importlib, sys
import dalle_data.compat


def worker_modules(_):
    import albumentations

    at_start = type(sys.modules["albumentations"]).__name__
    albumentations.SmallestMaxSize  # what img2dataset's resizer uses
    loaded = type(sys.modules["albumentations"]).__name__
    return sys.modules["torch"] is None, at_start, loaded, "img2dataset" in sys.modules


if __name__ == "__main__":
    with dalle_data.compat.img2dataset_forkserver():
        import img2dataset.distributor

        print(type(sys.modules["albumentations"]).__name__)
        print(importlib.import_module("img2dataset.main").LoggerProcess._start_method)
        with img2dataset.distributor.get_context("spawn").Pool(2) as pool:
            print(set(pool.map(worker_modules, range(4))))
"""


def test_img2dataset_workers_fork_from_a_server_that_imported_it(tmp_path):
    """img2dataset's workers and logger start as forks of one server that imported img2dataset
    and albumentations once; the runner itself never loads albumentations (it never resizes)."""
    script = tmp_path / "forkserver.py"
    script.write_text(FORKSERVER_SCRIPT)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "_DeferredModule",
        "forkserver",
        "{(True, 'module', 'module', True)}",
    ]
    # A TMPDIR too long for the server's unix socket: img2dataset spawns its processes, as
    # plain img2dataset does, and says why.
    long_tmp = tmp_path / ("x" * 60) / ("y" * 60)
    long_tmp.mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={**env, "TMPDIR": str(long_tmp)},
    )
    assert result.returncode == 0, result.stderr
    runner, logger, workers = result.stdout.splitlines()
    assert (runner, logger) == ("_DeferredModule", "spawn")
    # Each spawned worker loads albumentations itself, when it first resizes.
    assert {(True, "_DeferredModule", "module", True)} <= ast.literal_eval(workers)
    assert {loaded for _, _, loaded, _ in ast.literal_eval(workers)} == {"module"}
    assert "a shorter TMPDIR lets it" in result.stderr


FORKED_SERVER_SCRIPT = """
import os, sys, threading
import psutil
import dalle_data.compat as compat

compat.for_img2dataset(inherited=False)  # as the stage server preloads it
import img2dataset, albumentations.core


def worker(_):
    import albumentations
    from img2dataset import resizer
    return (sys.modules["torch"] is None, type(sys.modules["albumentations"]).__name__,
            type(resizer.cv2).__name__, os.getppid())


if __name__ == "__main__":
    if sys.argv[1] == "thread":
        threading.Thread(target=threading.Event().wait, daemon=True).start()
    import multiprocessing.forkserver as fs
    with compat.img2dataset_forkserver():
        import img2dataset.distributor
        server = psutil.Process(fs._forkserver._forkserver_pid)
        print(server.cmdline() == psutil.Process().cmdline(), server.ppid() == os.getpid())
        with img2dataset.distributor.get_context("spawn").Pool(2) as pool:
            print(set((*w[:3], w[3] == server.pid) for w in pool.map(worker, range(4))))
"""


def test_a_process_that_imported_img2dataset_forks_its_forkserver(tmp_path):
    """A stage forked from the stage server has img2dataset and albumentations loaded: its
    forkserver is a fork of it (no interpreter to start, nothing to import), and the workers
    forked from that have the same set-up as a spawned server's. With another Python thread
    running, a fork could inherit a held lock: a new interpreter is started instead."""
    script = tmp_path / "forked.py"
    script.write_text(FORKED_SERVER_SCRIPT)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    expected_workers = "{(True, 'module', '_ScaledDecodeCv2', True)}"
    for mode, forked in (("alone", "True True"), ("thread", "False True")):
        result = subprocess.run(
            [sys.executable, str(script), mode],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [forked, expected_workers], mode


REDUCED_DECODE_SCRIPT = """
import io, json
import cv2, numpy as np
from PIL import Image
from img2dataset.resizer import Resizer
import dalle_data.compat as compat

rng = np.random.default_rng(0)
def jpeg(w, h, mode="RGB", fmt="JPEG"):
    small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((w, h), Image.BICUBIC).convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, quality=92)
    return buf.getvalue()

bodies = {"rgb": jpeg(640, 400), "gray": jpeg(400, 304, "L"), "small": jpeg(96, 64),
          "wide": jpeg(1000, 330), "png": jpeg(400, 300, fmt="PNG"), "broken": b"\\xff\\xd8 no"}
resizer = Resizer(image_size=64, resize_mode="keep_ratio", resize_only_if_bigger=False,
                  min_image_size=16, max_aspect_ratio=3.0)
full = {k: resizer(io.BytesIO(b)) for k, b in bodies.items()}
compat._reduced_jpeg_decode()
from img2dataset import resizer as module
shapes = []
real = module.cv2._cv2
class Spy:
    def __getattr__(self, name):
        return getattr(real, name)
    def imdecode(self, buf, flags):
        out = real.imdecode(buf, flags)
        shapes.append(None if out is None else out.shape[:2])
        return out
module.cv2._cv2 = Spy()
ours = {k: resizer(io.BytesIO(b)) for k, b in bodies.items()}
def psnr(a, b):
    a, b = (cv2.imdecode(np.frombuffer(x, np.uint8), cv2.IMREAD_UNCHANGED) for x in (a, b))
    return float(10 * np.log10(255 ** 2 / np.mean((a.astype(float) - b) ** 2)))
print(json.dumps({
    "shapes": shapes,
    "same": {k: full[k][1:] == ours[k][1:] for k in bodies},
    "psnr": {k: psnr(full[k][0], ours[k][0]) for k in bodies if full[k][0] is not None},
    "scales": [compat.jpeg_scale(resizer, *s) for s in ((640, 400), (129, 129), (128, 128))],
}))
"""


def test_img2dataset_decodes_large_jpegs_at_a_reduced_scale_with_the_same_answers(tmp_path):
    """DCT-scaled decode only where it can: sizes, filters and errors stay img2dataset's own."""
    script = tmp_path / "reduced.py"
    script.write_text(REDUCED_DECODE_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    # rgb 640x400 -> 1/4 (160x100), gray 400x304 -> 1/4 (100x76); the small JPEG, the
    # 3:1 one that the aspect-ratio filter refuses, the PNG and the broken body: full decodes
    assert found["shapes"] == [[100, 160], [76, 100], [64, 96], [330, 1000], [300, 400], None]
    assert all(found["same"].values()), found["same"]  # sizes, original sizes, errors
    assert min(found["psnr"].values()) >= 38, found["psnr"]
    assert found["scales"] == [4, 2, 1]  # 129 / 2 rounds up to 65 > 64; 128 / 2 does not


CACHED_TRANSFORMS_SCRIPT = """
import io, json
import numpy as np
from PIL import Image
from img2dataset.resizer import Resizer
import dalle_data.compat as compat

rng = np.random.default_rng(1)
def png(w, h):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()

bodies = [png(w, h) for w, h in ((300, 200), (90, 120), (64, 64), (500, 250), (120, 90))]
modes = ("keep_ratio", "center_crop", "border", "keep_ratio_largest")
resizers = [Resizer(image_size=96, resize_mode=m, resize_only_if_bigger=False,
                    min_image_size=16, max_aspect_ratio=3.0) for m in modes]
def run():
    return [r(io.BytesIO(b)) for r in resizers for b in bodies * 2]
built = run()
compat._cached_transforms()
from img2dataset import resizer as module
cached = run()
print(json.dumps({
    "same": [a == b for a, b in zip(built, cached)],
    "kinds": sorted({key[0] for key in module.A._built}),
    "instances": len(module.A._built),
}))
"""


def test_img2dataset_builds_its_resize_transforms_once_with_the_same_output(tmp_path):
    """The resizer's transforms are built once per set of arguments; every image of every
    resize mode comes out byte for byte as with a transform built for it."""
    script = tmp_path / "cached.py"
    script.write_text(CACHED_TRANSFORMS_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert len(found["same"]) == 40 and all(found["same"]), found["same"]
    assert found["kinds"] == ["CenterCrop", "LongestMaxSize", "PadIfNeeded", "SmallestMaxSize"]
    # up- and downscale interpolations differ: two of each max-size transform at most
    assert found["instances"] <= 6


TIMER_SNAKEFILE = """
import gc, json, threading
from dalle_data.compat import end_snakemake_run

rule done:
    output: "done.txt"
    shell: "echo done > {output}"

def pending():
    return [t.function.__module__ for t in threading.enumerate()
            if isinstance(t, threading.Timer) and not t.finished.is_set()]

onsuccess:
    before = pending()
    end_snakemake_run()
    with open("timers.json", "w") as out:
        json.dump({"before": before, "after": pending(), "frozen": gc.get_freeze_count()}, out)
"""


def test_a_finished_snakemake_run_leaves_no_timer_to_wait_for(tmp_path):
    """Snakemake's rate limiter leaves a 1 s non-daemon timer after its last pass; the exit
    would wait for it. If `before` comes back empty, Snakemake fixed it: drop the shim. And
    the interpreter's last collections have nothing of Snakemake's heap left to walk."""
    (tmp_path / "Snakefile").write_text(TIMER_SNAKEFILE)
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "done.txt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    timers = json.loads((tmp_path / "timers.json").read_text())
    # Snakemake's modules and plugins alone are hundreds of thousands of objects.
    assert timers.pop("frozen") > 100_000
    assert timers == {"before": ["snakemake.scheduling.job_scheduler"], "after": []}


PANDAS_SNAKEFILE = """
import json, sys, threading
from dalle_data.compat import start_snakemake_run

rule done:
    output: "done.txt"
    params: answer=42
    shell: "echo done > {output}"

SEEN = {}

onstart:
    SEEN["before"] = "pandas" in sys.modules
    if config.get("shim"):
        start_snakemake_run()
    SEEN["threads"] = [t.name for t in threading.enumerate()]

onsuccess:
    with open("pandas.json", "w") as out:
        json.dump({**SEEN, "after": "pandas" in sys.modules}, out)
"""


@pytest.mark.parametrize("shim", [False, True])
def test_snakemake_imports_pandas_for_its_first_finished_job(tmp_path, shim):
    """Without the shim, Snakemake imports pandas itself once a job has finished (to record
    its params): if `after` comes back False there, Snakemake stopped doing so: drop the
    shim. With it, onstart imports pandas in a daemon thread while the first job runs."""
    (tmp_path / "Snakefile").write_text(PANDAS_SNAKEFILE)
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "done.txt"]
        + (["--config", "shim=1"] if shim else []),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads((tmp_path / "pandas.json").read_text())
    assert seen["before"] is False and seen["after"] is True
    assert ("import pandas" in seen["threads"]) is shim
