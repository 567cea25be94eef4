"""The one place where dalle-data adapts its dependencies to today's stack.

``import dalle_data`` installs these, so ``import dalle_pytorch`` works afterwards:

- taming-transformers 0.0.6 (imported by dalle_pytorch) imports
  ``pytorch_lightning.utilities.distributed.rank_zero_only``, which moved to
  ``pytorch_lightning.utilities.rank_zero`` in pytorch-lightning 1.8. An import hook
  provides the old module on demand, so nothing heavy is imported until taming asks.
- img2dataset imports wandb, and albumentations checks for updates, at import time:
  both are told to stay offline.
- img2dataset's processes import torch (through webdataset) and wandb without using
  them: :func:`for_img2dataset` keeps both out (~3 s of start-up saved in each).
- img2dataset fetches every URL with its module-level ``download_image``, which keeps
  neither the HTTP status nor ``Retry-After``: :func:`img2dataset_fetch` puts another
  fetch in its place in each worker process.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# dalle_pytorch/__init__.py imports pkg_resources only to read its own version.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

_LEGACY_PL_MODULE = "pytorch_lightning.utilities.distributed"


class _LegacyLightningFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serve the removed ``pytorch_lightning.utilities.distributed`` module."""

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        if fullname != _LEGACY_PL_MODULE:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return None

    def exec_module(self, module: ModuleType) -> None:
        from pytorch_lightning.utilities.rank_zero import rank_zero_only

        module.rank_zero_only = rank_zero_only  # type: ignore[attr-defined]


if not any(isinstance(f, _LegacyLightningFinder) for f in sys.meta_path):
    # Appended, so a pytorch-lightning that still ships the module wins.
    sys.meta_path.append(_LegacyLightningFinder())


_FOR_IMG2DATASET = "DALLE_DATA_IMG2DATASET_PROCESS"


def _placeholder_wandb() -> ModuleType:
    """A ``wandb`` that fails loudly if used (img2dataset uses it only with enable_wandb)."""
    module = ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    def missing(name: str) -> None:
        raise AttributeError(
            f"wandb.{name}: dalle-data runs img2dataset without wandb (enable_wandb=False)"
        )

    setattr(module, "__getattr__", missing)  # noqa: B010 (mypy: a module's __getattr__)
    return module


def for_img2dataset() -> None:
    """Set up this process, and the processes it starts that import dalle_data, for img2dataset.

    img2dataset's processes (runner, logger, workers) import torch (through webdataset, which
    works without it) and wandb (used only with enable_wandb, never set here): ~3 s of
    start-up in each. Here torch is absent (None in sys.modules: ``import torch`` raises
    ModuleNotFoundError, ``find_spec`` finds nothing) and wandb a placeholder, for the
    process's lifetime: only for a process that never trains. img2dataset's processes
    inherit the environment variable and import dalle_data first (their main module is the
    ``dalle-data`` script).
    """
    os.environ[_FOR_IMG2DATASET] = "1"
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    sys.modules.setdefault("wandb", _placeholder_wandb())


if os.environ.get(_FOR_IMG2DATASET) == "1":
    for_img2dataset()


class _FetchingDownloader:
    """img2dataset's Downloader, run with ``fetch`` as img2dataset.downloader.download_image.

    img2dataset pickles its Downloader into each worker process; this wrapper travels the
    same way (by reference to this module), so the worker swaps the function in itself.
    """

    def __init__(self, downloader: Any, fetch: Callable[..., Any]) -> None:
        self.downloader = downloader
        self.fetch = fetch

    def __call__(self, row: Any) -> Any:
        import img2dataset.downloader

        img2dataset.downloader.download_image = self.fetch
        return self.downloader(row)


@contextlib.contextmanager
def img2dataset_fetch(fetch: Callable[..., Any]) -> Iterator[None]:
    """Inside, ``img2dataset.download`` fetches each URL with ``fetch`` in every worker.

    ``fetch(row, timeout, user_agent_token, disallowed_header_directives)`` must be
    picklable and return what img2dataset 1.47's ``download_image`` returns:
    ``(key, BytesIO or None, error message or None)``.
    """
    # img2dataset/__init__.py binds the name ``main`` to a function: take the module.
    main: Any = importlib.import_module("img2dataset.main")
    original = main.Downloader

    def downloader(*args: Any, **kwargs: Any) -> _FetchingDownloader:
        return _FetchingDownloader(original(*args, **kwargs), fetch)

    main.Downloader = downloader
    try:
        yield
    finally:
        main.Downloader = original


def import_dalle_pytorch() -> ModuleType:
    """Return the ``dalle_pytorch`` module (importable once the shims above are in place)."""
    import dalle_pytorch

    return dalle_pytorch
