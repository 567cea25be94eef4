"""The one place where dalle-data adapts its dependencies to today's stack.

``import dalle_data`` installs these, so ``import dalle_pytorch`` works afterwards:

- taming-transformers 0.0.6 (imported by dalle_pytorch) imports
  ``pytorch_lightning.utilities.distributed.rank_zero_only``, which moved to
  ``pytorch_lightning.utilities.rank_zero`` in pytorch-lightning 1.8. An import hook
  provides the old module on demand, so nothing heavy is imported until taming asks.
- img2dataset imports wandb, and albumentations checks for updates, at import time:
  both are told to stay offline.
- img2dataset's processes import torch (through webdataset) and wandb without using
  them: :func:`for_img2dataset` keeps both out (~3 s of start-up saved in each), and
  defers albumentations until something resizes. :func:`img2dataset_forkserver` forks
  img2dataset's workers and logger from one server that imported it, instead of spawning
  interpreters that each import it again.
- img2dataset's Resizer decodes every JPEG at full size and then shrinks it:
  :func:`for_img2dataset` lets it decode a large JPEG at 1/2, 1/4 or 1/8 of its size
  (libjpeg's DCT scaling), several times faster, when that still covers ``image_size``,
  and builds its resize transform once instead of for every image.
- Snakemake 9's job rate limiter re-checks the queue with a non-daemon ``threading.Timer``
  of its timespan (1 s) after every scheduling pass, so every run that ran a job waited up
  to a second at exit, and then spent 0.3 s collecting the garbage of its plugins' modules:
  :func:`end_snakemake_run` (the Snakefile's onsuccess/onerror) cancels the timer and
  freezes the heap. And it imports pandas (0.4 s) in its own process when it records the
  first finished job's params: :func:`start_snakemake_run` (onstart) imports it meanwhile.
- img2dataset fetches every URL with its module-level ``download_image``, which keeps
  neither the HTTP status nor ``Retry-After``: :func:`img2dataset_fetch` puts another
  fetch in its place in each worker process, and can add a column computed from each
  written image (the perceptual hash) while the worker has it in memory.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import threading
import time
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


def for_img2dataset(*, inherited: bool = True) -> None:
    """Set up this process, and (``inherited``) the processes it starts that import
    dalle_data, for img2dataset.

    img2dataset's processes (runner, logger, workers) import torch (through webdataset, which
    works without it) and wandb (used only with enable_wandb, never set here): ~3 s of
    start-up in each. Here torch is absent (None in sys.modules: ``import torch`` raises
    ModuleNotFoundError, ``find_spec`` finds nothing) and wandb a placeholder, for the
    process's lifetime: only for a process that never trains. img2dataset's processes
    inherit the environment variable and import dalle_data first (their main module is the
    ``dalle-data`` script).
    """
    if inherited:
        os.environ[_FOR_IMG2DATASET] = "1"
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    sys.modules.setdefault("wandb", _placeholder_wandb())
    # img2dataset's resizer needs four of albumentations' transforms, whose package imports
    # its whole catalogue (scipy, pydantic: ~0.6 s); the runner and the logger never resize.
    # The worker processes fork from a server that loaded it once. huggingface_hub (0.25 s
    # more) is an optional import of albumentations, for pushing transforms to the Hub,
    # which img2dataset never does: it stays out of that import. scipy.special (0.2 s) is
    # used by one transform img2dataset never builds: it loads if that ever runs.
    _defer_import("albumentations", without=("huggingface_hub",))
    _defer_import("scipy.special")
    _reduced_jpeg_decode()
    _cached_transforms()
    _forkserver_logger()


class _DeferredModule(ModuleType):
    """Stands in ``sys.modules`` for a module until one of its attributes is used, then
    imports it (with the optional modules ``without`` names unimportable, unless already
    imported) and forwards to it. (importlib's LazyLoader does not defer here: every
    ``import`` statement reads the module's ``__spec__``, which loads it.)"""

    def __init__(self, name: str, without: tuple[str, ...]) -> None:
        super().__init__(name)
        self._without = without

    def __getattr__(self, attr: str) -> Any:
        real = sys.modules.get(self.__name__)
        if real is self or real is None:
            del sys.modules[self.__name__]
            hidden = [name for name in self._without if name not in sys.modules]
            for name in hidden:
                sys.modules[name] = None  # type: ignore[assignment]  # `import` raises ImportError
            try:
                real = importlib.import_module(self.__name__)
            finally:
                for name in hidden:
                    if name in sys.modules and sys.modules[name] is None:
                        del sys.modules[name]
        return getattr(real, attr)


def _defer_import(name: str, without: tuple[str, ...] = ()) -> None:
    """Let ``import name`` bind a :class:`_DeferredModule` unless it is imported already."""
    if name not in sys.modules and importlib.util.find_spec(name) is not None:
        sys.modules[name] = _DeferredModule(name, without)


class _ScaledDecodeCv2:
    """img2dataset's resizer's ``cv2``: ``imdecode`` reads at the scale its caller chose."""

    def __init__(self, cv2: ModuleType) -> None:
        self._cv2 = cv2
        self.scale = threading.local()
        self._flags = {
            (2, False): cv2.IMREAD_REDUCED_COLOR_2,
            (4, False): cv2.IMREAD_REDUCED_COLOR_4,
            (8, False): cv2.IMREAD_REDUCED_COLOR_8,
            (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
            (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4,
            (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
        }

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cv2, name)

    def imdecode(self, buf: Any, flags: int) -> Any:
        chosen = getattr(self.scale, "value", None)
        if chosen is None:
            return self._cv2.imdecode(buf, flags)
        # IMREAD_UNCHANGED ignores EXIF orientation; the reduced modes must too.
        return self._cv2.imdecode(buf, self._flags[chosen] | self._cv2.IMREAD_IGNORE_ORIENTATION)


def jpeg_scale(resizer: Any, width: int, height: int) -> int:
    """1, 2, 4 or 8: the largest DCT scale at which ``resizer`` gives the full decode's answer.

    The scaled image (libjpeg rounds each side up) must still be larger than
    ``image_size`` on its shorter side, so Resizer still shrinks it with its downscale
    interpolation, and every one of Resizer's filters (size, area, aspect ratio) must pass
    at both sizes; otherwise the full decode runs and Resizer decides as it always does.
    """

    def passes(w: int, h: int) -> bool:
        return (
            min(w, h) >= resizer.min_image_size
            and w * h <= resizer.max_image_area
            and max(w, h) / min(w, h) <= resizer.max_aspect_ratio
        )

    if min(width, height) < 1 or not passes(width, height):
        return 1
    for scale in (8, 4, 2):
        w, h = -(-width // scale), -(-height // scale)
        if min(w, h) > resizer.image_size and passes(w, h):
            return scale
    return 1


def _reduced_jpeg_decode() -> None:
    """Make img2dataset's ``Resizer`` decode large JPEGs with DCT scaling (see jpeg_scale).

    Only for the resize modes that shrink to a shorter or longer side without blurring;
    the recorded original_width/original_height stay the JPEG's own.
    """
    from img2dataset import resizer as module
    from PIL import Image

    if isinstance(module.cv2, _ScaledDecodeCv2):
        return
    cv2 = _ScaledDecodeCv2(module.cv2)
    module.cv2 = cv2
    full_call = module.Resizer.__call__
    modes = {module.ResizeMode.keep_ratio, module.ResizeMode.center_crop}

    def call(self: Any, img_stream: Any, blurring_bbox_list: Any = None) -> Any:
        if (
            self.resize_mode not in modes
            or blurring_bbox_list is not None
            or self.disable_all_reencoding
        ):
            return full_call(self, img_stream, blurring_bbox_list)
        try:
            img_stream.seek(0)
            with Image.open(img_stream) as header:  # reads the header only
                kind, size = (header.format, header.mode), header.size
        except Exception:  # not an image Pillow knows: Resizer reports it as it always does
            return full_call(self, img_stream, blurring_bbox_list)
        scale = jpeg_scale(self, *size) if kind in {("JPEG", "RGB"), ("JPEG", "L")} else 1
        if scale == 1:
            return full_call(self, img_stream, blurring_bbox_list)
        cv2.scale.value = (scale, kind[1] == "L")
        try:
            result = full_call(self, img_stream, blurring_bbox_list)
        finally:
            cv2.scale.value = None
        if result[-1] is None:  # the source's size, not the scaled decode's
            result = (*result[:3], *size, None)
        return result

    module.Resizer.__call__ = call


class _CachedTransforms:
    """img2dataset's resizer's ``albumentations``: the transforms it builds for every image
    (``A.SmallestMaxSize(...)`` and the like: 0.1 ms each, most of it pydantic validating
    the arguments) are built once per set of arguments. None of them draws a random
    parameter, so one instance answers every call as a new one would."""

    _BUILT_PER_IMAGE = frozenset({"SmallestMaxSize", "LongestMaxSize", "CenterCrop", "PadIfNeeded"})

    def __init__(self, albumentations: Any) -> None:
        self._module = albumentations
        self._built: dict[Any, Any] = {}

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._module, name)
        if name not in self._BUILT_PER_IMAGE:
            return value

        def build(**kwargs: Any) -> Any:
            key = (name, repr(sorted(kwargs.items())))
            transform = self._built.get(key)
            if transform is None:
                transform = self._built[key] = value(**kwargs)
            return transform

        return build


def _cached_transforms() -> None:
    """Let img2dataset's ``Resizer`` reuse its transforms (see _CachedTransforms)."""
    from img2dataset import resizer as module

    if not isinstance(module.A, _CachedTransforms):
        module.A = _CachedTransforms(module.A)


def _forkserver_logger() -> None:
    """Define ``ForkServerLoggerProcess``: img2dataset's LoggerProcess (a SpawnProcess),
    started from the forkserver. Defined here, in every img2dataset process, so the
    forkserver's child finds the class when it unpickles the process object."""
    import multiprocessing.context

    from img2dataset.logger import LoggerProcess

    globals()["ForkServerLoggerProcess"] = type(
        "ForkServerLoggerProcess",
        (LoggerProcess,),
        {
            "__module__": __name__,
            "_start_method": "forkserver",
            "_Popen": staticmethod(multiprocessing.context.ForkServerProcess._Popen),
        },
    )


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


class _ColumnWriterClass:
    """img2dataset's ``sample_writer_class`` whose writers also record ``compute(image)``
    (a uint64) under ``column`` for every written image, in the parquet and json beside each
    tar. Picklable (its parts are module-level), as the Downloader that holds it must be.

    A webdataset tar's members get the writer's start time in whole seconds: webdataset
    stamps each member with ``time.time()``, a float the ustar header cannot hold, for
    which tarfile writes a pax header before the member (1 KB and 30 us a member).
    """

    def __init__(self, writer_class: Any, column: str, compute: Callable[[bytes], int]) -> None:
        self.writer_class = writer_class
        self.column = column
        self.compute = compute

    def __call__(self, *args: Any) -> _ColumnWriter:
        import pyarrow as pa

        # (shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format)
        given = list(args)
        given[4] = given[4].append(pa.field(self.column, pa.uint64()))
        writer = self.writer_class(*given)
        tar = getattr(writer, "tarwriter", None)
        if tar is not None and tar.mtime is None:
            tar.mtime = int(time.time())
        return _ColumnWriter(writer, self.column, self.compute)


class _ColumnWriter:
    def __init__(self, writer: Any, column: str, compute: Callable[[bytes], int]) -> None:
        self.writer = writer
        self.column = column
        self.compute = compute

    def write(self, img_str: bytes | None, key: str, caption: str | None, meta: dict) -> None:
        meta[self.column] = None if img_str is None else self.compute(img_str)
        self.writer.write(img_str, key, caption, meta)

    def close(self) -> None:
        self.writer.close()


# What img2dataset's worker and logger processes need, imported once in the forkserver they
# fork from (or, already imported, in the process it is a fork of: the stage server preloads
# them); the last one loads albumentations for real (a submodule needs its package).
IMG2DATASET_MODULES = ("img2dataset", "albumentations.core")
_FORKSERVER_PRELOAD = ["__main__", "dalle_data.compat", *IMG2DATASET_MODULES]


def may_fork() -> bool:
    """Whether a fork of this process is as sound as a fresh interpreter: no Python thread
    but this one (a lock another holds would stay held in the child) and no torch (its
    thread pools and CUDA state do not survive a fork), on Linux (elsewhere Python itself
    spawns by default). Native pools of the libraries the pipeline loads (OpenBLAS,
    jemalloc, Arrow's) re-create themselves in a forked child."""
    return (
        sys.platform.startswith("linux")
        and threading.active_count() == 1
        and not sys.modules.get("torch")
    )


def imported(name: str) -> bool:
    """Whether ``name`` is loaded for real (not absent, None or a deferred stand-in)."""
    return isinstance(sys.modules.get(name), ModuleType) and not isinstance(
        sys.modules[name], _DeferredModule
    )


@contextlib.contextmanager
def img2dataset_forkserver() -> Iterator[None]:
    """Set up this process for img2dataset (:func:`for_img2dataset`); inside, its
    ``download`` forks the worker and logger processes from one forkserver that imported
    img2dataset once, instead of spawning interpreters that each import it (~2 s of CPU
    each, four processes on two cores). Where this process imported all of it already (a
    stage forked from the stage server), the forkserver is a fork of this process, ready at
    once; otherwise it is a new interpreter, started first so its imports run beside this
    process's own. Where no forkserver can start (its unix socket lives under TMPDIR, and a
    path over ~107 bytes is refused), img2dataset spawns its processes as it would."""
    import multiprocessing.forkserver

    os.environ[_FOR_IMG2DATASET] = "1"
    context = multiprocessing.get_context("forkserver")
    forked = may_fork() and all(map(imported, IMG2DATASET_MODULES))
    if forked:
        for_img2dataset()  # before the fork: the workers need its patches
    context.set_forkserver_preload([] if forked else _FORKSERVER_PRELOAD)
    try:
        if forked:
            _fork_forkserver()
        else:
            multiprocessing.forkserver.ensure_running()
    except OSError as err:
        warnings.warn(
            f"img2dataset's processes are spawned, each importing img2dataset (slower start): "
            f"no forkserver could start ({err}); a shorter TMPDIR lets it",
            stacklevel=3,
        )
        started = False
    else:
        started = True
    if not forked:
        for_img2dataset()
    if not started:
        yield
        return
    import img2dataset.distributor

    main: Any = importlib.import_module("img2dataset.main")
    saved = img2dataset.distributor.get_context, main.LoggerProcess
    img2dataset.distributor.get_context = lambda _method: context
    main.LoggerProcess = globals()["ForkServerLoggerProcess"]
    try:
        yield
    finally:
        img2dataset.distributor.get_context, main.LoggerProcess = saved


def _fork_forkserver() -> None:
    """Start multiprocessing's forkserver as a fork of this process instead of a new
    interpreter: ``ensure_running`` sets it up as always (socket, alive pipe, resource
    tracker) and hands its command line to ``spawnv_passfds``; the fork runs that command
    itself, with the descriptors a spawned server would have had."""
    from multiprocessing import forkserver, util

    spawnv_passfds = util.spawnv_passfds

    def fork_passfds(_path: Any, args: Any, passfds: Any) -> int:
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            low = 3
            for fd in sorted(set(passfds)):
                os.closerange(low, fd)
                low = fd + 1
            os.closerange(low, os.sysconf("SC_OPEN_MAX"))
            # ensure_running's lock, held across this fork, is the parent's business.
            forkserver._forkserver._lock = threading.Lock()  # type: ignore[attr-defined]
            exec(args[-1], {"__name__": "__forkserver__"})  # its main(...) call
            code = 0
        except SystemExit:  # how main ends: its last client has gone
            code = 0
        finally:
            os._exit(code)

    util.spawnv_passfds = fork_passfds  # type: ignore[assignment]
    try:
        forkserver.ensure_running()
    finally:
        util.spawnv_passfds = spawnv_passfds


@contextlib.contextmanager
def img2dataset_fetch(
    fetch: Callable[..., Any], column: tuple[str, Callable[[bytes], int]] | None = None
) -> Iterator[None]:
    """Inside, ``img2dataset.download`` fetches each URL with ``fetch`` in every worker,
    and with ``column=(name, compute)`` records ``compute(image bytes)`` per written image.

    ``fetch(row, timeout, user_agent_token, disallowed_header_directives)`` must be
    picklable and return what img2dataset 1.47's ``download_image`` returns:
    ``(key, BytesIO or None, error message or None)``.
    """
    # img2dataset/__init__.py binds the name ``main`` to a function: take the module.
    main: Any = importlib.import_module("img2dataset.main")
    original = main.Downloader

    def downloader(*args: Any, **kwargs: Any) -> _FetchingDownloader:
        if column is not None:
            kwargs["sample_writer_class"] = _ColumnWriterClass(
                kwargs["sample_writer_class"], *column
            )
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


def start_snakemake_run() -> None:
    """Import pandas in a daemon thread of Snakemake's process, while its first job runs.

    Whenever pandas is installed, Snakemake 9's persistence imports it to serialize the
    params of the first job it records as finished (``_serialize_param_pandas``): 0.4 s
    between a run's first job and its second, on every run's critical path."""
    threading.Thread(
        target=importlib.import_module, args=("pandas",), name="import pandas", daemon=True
    ).start()


def end_snakemake_run() -> None:
    """Let the finished run's process exit at once.

    Cancel the scheduler's pending re-check timer (its only action is to wake the
    scheduler, which has stopped): the interpreter joins non-daemon threads at exit, so it
    would hold the run open for up to one timespan. And move every object to the collector's
    permanent generation: the interpreter's last collections then skip Snakemake's heap of
    modules and plugins (0.3 s here, out of every run's wall time)."""
    for thread in threading.enumerate():
        function = getattr(thread, "function", None)
        if isinstance(thread, threading.Timer) and getattr(function, "__module__", "") == (
            "snakemake.scheduling.job_scheduler"
        ):
            thread.cancel()
    gc.freeze()
