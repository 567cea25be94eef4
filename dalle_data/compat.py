"""The one place where dalle-data adapts its dependencies to today's stack.

Import ``dalle_pytorch`` through :func:`import_dalle_pytorch` (or import this module
first): taming-transformers 0.0.6 imports a pytorch-lightning module that no longer
exists, and img2dataset / albumentations phone home at import time.
"""

from __future__ import annotations

import os
import sys
import types
from types import ModuleType

# Offline by default: wandb (imported by img2dataset) and albumentations (imported by
# img2dataset's resizer) both try the network at import time.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _shim_pytorch_lightning() -> None:
    """taming imports ``pytorch_lightning.utilities.distributed.rank_zero_only``, moved in PL 1.8."""
    name = "pytorch_lightning.utilities.distributed"
    if name in sys.modules:
        return
    try:
        from pytorch_lightning.utilities.rank_zero import rank_zero_only
    except ImportError:  # pytorch-lightning absent: taming will fail with its own clear error
        return
    shim = types.ModuleType(name)
    shim.rank_zero_only = rank_zero_only  # type: ignore[attr-defined]
    sys.modules[name] = shim


_shim_pytorch_lightning()


def import_dalle_pytorch() -> ModuleType:
    """Return the ``dalle_pytorch`` module, importable now that the shims are in place."""
    import dalle_pytorch

    return dalle_pytorch
