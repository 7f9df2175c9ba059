"""Expert weights in transit (tierserve/offload/expert_transit.py, tierserve/offload/host_storage.py), without Ray.

Real weights: experts of the MoEfied SmolLM2 (tierserve/tools/moefy.py) read straight from
its safetensors file and cast to bf16 (``w1`` and ``w3`` stacked as ``gate_up``, ``w2`` as
``down``); the reference is those bf16 tensors. The payload goes through ``pickle`` (what
Ray does with a non-numpy object) between the store and the receiver. The Ray paths (spare
slots, promotion, failover reload over dfloat11 hosts) are tested in
tests/test_expert_runtime.py.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors import safe_open

from tierserve.errors import InvalidParameterError
from tierserve.offload.expert_transit import CodedExpert, TransitBytes, as_weights
from tierserve.offload.expert_weights import ExpertWeights, numpy_to_tensor, tensor_to_numpy
from tierserve.offload.host_storage import make_store, wire_payload

#: (layer, expert) of the MoEfied SmolLM2 read for the tests: first, middle and last layer.
KEYS = [(0, 0), (15, 3), (29, 7)]


@pytest.fixture(scope="module")
def real_experts() -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """bf16 ``gate_up`` [384, 576] and ``down`` [576, 192] tensors of KEYS."""
    from tierserve.tools.moefy import ensure_moe_model

    out = {}
    with safe_open(os.path.join(ensure_moe_model(), "model.safetensors"), framework="pt") as f:
        for layer, e in KEYS:
            def get(name):
                return f.get_tensor(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{name}.weight").to(
                    torch.bfloat16)

            out[(layer, e)] = {"gate_up": torch.cat([get("w1"), get("w3")]), "down": get("w2")}
    return out


def _weights(t: dict[str, torch.Tensor]) -> ExpertWeights:
    return ExpertWeights(tensor_to_numpy(t["gate_up"]), tensor_to_numpy(t["down"]), "silu", "bfloat16")


def _assert_same(w: ExpertWeights, ref: dict[str, torch.Tensor]) -> None:
    assert (w.act, w.dtype) == ("silu", "bfloat16")
    assert torch.equal(numpy_to_tensor(w.gate_up, torch.bfloat16), ref["gate_up"])
    assert torch.equal(numpy_to_tensor(w.down, torch.bfloat16), ref["down"])


def test_coded_payload_round_trip_is_exact_and_smaller(real_experts):
    """A dfloat11 store sends the CodedExpert it holds; after pickling it decodes to the exact bf16
    tensors, and it is < 0.75 x the bf16 bytes."""
    store = make_store("dfloat11")
    for key, ref in real_experts.items():
        store.put(key, _weights(ref))
    moved = TransitBytes()
    for key, ref in real_experts.items():
        sent = store.payload(key)
        assert isinstance(sent, CodedExpert)
        received = pickle.loads(pickle.dumps(sent))
        moved.add(received)
        raw = sum(t.numel() * 2 for t in ref.values())
        assert received.raw_nbytes == raw == 663552
        assert received.nbytes < 0.75 * raw
        _assert_same(as_weights(received), ref)
        _assert_same(store.get(key), ref)
    assert moved.count == len(KEYS) and moved.raw == len(KEYS) * 663552
    assert moved.wire == store.nbytes and moved.raw == store.raw_nbytes
    print(f"DFloat11 expert payloads (MoEfied SmolLM2, bf16): {moved.wire} B coded vs {moved.raw} B raw "
          f"({moved.wire / moved.raw:.3f})")


def test_stores_take_either_form(real_experts):
    """A coded expert put on a dfloat11 store is kept as received (no re-encoding); a raw store decodes
    it and sends raw arrays; wire_payload gives each format's form."""
    key, ref = KEYS[1], real_experts[KEYS[1]]
    w = _weights(ref)
    coded = wire_payload("dfloat11", w)
    assert isinstance(coded, CodedExpert)
    assert wire_payload("raw", w) is w
    df11 = make_store("dfloat11")
    df11.put(key, coded)
    assert df11.payload(key) is coded
    raw_store = make_store("raw")
    raw_store.put(key, pickle.loads(pickle.dumps(coded)))
    sent = raw_store.payload(key)
    assert isinstance(sent, ExpertWeights) and sent.nbytes == raw_store.nbytes == 663552
    _assert_same(sent, ref)
    moved = TransitBytes()
    moved.add(sent)
    assert (moved.wire, moved.raw, moved.count) == (663552, 663552, 1)


def test_dfloat11_rejects_non_bf16(real_experts):
    ref = real_experts[KEYS[0]]
    fp32 = ExpertWeights(ref["gate_up"].float().numpy(), ref["down"].float().numpy(), "silu", "float32")
    with pytest.raises(InvalidParameterError, match="host_weight_format"):
        make_store("dfloat11").put(KEYS[0], fp32)
    with pytest.raises(InvalidParameterError, match="host_weight_format"):
        wire_payload("dfloat11", fp32)
    with pytest.raises(InvalidParameterError, match="host_weight_format"):
        make_store("fp8")
