"""Torch files read as data: tensors and plain values, never code.

``torch.load(weights_only=True)`` refuses every file that names a class outside torch's
list: every Lightning checkpoint (its ``callbacks`` are keyed by ``ModelCheckpoint``) and
every early-2021 DALLE-pytorch file (the VAE module pickled inside ``hparams``). Passing
torch.load a restricted ``pickle_module`` is not enough: its legacy path reads attributes
of loaded objects (``_check_container_source`` may even write a ``.patch`` file) and its
zip reader never checks a member's CRC-32, so a flipped bit loads as a wrong weight.

So this module reads the two torch formats itself:

- zip (``torch.save`` since torch 1.6): Python's ``zipfile`` reads every member and checks
  its CRC-32; ``data.pkl`` goes through the restricted unpickler, each ``data/<key>`` record
  becomes a storage;
- legacy (``_use_new_zipfile_serialization=False``): magic number, protocol, system info,
  the pickle, its storage keys, then each storage's bytes.

The unpickler never imports a module and never calls anything a pickle names, except the
few constructors in ``_ALLOWED`` (tensor rebuilds, storages, dtypes, plain containers, and
inert value classes like ``argparse.Namespace``). Every other global becomes a
:class:`Placeholder` subclass named after it: calling, building or filling one only records
its arguments and state as data. :func:`load` reports which globals were replaced.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import os
import pathlib
import pickle
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import torch

from dalle_data.errors import CheckpointError, DalleDataWarning

# torch.serialization's legacy header: a pickled magic number and protocol version.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 20


class Placeholder:
    """What a class or function named in a pickle becomes: its arguments and state, as data.

    ``qualname`` is the ``module.name`` the pickle asked for. Nothing of that class exists
    here; ``args``/``kwargs`` (from a call), ``state`` (from BUILD), ``items`` and ``listitems``
    (from SETITEMS/APPENDS) hold what the pickle gave it.
    """

    qualname: ClassVar[str] = "?"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: dict[Any, Any]
    listitems: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        obj.items, obj.listitems = {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Arguments were recorded by ``__new__``; nothing else happens."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.listitems.append(value)

    def extend(self, values: Any) -> None:
        self.listitems.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder for {self.qualname}>"


def placeholder_name(value: Any) -> str | None:
    """The global a placeholder (class or instance) stands for; None for anything else."""
    if isinstance(value, Placeholder) or (
        isinstance(value, type) and issubclass(value, Placeholder)
    ):
        return value.qualname
    return None


@dataclass(frozen=True)
class Loaded:
    """A torch file's object and the globals it named that were replaced by placeholders."""

    obj: Any
    replaced: tuple[str, ...]


def load(path: str | os.PathLike[str], *, what: str) -> Loaded:
    """Read a ``torch.save`` file (zip or legacy format) without running any of its code.

    Every failure is a :class:`CheckpointError` that names ``what`` and ``path``: a missing,
    empty, truncated, bit-flipped (CRC-32) or foreign file never ends in a traceback.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist or is not a file")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(512)
    except OSError as err:
        raise CheckpointError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if size == 0:
        raise CheckpointError(f"{what} {path} is empty (an interrupted download or copy?)")
    reader = _Reader()
    try:
        if head.startswith(_ZIP_MAGIC):
            obj = reader.read_zip(path)
        elif head[257:262] == b"ustar":
            raise _Malformed(
                "it is a tar archive (torch before 0.4 wrote checkpoints so); load and re-save "
                "it with torch.save in a trusted session"
            )
        elif head[:1] == b"\x80":
            obj = reader.read_legacy(path)
        else:
            raise _Malformed(_describe_foreign(head))
    except _Malformed as err:
        raise CheckpointError(f"{what} {path} is not a readable torch file: {err}") from None
    except zipfile.BadZipFile as err:
        raise CheckpointError(
            f"{what} {path} is damaged ({err}): download or copy it again"
        ) from None
    except MemoryError:
        raise CheckpointError(
            f"{what} {path} is not a readable torch file: it declares more data than fits in "
            "memory (a corrupt file?)"
        ) from None
    except RecursionError:
        raise CheckpointError(
            f"{what} {path} is not a readable torch file: nested too deeply"
        ) from None
    except Exception as err:  # noqa: BLE001 (untrusted bytes: any failure is a bad file)
        # The C unpickler and torch raise many types on malformed input (UnpicklingError,
        # EOFError, KeyError, TypeError, RuntimeError, struct.error...): all mean "bad file".
        reason = " ".join(str(err).split()) or "no detail"
        raise CheckpointError(
            f"{what} {path} is not a readable torch file: {type(err).__name__}: {reason:.300}"
        ) from None
    replaced = tuple(sorted(reader.placeholders))
    if replaced:
        warnings.warn(
            DalleDataWarning(
                f"{what} {path} names {len(replaced)} classes or functions that were not "
                f"loaded (kept as inert data, none of their code ran): {', '.join(replaced)}"
            ),
            stacklevel=2,
        )
    return Loaded(obj, replaced)


class _Malformed(Exception):
    """A file that is not what torch.save writes; the message says what it is instead."""


def _describe_foreign(head: bytes) -> str:
    """What a file that is neither a zip nor a pickle looks like, for the error message."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return (
            f"it starts with bytes {head[:8].hex(' ')}, neither a zip archive (torch >= 1.6) "
            "nor a pickle (older torch)"
        )
    first = " ".join(text.split())[:60]
    if first.lower().startswith(("<!doctype html", "<html")):
        return f"it is an HTML page ({first!r}), probably a failed download"
    return f"it is a text file (it starts with {first!r}), not a torch.save file"


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytearray:
    """A zip member's bytes; zipfile raises BadZipFile when its CRC-32 does not match."""
    out = bytearray()
    with archive.open(info) as member:
        while chunk := member.read(_CHUNK):
            out += chunk
    if len(out) != info.file_size:
        raise _Malformed(f"member {info.filename} is truncated")
    return out


def _untyped(data: bytearray) -> torch.UntypedStorage:
    if not data:
        return torch.UntypedStorage(0)
    return torch.frombuffer(data, dtype=torch.uint8).untyped_storage()


class _Reader:
    """One load: the placeholders it made and the storages it read."""

    def __init__(self) -> None:
        self.placeholders: dict[str, type[Placeholder]] = {}

    def placeholder(self, qualname: str) -> type[Placeholder]:
        cls = self.placeholders.get(qualname)
        if cls is None:
            name = qualname.rpartition(".")[2] or "Placeholder"
            cls = type(name, (Placeholder,), {"qualname": qualname, "__module__": __name__})
            self.placeholders[qualname] = cls
        return cls

    def unpickler(self, file: IO[bytes], persistent: Callable[[Any], Any]) -> pickle.Unpickler:
        reader = self

        class Restricted(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                return reader.find_class(module, name)

            def persistent_load(self, pid: Any) -> Any:
                return persistent(pid)

        return Restricted(file, encoding="utf-8")

    def find_class(self, module: str, name: str) -> Any:
        """Only ``_ALLOWED``, torch storage types and torch dtypes; a placeholder otherwise."""
        # Protocol-2 pickles spell Python 3 names the Python 2 way (subprocess.Popen is
        # commands.Popen): map them back as pickle itself does, for the allowlist and report.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        module = _MODULE_ALIASES.get(module, module)
        found = _ALLOWED.get(f"{module}.{name}")
        if found is not None:
            return found
        if module in ("torch", "torch.cuda") and name.endswith("Storage"):
            if name == "UntypedStorage":
                return torch.UntypedStorage
            try:
                return _StorageType(torch.storage._get_dtype_from_pickle_storage_type(name))
            except KeyError:
                pass
        if module == "torch" and isinstance(
            value := vars(torch).get(name), torch.dtype | torch.layout | torch.memory_format
        ):
            return value
        return self.placeholder(f"{module}.{name}")

    def read_zip(self, path: Path) -> Any:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            pickles = [i.filename for i in infos if i.filename.endswith("/data.pkl")]
            if len(pickles) != 1 or pickles[0].count("/") != 1:
                raise _Malformed(
                    "it is a zip archive without one <name>/data.pkl, so not a torch.save file "
                    "(or an incomplete one)"
                )
            prefix = pickles[0].removesuffix("data.pkl")
            if f"{prefix}constants.pkl" in archive.namelist():
                raise _Malformed("it is a TorchScript archive (torch.jit.save), not a checkpoint")
            # Every member is read (and its CRC-32 checked) before anything is used.
            members = {info.filename: _read_member(archive, info) for info in infos}
        data_pkl = members.pop(pickles[0])
        order = bytes(members.get(f"{prefix}byteorder", b"little")).decode("ascii", "replace")
        if order not in ("little", "big"):
            raise _Malformed(f"its byteorder record says {order!r}")
        records = {
            name.removeprefix(f"{prefix}data/"): members.pop(name)
            for name in list(members)
            if name.startswith(f"{prefix}data/")
        }
        storages: dict[str, torch.UntypedStorage] = {}

        def persistent(pid: Any) -> torch.storage.TypedStorage:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise _Malformed(f"its pickle refers to {pid!r:.80}, not a storage record")
            _, storage_type, key, _location, numel = pid
            dtype = _storage_dtype(storage_type)
            if key not in storages:
                if key not in records:
                    raise _Malformed(f"record data/{key} is missing (an incomplete zip?)")
                storages[key] = _untyped(records.pop(key))
                if order != sys.byteorder:
                    storages[key].byteswap(dtype)
            untyped = storages[key]
            if not isinstance(numel, int) or numel * _itemsize(dtype) != untyped.nbytes():
                raise _Malformed(
                    f"record data/{key} holds {untyped.nbytes()} bytes, not {numel!r} {dtype}"
                )
            return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

        return self.unpickler(io.BytesIO(data_pkl), persistent).load()

    def read_legacy(self, path: Path) -> Any:
        # In memory: a corrupt length in the pickle then reads what is there, instead of
        # asking the file object for gigabytes. Legacy files are small (torch < 1.6).
        with io.BytesIO(path.read_bytes()) as f:
            header = self.unpickler(f, _no_persistent)
            if header.load() != _LEGACY_MAGIC:
                raise _Malformed("it is a pickle without torch's magic number, not torch.save's")
            protocol = header.load()
            if protocol != _LEGACY_PROTOCOL:
                raise _Malformed(f"its torch protocol version is {protocol!r:.40}, not 1001")
            info = header.load()
            if isinstance(info, dict) and info.get("little_endian") is False:
                raise _Malformed("it was written on a big-endian machine in torch's legacy format")
            storages: dict[Any, torch.storage.TypedStorage] = {}

            def persistent(pid: Any) -> Any:
                if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
                    return pid[1]  # a pickled nn.Module's class (a placeholder); source unused
                if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
                    raise _Malformed(f"its pickle refers to {pid!r:.80}, not a storage")
                _, storage_type, root_key, _location, numel, view = pid
                dtype = _storage_dtype(storage_type)
                if root_key not in storages:
                    storages[root_key] = torch.storage.TypedStorage(
                        wrap_storage=torch.UntypedStorage(numel * _itemsize(dtype)),
                        dtype=dtype,
                        _internal=True,
                    )
                root = storages[root_key]
                if view is None:
                    return root
                view_key, offset, view_numel = view
                if view_key not in storages:
                    start = offset * _itemsize(dtype)
                    part = root._untyped_storage[start : start + view_numel * _itemsize(dtype)]
                    storages[view_key] = torch.storage.TypedStorage(
                        wrap_storage=part, dtype=dtype, _internal=True
                    )
                return storages[view_key]

            obj = self.unpickler(f, persistent).load()
            keys = self.unpickler(f, _no_persistent).load()
            if not isinstance(keys, list):
                raise _Malformed("its storage key list is missing")
            for key in keys:
                if key not in storages:
                    raise _Malformed(f"it lists storage {key!r:.40} that its pickle never used")
                _fill_legacy_storage(f, storages[key])
            if f.read(1):
                raise _Malformed("it has bytes after its last storage")
        return obj


def _fill_legacy_storage(f: io.BytesIO, storage: torch.storage.TypedStorage) -> None:
    """Read one storage as torch writes it: int64 element count, then the raw bytes."""
    count = f.read(8)
    if len(count) != 8:
        raise _Malformed("it ends inside its storage data (truncated)")
    (numel,) = struct.unpack("<q", count)
    nbytes = storage._untyped_storage.nbytes()
    if numel * _itemsize(storage.dtype) != nbytes:
        raise _Malformed(f"a storage header says {numel} elements where {nbytes} bytes belong")
    data = bytearray(nbytes)
    if f.readinto(data) != nbytes:
        raise _Malformed("it ends inside its storage data (truncated)")
    storage._untyped_storage.copy_(_untyped(data))


def _no_persistent(pid: Any) -> Any:
    raise _Malformed(f"its header refers to {pid!r:.80}")


@dataclass(frozen=True)
class _StorageType:
    """A legacy typed storage class (``torch.FloatStorage``) as a pickle names it: its dtype."""

    dtype: torch.dtype


def _storage_dtype(storage_type: Any) -> torch.dtype:
    if storage_type is torch.UntypedStorage:
        return torch.uint8
    if not isinstance(storage_type, _StorageType):
        raise _Malformed(f"a storage of type {storage_type!r:.60}, not a torch storage type")
    return storage_type.dtype


def _itemsize(dtype: torch.dtype) -> int:
    return torch._utils._element_size(dtype)


def _tensor(
    storage: Any, storage_offset: Any, size: Any, stride: Any, *_grad_hooks_metadata: Any
) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` without gradients, hooks or subclass state."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _Malformed(f"a tensor's storage is a {type(storage).__name__}")
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _parameter(data: Any, *_grad_hooks_state: Any) -> Any:
    """A pickled ``nn.Parameter`` is used as its plain tensor."""
    return data


def _tensor_of_type(func: Any, _new_type: Any, args: Any, _state: Any) -> Any:
    """``torch._tensor._rebuild_from_type_v2``: the tensor, without its subclass or state."""
    if func not in _REBUILDS and placeholder_name(func) is None:
        raise _Malformed(f"a tensor subclass rebuilt by {func!r:.60}")
    return func(*args)


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode``, as protocol-2 pickles use it for bytes; latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Malformed(f"_codecs.encode with {encoding!r:.30}")
    return text.encode("latin-1")


def _layout(name: Any) -> torch.layout:
    value = vars(torch).get(str(name).removeprefix("torch."))
    if not isinstance(value, torch.layout):
        raise _Malformed(f"unknown layout {name!r:.40}")
    return value


def _pure_path(cls: type[pathlib.PurePath]) -> Callable[..., pathlib.PurePath]:
    def build(*parts: Any) -> pathlib.PurePath:
        if not all(isinstance(p, str) for p in parts):
            raise _Malformed("a path made of something other than strings")
        return cls(*parts)

    return build


_REBUILDS = frozenset({_tensor, _parameter})
_MODULE_ALIASES = {
    "__builtin__": "builtins",
    "copy_reg": "copyreg",
    "torch.tensor": "torch._tensor",
}
_ALLOWED: dict[str, Any] = {
    "torch._utils._rebuild_tensor": _tensor,
    "torch._utils._rebuild_tensor_v2": _tensor,
    "torch._utils._rebuild_parameter": _parameter,
    "torch._utils._rebuild_parameter_with_state": _parameter,
    "torch._tensor._rebuild_from_type_v2": _tensor_of_type,
    "torch.serialization._get_layout": _layout,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": bytearray,
    "builtins.complex": complex,
    "builtins.slice": slice,
    "builtins.range": range,
    "_codecs.encode": _latin1,
    # Inert value classes that Lightning's hyper_parameters hold: attributes, paths.
    "argparse.Namespace": argparse.Namespace,
    **{
        f"pathlib.{name}": _pure_path(
            pathlib.PureWindowsPath if "Windows" in name else pathlib.PurePosixPath
        )
        for name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
    },
}
