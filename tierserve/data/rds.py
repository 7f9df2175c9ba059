"""A minimal reader for R's serialization format (XDR, versions 2 and 3) and lazy-load databases.

Enough of R's ``serialize()`` format to read data packages such as
``janeaustenr`` (R Internals, "Serialization Formats"):

* stream header ``b"X\\n"`` (XDR = big-endian), then int32 version (2 or 3),
  writer R version, minimal reader R version; version 3 adds an int32 length and
  the native-encoding name.
* each item starts with an int32 ``flags``: ``type = flags & 0xFF``, object bit
  ``1 << 8``, has-attributes ``1 << 9``, has-tag ``1 << 10``, ``levels =
  flags >> 12`` (for CHARSXP the encoding bits).
* vectors: int32 length (``-1`` = long vector, then two int32 upper/lower
  halves), then the elements (int32, float64, bytes or nested items), then the
  attribute pairlist when the has-attributes bit is set.
* pairlists (LISTSXP and the closure/language types): attributes, tag, car, cdr
  in that order; the cdr chain is read iteratively.
* CHARSXP: int32 length (``-1`` = ``NA_character_``) then bytes, decoded as
  UTF-8 (latin-1 when the LATIN1 level bit ``1 << 2`` is set).
* symbols and environments enter a reference table in read order; REFSXP
  (255) refers back to them by 1-based index (``flags >> 8``, or the next int32
  when that is 0).
* ALTREP (238, version 3): the class triple and the serialized state; the
  compact sequences (``compact_intseq``/``compact_realseq``), ``wrap_*`` and
  ``deferred_string`` classes are expanded to ordinary vectors.

Lazy-load databases (``*.rdx`` + ``*.rdb``): the ``.rdx`` is a serialized
(gzip- or zlib-compressed) list ``variables`` mapping names to ``(offset,
length)`` into the ``.rdb``; each record is a 4-byte big-endian uncompressed
length followed by the zlib stream of one serialized object (type byte ``'2'``
bzip2 / ``'3'`` xz / ``'0'`` none after the length when R compressed with
those).

R values map to: NULL -> None; atomic vectors -> ``RVector`` (``values`` list,
``NA`` -> None for logical/integer/character, NaN stays for doubles);
generic vectors -> ``RVector`` of items; pairlists -> ``RPairList``; symbols ->
``RSymbol``; environments -> ``REnvironment`` (frame contents are read but not
interpreted). Attributes (e.g. ``names``) are a dict on each value.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from tierserve.errors import TierserveError

NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 9, 10, 13, 14, 15, 16, 17
VECSXP, EXPRSXP, RAWSXP, S4SXP = 19, 20, 24, 25
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP = 255, 254, 253, 252, 251
BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP, PERSISTSXP = 250, 249, 248, 247
EMPTYENV_SXP, BASEENV_SXP, ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 242, 241, 240, 239, 238

_IS_OBJECT, _HAS_ATTR, _HAS_TAG = 1 << 8, 1 << 9, 1 << 10
_LATIN1_LEVEL = 1 << 2
_NA_INT = -(2 ** 31)
_PAIRLIST_TYPES = {LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP}


class RDataError(TierserveError):
    """An R serialization stream or lazy-load database cannot be decoded."""


@dataclass
class RSymbol:
    name: str


@dataclass
class REnvironment:
    kind: str  # "global", "base", "empty", "namespace", "package", "persistent" or "user"
    frame: Any = None


@dataclass
class RVector:
    sexptype: int
    values: list
    attributes: dict[str, Any] = field(default_factory=dict)

    def names(self) -> list[str | None] | None:
        names = self.attributes.get("names")
        return names.values if isinstance(names, RVector) else None

    def as_dict(self) -> dict[str, Any]:
        """``{name: element}`` using the ``names`` attribute (error when absent)."""
        names = self.names()
        if names is None:
            raise RDataError("R vector has no names attribute; cannot map it to a dict")
        return dict(zip(names, self.values))


@dataclass
class RPairList:
    sexptype: int
    items: list[tuple[str | None, Any]]
    attributes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str | None, Any]:
        return dict(self.items)


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError(f"R stream truncated: need {n} bytes at offset {self.pos}, have {len(self.data)}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:
            upper, lower = self.int(), self.int()
            n = (upper << 32) + (lower & 0xFFFFFFFF)
        return n

    def header(self) -> int:
        fmt = self.take(2)
        if fmt != b"X\n":
            raise RDataError(f"R stream format {fmt!r} is not supported; only XDR (b'X\\n') is")
        version = self.int()
        if version not in (2, 3):
            raise RDataError(f"R serialization version {version} is not supported; supported: 2, 3")
        self.int(), self.int()  # writer version, minimal reader version
        if version == 3:
            self.take(self.int())  # native encoding name
        return version

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        if kind == NILVALUE_SXP:
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            if not 1 <= index <= len(self.refs):
                raise RDataError(f"R reference {index} is out of range (table holds {len(self.refs)})")
            return self.refs[index - 1]
        if kind in (GLOBALENV_SXP, BASEENV_SXP, EMPTYENV_SXP, BASENAMESPACE_SXP):
            return REnvironment({GLOBALENV_SXP: "global", BASEENV_SXP: "base", EMPTYENV_SXP: "empty",
                                 BASENAMESPACE_SXP: "namespace"}[kind])
        if kind in (UNBOUNDVALUE_SXP, MISSINGARG_SXP):
            return None
        if kind in (NAMESPACESXP, PACKAGESXP, PERSISTSXP):
            self.int()  # always 0
            names = [self._charsxp() for _ in range(self.int())]
            env = REnvironment({NAMESPACESXP: "namespace", PACKAGESXP: "package", PERSISTSXP: "persistent"}[kind],
                               names)
            self.refs.append(env)
            return env
        if kind == SYMSXP:
            sym = RSymbol(self.item())
            self.refs.append(sym)
            return sym
        if kind == ENVSXP:
            return self._environment()
        if kind in _PAIRLIST_TYPES:
            return self._pairlist(flags)
        if kind == ALTREP_SXP:
            return self._altrep()
        if kind == CHARSXP:
            return self._charsxp_body(flags)
        return self._vector(flags)

    def _charsxp(self) -> str | None:
        flags = self.int()
        if flags & 0xFF != CHARSXP:
            raise RDataError(f"expected a CHARSXP (9), found R type {flags & 0xFF}")
        return self._charsxp_body(flags)

    def _charsxp_body(self, flags: int) -> str | None:
        n = self.int()
        if n == -1:
            return None
        raw = self.take(n)
        return raw.decode("latin-1" if (flags >> 12) & _LATIN1_LEVEL else "utf-8", errors="replace")

    def _attributes(self, flags: int) -> dict[str, Any]:
        if not flags & _HAS_ATTR:
            return {}
        attrs = self.item()
        if not isinstance(attrs, RPairList):
            raise RDataError(f"R attributes must be a pairlist, found {type(attrs).__name__}")
        return {str(tag): value for tag, value in attrs.items}

    def _environment(self) -> REnvironment:
        env = REnvironment("user")
        self.refs.append(env)
        self.int()  # locked
        self.item()  # enclosure
        env.frame = self.item()
        self.item()  # hash table
        self.item()  # attributes
        return env

    def _pairlist(self, flags: int) -> RPairList:
        kind = flags & 0xFF
        out = RPairList(kind, [])
        first = True
        while True:
            attrs = self._attributes(flags)
            tag = self.item() if flags & _HAS_TAG else None
            value = self.item()
            if first:
                out.attributes = attrs
                first = False
            out.items.append((tag.name if isinstance(tag, RSymbol) else tag, value))
            flags = self.int()  # cdr: continue the chain iteratively
            if flags & 0xFF == NILVALUE_SXP:
                return out
            if flags & 0xFF not in _PAIRLIST_TYPES:
                self.pos -= 4
                tail = self.item()
                out.items.append((None, tail))
                return out

    def _vector(self, flags: int) -> RVector:
        kind = flags & 0xFF
        if kind in (LGLSXP, INTSXP):
            n = self.length()
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            values = [None if v == _NA_INT else (bool(v) if kind == LGLSXP else v) for v in ints]
        elif kind == REALSXP:
            n = self.length()
            values = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind == CPLXSXP:
            n = self.length()
            parts = struct.unpack(f">{2 * n}d", self.take(16 * n))
            values = [complex(parts[2 * i], parts[2 * i + 1]) for i in range(n)]
        elif kind == STRSXP:
            values = [self._charsxp() for _ in range(self.length())]
        elif kind in (VECSXP, EXPRSXP):
            values = [self.item() for _ in range(self.length())]
        elif kind == RAWSXP:
            values = list(self.take(self.length()))
        elif kind == S4SXP:
            values = []
        else:
            raise RDataError(f"R type {kind} at offset {self.pos - 4} is not supported by this reader")
        return RVector(kind, values, self._attributes(flags))

    def _altrep(self) -> Any:
        info = self.item()
        state = self.item()
        attrs = self.item()
        if not isinstance(info, RPairList) or not info.items or not isinstance(info.items[0][1], RSymbol):
            raise RDataError("malformed ALTREP class information")
        cls = info.items[0][1].name
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = (state.values + [0, 0, 0])[:3]
            seq = [start + i * step for i in range(int(n))]
            out = RVector(INTSXP if cls == "compact_intseq" else REALSXP,
                          [int(v) for v in seq] if cls == "compact_intseq" else seq)
        elif cls.startswith("wrap_"):
            out = state.values[0]
        elif cls == "deferred_string":
            arg = state.items[0][1] if isinstance(state, RPairList) else state
            out = RVector(STRSXP, [None if v is None else _r_number_string(v) for v in arg.values])
        else:
            raise RDataError(f"ALTREP class {cls!r} is not supported; supported: compact_intseq, "
                             f"compact_realseq, wrap_*, deferred_string")
        if isinstance(attrs, RPairList):
            out.attributes.update({str(t): v for t, v in attrs.items})
        return out


def _r_number_string(v: int | float) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return repr(v) if isinstance(v, float) else str(v)


def unserialize(data: bytes) -> Any:
    """Decode one uncompressed R serialization stream (see module docstring)."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def decompress_r_file(data: bytes) -> bytes:
    """Undo saveRDS-style compression: gzip, bzip2, xz, or none."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def read_rds(path: str) -> Any:
    """Read a ``.rds`` file (or a lazy-load ``.rdx`` index)."""
    with open(path, "rb") as f:
        return unserialize(decompress_r_file(f.read()))


def _decode_record(blob: bytes) -> bytes:
    """One lazy-load record: 4-byte big-endian length, optional type byte, compressed stream."""
    if len(blob) < 5:
        raise RDataError(f"lazy-load record of {len(blob)} bytes is too short")
    expected = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    tag = body[:1]
    if tag == b"2":
        out = bz2.decompress(body[1:])
    elif tag == b"3":
        out = lzma.decompress(body[1:])
    elif tag == b"0":
        out = body[1:]
    else:
        out = zlib.decompress(body)
    if len(out) != expected:
        raise RDataError(f"lazy-load record decompressed to {len(out)} bytes, header says {expected}")
    return out


def read_lazy_load_db(base: str) -> dict[str, Any]:
    """All variables of the lazy-load database ``base.rdx`` / ``base.rdb`` as ``{name: value}``."""
    index = read_rds(base + ".rdx")
    if not isinstance(index, RVector) or index.sexptype != VECSXP:
        raise RDataError(f"{base}.rdx does not hold an R list")
    variables = index.as_dict().get("variables")
    if not isinstance(variables, RVector):
        raise RDataError(f"{base}.rdx has no 'variables' entry")
    out: dict[str, Any] = {}
    with open(base + ".rdb", "rb") as f:
        for name, pos in variables.as_dict().items():
            offset, length = (int(v) for v in pos.values[:2])
            f.seek(offset)
            out[name] = unserialize(_decode_record(f.read(length)))
    return out
