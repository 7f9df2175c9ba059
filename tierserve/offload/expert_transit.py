"""Expert weights in transit: what an expert host sends, how the receiver decodes it, the bytes counted.

An expert crosses the wire (host -> worker for spare-slot fills, promotions and the
cost model's bandwidth probe; worker -> host for failover reloads) as an
``ExpertPayload``, in the form the host keeps it at rest (tierserve.offload.host_storage):

* ``ExpertWeights``: the raw arrays (``host_weight_format="raw"``), 2 bytes per bf16
  weight, 4 per fp32 one;
* :class:`CodedExpert`: a bf16 expert DFloat11-coded (``"dfloat11"``): ONE
  ``DF11Block`` over ``{"gate_up", "down"}`` (one Huffman table per expert, the
  exponents entropy-coded, sign+mantissa bytes raw; 0.71 of bf16 on the MoEfied
  SmolLM2 experts, measured in tests/test_expert_transit.py). The host sends the block
  its store already holds (no re-encoding); the receiver decodes it with
  ``decode_block`` into weights bit-identical to the bf16 arrays that were coded.

``fetch_expert(transport, key, timeout_s)`` is the one worker-side path for all the
host -> worker copies: one ``get_expert_payload`` call on the host's
``ExpertTransport`` (tierserve.offload.transport; ``timeout_s`` None: the transport's
default), then the decode on the calling thread (for spare slots that is the ring's background thread). It returns a
:class:`FetchedExpert`: the weights ready for ``build_expert`` and the payload's
:class:`TransitBytes` (bytes on the wire, and what the same expert takes as raw arrays).

Decoding costs CPU: the numpy DFloat11 decoder takes 11-90 ms per MoEfied SmolLM2
expert (663 KB of bf16) on the 2-core dev machine, up to ~0.5 s while it runs
benchmarks (encoding: 17-50 ms), far more than the ~0.4 ms the ~190 KB it saves take
at the default 5e8 B/s. ``CostModel.measure``
(tierserve.offload.spare_slots) therefore times the whole ``fetch_expert`` (transfer +
decode) and converts it into an effective bandwidth in RAW bytes, the unit the
dispatcher's fetch-or-remote decision uses.

``TransitBytes`` is a plain counter (``wire``, ``raw``, ``count``), added to once per
payload moved: ``SpareSlots.fill_bytes`` (fills), ``PoolStats.promotion_bytes`` and
``PoolStats.reload_bytes`` (tierserve.offload.host_pool).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.dfloat11 import DF11Block, decode_block, encode_block
from tierserve.offload.expert_weights import ExpertWeights, numpy_to_tensor, tensor_to_numpy

Key = tuple[int, int]


@dataclass(frozen=True)
class CodedExpert:
    """One bf16 expert as a DFloat11 block over ``gate_up`` then ``down``; ``raw_nbytes`` its bf16 size."""

    block: DF11Block
    act: str
    raw_nbytes: int

    dtype = "bfloat16"

    @property
    def nbytes(self) -> int:
        """The coded bytes (Huffman stream, sign/mantissa bytes, decode tables and window metadata)."""
        return self.block.nbytes

    @classmethod
    def encode(cls, weights: ExpertWeights) -> "CodedExpert":
        if weights.dtype != "bfloat16":
            raise InvalidParameterError("host_weight_format", f"'dfloat11' needs bfloat16 experts, got "
                                                              f"{weights.dtype} (the coding is lossless for bf16 only)")
        block = encode_block({"gate_up": numpy_to_tensor(weights.gate_up, torch.bfloat16),
                              "down": numpy_to_tensor(weights.down, torch.bfloat16)})
        return cls(block, weights.act, weights.nbytes)

    def decode(self) -> ExpertWeights:
        t = decode_block(self.block)
        return ExpertWeights(tensor_to_numpy(t["gate_up"]), tensor_to_numpy(t["down"]), self.act, "bfloat16")


#: What an expert crosses the wire as (module doc).
ExpertPayload = ExpertWeights | CodedExpert


def as_weights(payload: ExpertPayload) -> ExpertWeights:
    """The plain arrays of ``payload`` (decoded when coded)."""
    return payload.decode() if isinstance(payload, CodedExpert) else payload


def raw_nbytes(payload: ExpertPayload) -> int:
    """What ``payload``'s expert takes as plain arrays."""
    return payload.raw_nbytes if isinstance(payload, CodedExpert) else payload.nbytes


@dataclass
class TransitBytes:
    """Expert payloads moved: ``count`` of them, ``wire`` bytes sent, ``raw`` bytes as plain arrays."""

    wire: int = 0
    raw: int = 0
    count: int = 0

    def add(self, payload: ExpertPayload) -> None:
        self.wire += int(payload.nbytes)
        self.raw += raw_nbytes(payload)
        self.count += 1

    def merge(self, other: "TransitBytes") -> None:
        self.wire += other.wire
        self.raw += other.raw
        self.count += other.count


@dataclass
class FetchedExpert:
    """An expert copied from a host: ``weights`` for ``build_expert``, ``bytes`` its payload's sizes."""

    weights: ExpertWeights
    bytes: TransitBytes


def fetch_expert(transport, key: Key, timeout_s: float | None) -> FetchedExpert:
    """Copy expert ``key`` from the host behind ``transport`` as it holds it and decode it here (module doc).

    Raises ``HostCallError`` (tierserve.offload.transport) when the copy fails, a host that
    does not hold ``key`` included."""
    payload: ExpertPayload = transport.get_expert_payload(key, timeout_s)
    moved = TransitBytes()
    moved.add(payload)
    return FetchedExpert(as_weights(payload), moved)
