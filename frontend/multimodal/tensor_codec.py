"""Tensors a client sent as `base64(torch.save(tensor))` (vLLM's `image_embeds` parts), read without torch and
without running the client's pickle: the archive's `data.pkl` is unpickled by an unpickler that knows exactly
the names `torch.save` of one plain tensor writes, and the storage bytes are viewed with numpy.

    archive/data.pkl   _rebuild_tensor_v2(storage("FloatStorage", key "0", numel), offset, size, stride, ...)
    archive/data/0     the storage's raw little-endian bytes
"""
from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

_STORAGE_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
                   "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32}


class TensorDecodeError(ValueError):
    pass


@dataclass(frozen=True)
class _Storage:
    dtype_name: str
    key: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_: Any) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(int(n) for n in size), tuple(int(n) for n in stride))


class _StorageName:
    def __init__(self, name: str) -> None:
        self.name = name


class _TensorUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageName(name)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise TensorDecodeError(f"the tensor file refers to {module}.{name}: only a plain saved tensor is accepted")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageName)):
            raise TensorDecodeError("the tensor file has an unknown storage record")
        return _Storage(pid[1].name, str(pid[2]), int(pid[4]))


def load_saved_tensor(data: bytes, max_values: int) -> np.ndarray:
    """`torch.save(tensor)` bytes -> a float32 (or int64, for integer tensors) array of the tensor's shape."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        pickle_name = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
        ref = _TensorUnpickler(io.BytesIO(archive.read(pickle_name))).load()
    except TensorDecodeError:
        raise
    except Exception as exc:  # a zip or pickle error of any kind: the bytes are not a saved tensor
        raise TensorDecodeError(f"not a tensor saved with torch.save ({type(exc).__name__})") from None
    if not isinstance(ref, _TensorRef):
        raise TensorDecodeError("the file holds something other than one tensor")
    numel = int(np.prod(ref.size)) if ref.size else 1
    if numel > max_values or ref.storage.numel > max_values:
        raise TensorDecodeError(f"the tensor has {numel} values, more than the {max_values} allowed")
    prefix = pickle_name.rsplit("/", 1)[0]
    try:
        raw = archive.read(f"{prefix}/data/{ref.storage.key}")
    except KeyError:
        raise TensorDecodeError("the tensor file lacks its storage") from None
    storage = np.frombuffer(raw, dtype=np.dtype(_STORAGE_DTYPES[ref.storage.dtype_name]).newbyteorder("<"))
    if storage.size < ref.storage.numel or len(ref.size) != len(ref.stride) or min(ref.stride, default=0) < 0:
        raise TensorDecodeError("the tensor's shape does not fit its storage")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride)) if numel else ref.offset
    if ref.offset < 0 or last >= max(storage.size, 1):
        raise TensorDecodeError("the tensor's shape does not fit its storage")
    view = np.lib.stride_tricks.as_strided(storage[ref.offset:], shape=ref.size,
                                           strides=[s * storage.itemsize for s in ref.stride])
    if ref.storage.dtype_name == "BFloat16Storage":  # bfloat16 is the top half of a float32
        return (view.astype(np.uint32) << 16).view(np.float32)
    return np.array(view, dtype=np.int64 if storage.dtype.kind == "i" else np.float32)
