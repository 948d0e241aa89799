"""PyTorch checkpoint files read as numpy arrays, without torch and without running anything stored in them.

``torch.save`` writes a pickle whose tensors point at raw storages: inside a zip archive (``<name>/data.pkl``
beside ``<name>/data/<key>``, torch >= 1.6) or, in the legacy format, as one stream of pickles followed by the
storages' bytes. A pickle names the callables that rebuild its objects, so loading one normally runs whatever
it names. Here a restricted unpickler resolves only the names that rebuild tensors, parameters and ordered
dicts; every other class or function a file names (a whole pickled ``nn.Module``, say) becomes an inert
:class:`Opaque` record that keeps its arguments and state as data and runs nothing. Parameters and buffers of
pickled modules are then found by walking those records (:func:`module_state_dict`).
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainzoo.errors import BrainzooError

# The legacy format's first pickle (torch.serialization.MAGIC_NUMBER) and its protocol version.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# torch storage class -> numpy dtype of its elements (bfloat16: raw 16-bit words, widened to float32 when read).
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class Opaque:
    """Something a checkpoint names that is not a tensor (a module, an optimizer...): its class name, the
    arguments it was called with and the state it was given, kept as data. Subclassed per name by the unpickler."""

    name = "?"
    args: tuple = ()
    state: object = None

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state) -> None:
        self.state = state

    def __setitem__(self, key, value) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value) -> None:
        items = self.__dict__.setdefault("items", {})
        items[len(items)] = value

    def extend(self, values) -> None:
        for value in values:
            self.append(value)

    def __repr__(self) -> str:
        return f"<inert {self.name}>"


def _opaque_class(name: str) -> type[Opaque]:
    return type("Opaque", (Opaque,), {"name": name})


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name]).newbyteorder("<")


@dataclass
class _Storage:
    """A storage tensors point at: its element type and, once read, its elements."""

    kind: _StorageType
    numel: int
    data: np.ndarray | None = None


@dataclass
class _Tensor:
    """A tensor until its storage's bytes are read: a strided view of them."""

    storage: _Storage
    offset: int
    size: tuple
    stride: tuple

    def array(self) -> np.ndarray:
        data = self.storage.data
        reach = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride)) if all(self.size) else 0
        if reach > data.size or self.offset < 0 or any(s < 0 for s in self.stride):
            raise BrainzooError(f"a tensor of shape {self.size} reaches outside its storage of {data.size} elements")
        view = np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.size,
                                               strides=[s * data.itemsize for s in self.stride])
        array = np.array(view)
        if self.storage.kind.name == "BFloat16Storage":  # the high half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *_ignored) -> _Tensor:
    return _Tensor(storage, int(offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *_ignored):
    return data


def _reconstruct(cls, base, state):
    """``copyreg._reconstructor``, which pickled objects use: an empty inert record of the class."""
    return object.__new__(cls if isinstance(cls, type) and issubclass(cls, Opaque) else _opaque_class(repr(cls)))


TRUSTED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("copyreg", "_reconstructor"): _reconstruct,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`TRUSTED` names and torch's storage types; anything else becomes an inert class."""

    def __init__(self, stream, storages: dict[str, _Storage]):
        super().__init__(stream)
        self.storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) in TRUSTED:
            return TRUSTED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        return _opaque_class(f"{module}.{name}")

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":  # legacy: a class with its source text
            return pid[1]
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise BrainzooError(f"unknown persistent object {pid!r:.80}")
        return self.storages.setdefault(str(pid[2]), _Storage(pid[1], int(pid[4])))


def read_pickled(path: str | Path) -> object:
    """The object a ``torch.save`` file holds, tensors as numpy arrays and everything else inert."""
    path = Path(path)
    if not path.is_file():
        raise BrainzooError(f"{path}: no such checkpoint file")
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        return _read_legacy(path)
    except BrainzooError as err:
        raise BrainzooError(f"{path}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            struct.error, zipfile.BadZipFile, OverflowError, MemoryError) as err:
        raise BrainzooError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                            f"{type(err).__name__}: {err}") from None


def _read_zip(path: Path) -> object:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise BrainzooError("not a torch.save zip archive (no <name>/data.pkl)")
        prefix = pickles[0][:-len("data.pkl")]
        if prefix + "byteorder" in names and archive.read(prefix + "byteorder") != b"little":
            raise BrainzooError("big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}
        content = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
        for key, storage in storages.items():
            storage.data = _storage_array(archive.read(f"{prefix}data/{key}"), storage)
    return _arrays(content)


def _read_legacy(path: Path) -> object:
    """The legacy format: magic number, protocol, system info, the object, storage keys, then each storage
    as its element count (int64) and bytes."""
    with path.open("rb") as stream:
        if _plain_load(stream) != LEGACY_MAGIC:
            raise BrainzooError("not a PyTorch checkpoint (neither a zip archive nor the legacy format)")
        if _plain_load(stream) != LEGACY_PROTOCOL:
            raise BrainzooError("unsupported legacy checkpoint protocol")
        if not isinstance(info := _plain_load(stream), dict) or not info.get("little_endian", True):
            raise BrainzooError("big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}
        content = _RestrictedUnpickler(stream, storages).load()
        for key in _plain_load(stream):
            storage = storages[str(key)]
            (count,) = struct.unpack("<q", stream.read(8))
            storage.numel = count
            storage.data = _storage_array(stream.read(count * storage.kind.dtype.itemsize), storage)
    return _arrays(content)


def _plain_load(stream) -> object:
    """One of the legacy format's bookkeeping pickles, through the same restrictions."""
    return _RestrictedUnpickler(stream, {}).load()


def _storage_array(raw: bytes, storage: _Storage) -> np.ndarray:
    dtype = storage.kind.dtype
    if storage.numel < 0 or len(raw) != storage.numel * dtype.itemsize:
        raise BrainzooError(f"a storage holds {len(raw)} bytes where {storage.numel} elements of {dtype} were expected")
    return np.frombuffer(raw, dtype=dtype)


def _arrays(value):
    """Tensors replaced by arrays, all the way down (inside dicts, lists, tuples and opaque records)."""
    if isinstance(value, _Tensor):
        return value.array()
    if isinstance(value, dict):
        converted = {key: _arrays(item) for key, item in value.items()}
        return OrderedDict(converted) if isinstance(value, OrderedDict) else converted
    if isinstance(value, (list, tuple)):
        return type(value)(_arrays(item) for item in value)
    if isinstance(value, Opaque):
        value.args, value.state = _arrays(value.args), _arrays(value.state)
    return value


def module_state_dict(module: Opaque, prefix: str = "") -> dict[str, np.ndarray]:
    """The state_dict of a pickled ``nn.Module`` record: its ``_parameters`` and ``_buffers``, then its
    ``_modules``' recursively, keyed as PyTorch keys them (``features.0.weight``)."""
    state = module.state if isinstance(module.state, dict) else {}
    tensors = {}
    for kind in ("_parameters", "_buffers"):
        for name, array in (state.get(kind) or {}).items():
            if isinstance(array, np.ndarray):
                tensors[prefix + name] = array
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, Opaque):
            tensors |= module_state_dict(child, f"{prefix}{name}.")
    return tensors
