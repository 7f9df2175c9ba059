"""How an ExpertHost keeps expert weights at rest: raw arrays, or DFloat11-coded (lossless).

``ExpertStore`` contract: ``put(key, weights)`` stores one expert's ``ExpertWeights``;
``get(key)`` returns weights bit-identical to the ones put; ``nbytes`` is what the
store holds at rest; ``raw_nbytes`` what the same experts take as plain arrays.
Implementations are picked by name from ``HOST_WEIGHT_FORMATS``:

* ``"raw"``: the arrays as received;
* ``"dfloat11"``: bf16 experts coded with tierserve.kernels.quant.dfloat11
  (``encode_block`` over ``{"gate_up", "down"}``: one Huffman table per expert, the
  8-bit exponents entropy-coded, sign+mantissa bytes raw: ~11/16 of bf16 on trained
  weights); ``get`` decodes them (``decode_block``, bit-identical). Only bf16 experts are
  accepted (the format is lossless for bf16 only): anything else raises
  InvalidParameterError ``host_weight_format``.

The host decodes an expert when it builds its module, on the first ``compute`` that
routes to it, and keeps the built module (a cache of the experts in use); experts
never called (standby copies of resident experts, unrouted cold ones) stay coded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from tierserve.errors import InvalidParameterError
from tierserve.moe.expert_weights import ExpertWeights, numpy_to_tensor, tensor_to_numpy

Key = tuple[int, int]


class ExpertStore(ABC):
    @abstractmethod
    def put(self, key: Key, weights: ExpertWeights) -> None: ...

    @abstractmethod
    def get(self, key: Key) -> ExpertWeights: ...

    @abstractmethod
    def keys(self) -> list[Key]: ...

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    @property
    @abstractmethod
    def raw_nbytes(self) -> int: ...

    def __contains__(self, key: Key) -> bool:
        return key in self.keys()


class RawStore(ExpertStore):
    def __init__(self):
        self._w: dict[Key, ExpertWeights] = {}

    def put(self, key: Key, weights: ExpertWeights) -> None:
        self._w[key] = weights

    def get(self, key: Key) -> ExpertWeights:
        return self._w[key]

    def keys(self) -> list[Key]:
        return list(self._w)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self._w.values())

    @property
    def raw_nbytes(self) -> int:
        return self.nbytes


class DFloat11Store(ExpertStore):
    def __init__(self):
        self._blocks: dict[Key, tuple] = {}  # key -> (DF11Block, act, raw bytes)

    def put(self, key: Key, weights: ExpertWeights) -> None:
        from tierserve.kernels.quant.dfloat11 import encode_block

        if weights.dtype != "bfloat16":
            raise InvalidParameterError("host_weight_format", f"'dfloat11' needs bfloat16 experts, expert {key} "
                                                              f"is {weights.dtype}")
        tensors = {"gate_up": numpy_to_tensor(weights.gate_up, torch.bfloat16),
                   "down": numpy_to_tensor(weights.down, torch.bfloat16)}
        self._blocks[key] = (encode_block(tensors), weights.act, weights.nbytes)

    def get(self, key: Key) -> ExpertWeights:
        from tierserve.kernels.quant.dfloat11 import decode_block

        block, act, _ = self._blocks[key]
        t = decode_block(block)
        return ExpertWeights(tensor_to_numpy(t["gate_up"]), tensor_to_numpy(t["down"]), act, "bfloat16")

    def keys(self) -> list[Key]:
        return list(self._blocks)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b, _, _ in self._blocks.values())

    @property
    def raw_nbytes(self) -> int:
        return sum(n for _, _, n in self._blocks.values())


HOST_WEIGHT_FORMATS: dict[str, type[ExpertStore]] = {"raw": RawStore, "dfloat11": DFloat11Store}


def make_store(name: str) -> ExpertStore:
    if name not in HOST_WEIGHT_FORMATS:
        raise InvalidParameterError("host_weight_format", f"must be one of {sorted(HOST_WEIGHT_FORMATS)}, "
                                                          f"got {name!r}")
    return HOST_WEIGHT_FORMATS[name]()
