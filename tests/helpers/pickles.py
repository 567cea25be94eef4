"""Files as users hold them, built here: Lightning VQGAN checkpoints, early-2021 DALLE files,
and pickles whose unpickling would run code (each would create a marker file).

Classes that no longer exist, or belong to packages loading must not need, are stand-ins:
a class registered under the real module and name only while the file is written
(``stand_in``); loading then happens with those modules unimportable (``absent``).
"""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch


def payloads(marker: Path) -> dict[str, Any]:
    """Objects whose unpickling would create ``marker``, by the global they call."""
    code = f"open({str(marker)!r}, 'w').close()"
    calls = {
        "posix.system": (os.system, (f"touch {marker}",)),
        "builtins.eval": (eval, (code,)),
        "builtins.exec": (builtins.exec, (code,)),
        "subprocess.Popen": (subprocess.Popen, (["touch", str(marker)],)),
        "io.open": (open, (str(marker), "w")),
    }
    return {name: _Reduce(call) for name, call in calls.items()}


class _Reduce:
    def __init__(self, call: tuple[Any, tuple[Any, ...]]) -> None:
        self.call = call

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.call


@contextmanager
def stand_in(qualname: str, **attrs: Any) -> Iterator[type]:
    """A class importable as ``qualname`` (``package.module.Class``) while the block runs.

    A real module of that name is shadowed by a copy holding the stand-in (its other
    classes stay picklable) and restored after.
    """
    module_name, _, name = qualname.rpartition(".")
    cls = type(name, (), {"__module__": module_name, **attrs})
    module = ModuleType(module_name)
    real = sys.modules.get(module_name)
    if real is not None:
        module.__dict__.update(vars(real))
    setattr(module, name, cls)
    with pytest.MonkeyPatch.context() as patch:
        parts = module_name.split(".")
        for depth in range(1, len(parts)):  # pickle imports the parents: stub missing ones
            parent = ".".join(parts[:depth])
            if parent not in sys.modules:
                patch.setitem(sys.modules, parent, ModuleType(parent))
        patch.setitem(sys.modules, module_name, module)
        yield cls


@contextmanager
def absent(*packages: str) -> Iterator[None]:
    """``import`` of these packages (and their submodules) fails while the block runs."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(sys.modules):
            if name in packages or name.startswith(tuple(f"{p}." for p in packages)):
                patch.delitem(sys.modules, name)
        for package in packages:
            patch.setitem(sys.modules, package, None)  # type: ignore[arg-type]
        yield


def write_lightning_vqgan(
    path: Path, state_dict: dict[str, torch.Tensor], *, extra: Any = None, hparams: Any = None
) -> None:
    """A taming-era (pytorch-lightning 1.x) checkpoint: the keys Trainer.save_checkpoint wrote.

    ``callbacks`` is keyed by the ModelCheckpoint class itself (a stand-in), the optimizer
    states are real Adam states, ``hyper_parameters`` an ``argparse.Namespace``-like dict
    with paths; ``extra`` goes inside the callback's state, ``hparams`` beside the others.
    """
    import argparse

    params = [torch.nn.Parameter(t.clone().float()) for t in list(state_dict.values())[:2]]
    opt = torch.optim.Adam(params, lr=4.5e-6)
    sum(p.sum() for p in params).backward()  # type: ignore[union-attr]
    opt.step()
    qualname = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    with stand_in(qualname) as checkpoint_cls:
        callback_state = {
            "monitor": "val/rec_loss",
            "best_model_score": torch.tensor(0.123),
            "best_model_path": Path("/trainer/logs/checkpoints/last.ckpt"),
            "extra": extra,
        }
        torch.save(
            {
                "epoch": 12,
                "global_step": 345678,
                "pytorch-lightning_version": "1.0.8",
                "callbacks": {checkpoint_cls: callback_state},
                "optimizer_states": [opt.state_dict(), opt.state_dict()],
                "lr_schedulers": [],
                "state_dict": state_dict,
                "hparams_name": "args",
                "hyper_parameters": {
                    "args": argparse.Namespace(base=["configs/model.yaml"], gpus="0,"),
                    "extra": hparams,
                },
            },
            path,
        )


def write_early_2021_dalle(
    path: Path,
    dalle: Any,
    vae_qualname: str,
    vae_params: Any,
    *,
    hparams: dict[str, Any] | None = None,
    extra: Any = None,
) -> None:
    """train_dalle.py of early 2021: the VAE module itself inside ``hparams``.

    ``dalle`` must be built without token shift and rotary embeddings (as 2021 models
    were). The VAE is pickled as an instance of a stand-in class named ``vae_qualname``
    (``dalle_pytorch.vae.VQGanVAE1024`` is a class DALLE-pytorch no longer has) holding the
    real module's state, so the file holds what those files hold. ``hparams`` default to the
    tiny 2021 ones; ``extra`` goes in them too.
    """
    from tests.helpers.models import legacy_hparams, legacy_weights

    with stand_in(vae_qualname) as vae_cls:
        vae = vae_cls.__new__(vae_cls)
        vae.__dict__.update(dalle.vae.__dict__)
        saved = {"vae": vae, **(legacy_hparams() if hparams is None else hparams)}
        if extra is not None:
            saved["extra"] = extra
        weights = legacy_weights(dalle)
        torch.save({"hparams": saved, "vae_params": vae_params, "weights": weights}, path)
