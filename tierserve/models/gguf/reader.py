"""GGUF v2/v3 file reader: header, metadata, tensor table, memory-mapped tensor data.

Layout (little-endian), per the GGUF spec:
  magic "GGUF" | version u32 (2 or 3) | tensor_count u64 | kv_count u64
  kv_count x  [key: string][value_type u32][value]
  tensor_count x [name: string][n_dims u32][ne u64 x n_dims][ggml_type u32][offset u64]
  padding to ``general.alignment`` (default 32), then the tensor data section.
  string = u64 length + UTF-8 bytes; array = [elem_type u32][count u64][elems].
Value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string,
9 array, 10 u64, 11 i64, 12 f64. Numeric arrays are returned as Python lists.

``ne`` is ggml's dimension order (fastest-varying first); ``GGUFTensorInfo.shape``
is the reverse, i.e. numpy/torch row-major order. A tensor's ``offset`` is
relative to the data section and must be a multiple of the alignment. The file
is opened as a read-only ``numpy.memmap``: only the header is parsed eagerly
and ``GGUFFile.load`` touches just the bytes of the tensor it decodes.
Anything malformed (bad magic, unknown version or value type, truncation,
tensor data past the end of the file) raises ModelLoadError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tierserve.errors import ModelLoadError, UnsupportedTensorTypeError
from tierserve.models.gguf.dequant import SUPPORTED_GGML_TYPES, dequantize
from tierserve.models.gguf.ggml_types import GGML_TYPES, ggml_type_name

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

_SCALARS: dict[int, str] = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4",
                            6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _BOOL = 8, 9, 7


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's table entry. ``shape`` is row-major (reversed ggml ``ne``);
    ``offset`` is relative to the data section; ``nbytes`` is -1 for a type id ggml does not define."""

    name: str
    ggml_type_name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class GGUFFile:
    """A parsed GGUF file: ``metadata`` (key -> value), ``tensors`` (file order), lazy data."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    alignment: int
    data_offset: int
    _mmap: np.ndarray = field(repr=False)
    _by_name: dict[str, GGUFTensorInfo] = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tensors}

    def tensor_info(self, name: str) -> GGUFTensorInfo:
        info = self._by_name.get(name)
        if info is None:
            raise ModelLoadError(f"GGUF file {self.path} has no tensor named {name!r}")
        return info

    def raw_bytes(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view into the memory map."""
        info = self.tensor_info(name)
        if info.nbytes < 0:
            raise UnsupportedTensorTypeError(name, info.ggml_type_name, list(SUPPORTED_GGML_TYPES))
        start = self.data_offset + info.offset
        return self._mmap[start:start + info.nbytes]

    def load(self, name: str) -> torch.Tensor:
        """Dequantise tensor ``name`` to a float32 torch tensor of row-major ``shape``."""
        info = self.tensor_info(name)
        flat = dequantize(self.raw_bytes(name), info.ggml_type_name, info.n_elements, name)
        return torch.from_numpy(flat.reshape(info.shape))


class _Cursor:
    """Sequential little-endian decoder over the memory-mapped file."""

    def __init__(self, buf: np.ndarray, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> np.ndarray:
        if n < 0 or self.pos + n > self.buf.size:
            raise ModelLoadError(f"GGUF file {self.path} is truncated: needs {n} bytes at offset {self.pos}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        dtype = np.dtype(fmt)
        return self.take(dtype.itemsize).view(dtype)[0].item()

    def string(self) -> str:
        raw = self.take(self.scalar("<u8")).tobytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<u4"), self.scalar("<u8")
            if etype in _SCALARS:
                dtype = np.dtype(_SCALARS[etype])
                arr = self.take(count * dtype.itemsize).view(dtype)
                return arr.astype(bool).tolist() if etype == _BOOL else arr.tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype])
            return bool(v) if vtype == _BOOL else v
        raise ModelLoadError(f"GGUF file {self.path}: unknown metadata value type {vtype} at offset {self.pos}")


def _tensor_info(cur: _Cursor) -> GGUFTensorInfo:
    name = cur.string()
    n_dims = cur.scalar("<u4")
    if n_dims > 8:
        raise ModelLoadError(f"GGUF tensor {name!r} has {n_dims} dimensions; at most 8 are allowed")
    ne = [cur.scalar("<u8") for _ in range(n_dims)]
    type_id, offset = cur.scalar("<u4"), cur.scalar("<u8")
    gtype = GGML_TYPES.get(type_id)
    n_elements = int(np.prod(ne, dtype=np.int64)) if ne else 1
    if gtype is None:
        nbytes = -1
    elif ne and ne[0] % gtype.block_size:
        raise ModelLoadError(
            f"GGUF tensor {name!r}: row length {ne[0]} is not a multiple of {gtype.name}'s block size {gtype.block_size}")
    else:
        nbytes = n_elements // gtype.block_size * gtype.type_size
    return GGUFTensorInfo(name, ggml_type_name(type_id), tuple(reversed(ne)), offset, nbytes)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the GGUF header of ``path`` and memory-map its tensor data."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file {path} does not exist")
    if os.path.getsize(path) < 24:
        raise ModelLoadError(f"{path} is not a GGUF file: {os.path.getsize(path)} bytes is shorter than the 24-byte header")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(mm.view(np.ndarray), path)
    magic = cur.take(4).tobytes()
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file: magic is {magic!r}, expected {GGUF_MAGIC!r}")
    version = cur.scalar("<u4")
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(f"GGUF file {path} has version {version}; supported versions: {SUPPORTED_VERSIONS}")
    n_tensors, n_kv = cur.scalar("<u8"), cur.scalar("<u8")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<u4"))
    tensors = [_tensor_info(cur) for _ in range(n_tensors)]
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise ModelLoadError(f"GGUF file {path}: general.alignment must be a power of two, got {alignment!r}")
    data_offset = -(-cur.pos // alignment) * alignment
    for t in tensors:
        end = data_offset + t.offset + max(t.nbytes, 0)
        if t.offset % alignment or end > mm.size:
            raise ModelLoadError(
                f"GGUF tensor {t.name!r}: data [{data_offset + t.offset}, {end}) is misaligned "
                f"(alignment {alignment}) or past the end of {path} ({mm.size} bytes)")
    return GGUFFile(path, version, metadata, tensors, alignment, data_offset, mm)
