"""How an ExpertHost keeps expert weights at rest, and what it sends: raw arrays, or DFloat11-coded (lossless).

``ExpertStore`` contract: ``put(key, payload)`` stores one expert, given as
``ExpertWeights`` or as a ``CodedExpert`` (tierserve.offload.expert_transit);
``get(key)`` returns weights bit-identical to the ones put; ``payload(key)`` returns
the expert as held at rest (what crosses the wire when a worker copies it);
``nbytes`` is what the store holds at rest; ``raw_nbytes`` what the same experts take
as plain arrays; ``encode(weights)`` (``wire_payload(name, weights)``) turns plain
weights into the store's at-rest form, so a sender can ship what the store will hold.
Implementations are picked by name from ``HOST_WEIGHT_FORMATS``:

* ``"raw"``: the arrays as received (a ``CodedExpert`` put here is decoded first);
  ``payload`` returns them, so raw arrays cross the wire;
* ``"dfloat11"``: bf16 experts coded with tierserve.kernels.quant.dfloat11
  (``CodedExpert.encode``: ``encode_block`` over ``{"gate_up", "down"}``, one Huffman
  table per expert, the 8-bit exponents entropy-coded, sign+mantissa bytes raw: ~11/16
  of bf16 on trained weights); a ``CodedExpert`` put here is stored as is (no
  re-encoding); ``get`` decodes (``decode_block``, bit-identical); ``payload`` returns
  the held ``CodedExpert``, so the CODED bytes cross the wire and the receiver decodes.
  Only bf16 experts are accepted (the format is lossless for bf16 only): anything else
  raises InvalidParameterError ``host_weight_format``.

The host decodes an expert when it builds its module, on the first ``compute`` that
routes to it, and keeps the built module (a cache of the experts in use); experts
never called (standby copies of resident experts, unrouted cold ones) stay coded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from tierserve.errors import InvalidParameterError
from tierserve.offload.expert_transit import CodedExpert, ExpertPayload, as_weights, raw_nbytes
from tierserve.offload.expert_weights import ExpertWeights

Key = tuple[int, int]


class ExpertStore(ABC):
    """Experts at rest, each held as the store's payload (``encode``); subclasses say how ``put``/``get`` convert."""

    #: the ``host_weight_format`` name of the store
    name: str

    def __init__(self):
        self._items: dict[Key, ExpertPayload] = {}

    @staticmethod
    @abstractmethod
    def encode(weights: ExpertWeights) -> ExpertPayload:
        """``weights`` in this store's at-rest (and wire) form."""

    def put(self, key: Key, payload: ExpertPayload) -> None:
        """Hold ``payload`` (either form) in this store's form."""
        self._items[key] = payload if self._holds_as_is(payload) else self.encode(as_weights(payload))

    @abstractmethod
    def _holds_as_is(self, payload: ExpertPayload) -> bool:
        """Whether ``payload`` already is this store's form."""

    def get(self, key: Key) -> ExpertWeights:
        return as_weights(self._items[key])

    def payload(self, key: Key) -> ExpertPayload:
        return self._items[key]

    def keys(self) -> list[Key]:
        return list(self._items)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._items.values())

    @property
    def raw_nbytes(self) -> int:
        return sum(raw_nbytes(p) for p in self._items.values())

    def __contains__(self, key: Key) -> bool:
        return key in self._items


class RawStore(ExpertStore):
    name = "raw"

    @staticmethod
    def encode(weights: ExpertWeights) -> ExpertWeights:
        return weights

    def _holds_as_is(self, payload: ExpertPayload) -> bool:
        return not isinstance(payload, CodedExpert)


class DFloat11Store(ExpertStore):
    name = "dfloat11"

    @staticmethod
    def encode(weights: ExpertWeights) -> CodedExpert:
        return CodedExpert.encode(weights)  # raises InvalidParameterError host_weight_format unless bf16

    def _holds_as_is(self, payload: ExpertPayload) -> bool:
        return isinstance(payload, CodedExpert)


HOST_WEIGHT_FORMATS: dict[str, type[ExpertStore]] = {"raw": RawStore, "dfloat11": DFloat11Store}


def store_class(name: str) -> type[ExpertStore]:
    if name not in HOST_WEIGHT_FORMATS:
        raise InvalidParameterError("host_weight_format", f"must be one of {sorted(HOST_WEIGHT_FORMATS)}, "
                                                          f"got {name!r}")
    return HOST_WEIGHT_FORMATS[name]


def make_store(name: str) -> ExpertStore:
    return store_class(name)()


def wire_payload(name: str, weights: ExpertWeights) -> ExpertPayload:
    """``weights`` as a host keeping format ``name`` holds and sends them (failover reloads send this)."""
    return store_class(name).encode(weights)
