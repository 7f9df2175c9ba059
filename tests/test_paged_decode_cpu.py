"""The C++ decode attention over fp32 pages (kernels/attention/paged_decode_cpu.py) against the torch reference
(``paged_decode`` of kernels/paged_attention.py), and the torch backend using it for decode-only steps."""

from __future__ import annotations

import random

import pytest
import torch

from tierserve.kernels.attention import paged_decode_cpu
from tierserve.kernels.kv_pages import LayerKV
from tierserve.kernels.paged_attention import AttentionMetadata, paged_attention, paged_decode

pytestmark = pytest.mark.skipif(not paged_decode_cpu.kernel_available(), reason="no C++ compiler here")

BS = 16


def _step(lens: list[int], hq: int, hkv: int, d: int, seed: int):
    """Random pages holding every sequence's context, one new query per sequence; block ids shuffled."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // BS) for n in lens]
    ids = list(range(sum(need) + 3))
    random.Random(seed).shuffle(ids)
    tables, at = [], 0
    for n in need:
        tables.append(ids[at:at + n])
        at += n
    kv = LayerKV(torch.randn(len(ids), BS, hkv, d, generator=g), torch.randn(len(ids), BS, hkv, d, generator=g))
    meta = AttentionMetadata.build([1] * len(lens), lens, tables, BS)
    q = torch.randn(len(lens), hq, d, generator=g)
    return q, kv, meta


@pytest.mark.parametrize("lens,hq,hkv,d", [
    ([37], 9, 3, 64),                    # SmolLM2's heads, batch 1
    ([1, 16, 17, 200, 64], 9, 3, 64),   # ragged, a one-token context, page edges
    ([90, 33], 4, 1, 256),              # Gemma-3-270m's 256-wide single KV head
    ([50, 7], 6, 2, 24),                # head_dim not a multiple of 8: the scalar loops
])
@pytest.mark.parametrize("window,softcap", [(None, None), (20, None), (None, 30.0), (8, 5.0)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_the_torch_reference(lens, hq, hkv, d, window, softcap, threads):
    q, kv, meta = _step(lens, hq, hkv, d, seed=len(lens) * d)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = paged_decode_cpu.paged_decode(q, kv.k, kv.v, meta.decode_table()[0],
                                            meta.device_ints("seq_lens", "cpu"), d ** -0.5, window, softcap)
    finally:
        torch.set_num_threads(previous)
    ref = paged_decode(q, kv, meta, d ** -0.5, window, softcap)
    assert got.shape == ref.shape == q.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)


def test_torch_backend_sends_fp32_decode_steps_to_the_kernel(monkeypatch):
    q, kv, meta = _step([40, 3], 9, 3, 64, seed=5)
    k_new, v_new = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    calls = []
    real = paged_decode_cpu.paged_decode
    monkeypatch.setattr(paged_decode_cpu, "paged_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ref_kv = LayerKV(kv.k.clone(), kv.v.clone())
    got = paged_attention(q, k_new, v_new, kv, meta, 0.125)
    ref_kv.write(meta.slot_mapping, k_new, v_new)
    torch.testing.assert_close(got, paged_decode(q, ref_kv, meta, 0.125), rtol=1e-5, atol=2e-6)
    assert calls == [1] and torch.equal(kv.k, ref_kv.k)  # the new rows were written before attending
    half = LayerKV(kv.k.to(torch.bfloat16), kv.v.to(torch.bfloat16))  # other dtypes keep the torch path
    assert not paged_decode_cpu.applies(q, half) and not paged_decode_cpu.applies(q.to(torch.bfloat16), kv)


def test_bad_tables_and_lengths_name_the_limit():
    q, kv, meta = _step([20], 9, 3, 64, seed=1)
    table, lens = meta.decode_table()[0], meta.device_ints("seq_lens", "cpu")
    with pytest.raises(RuntimeError, match=r"sequence 0: length 33 outside 1..32"):
        paged_decode_cpu.paged_decode(q, kv.k, kv.v, table, torch.tensor([33], dtype=torch.int32), 0.1)
    bad = table.clone()
    bad[0, 1] = kv.k.shape[0]
    with pytest.raises(RuntimeError, match=rf"sequence 0: block id {kv.k.shape[0]} out of range"):
        paged_decode_cpu.paged_decode(q, kv.k, kv.v, bad, lens, 0.1)
    with pytest.raises(RuntimeError, match="Hq is not a multiple of Hkv"):
        paged_decode_cpu.paged_decode(q[:, :8], kv.k, kv.v, table, lens, 0.1)
    with pytest.raises(ValueError, match="sliding_window must be >= 1, got 0"):
        paged_decode_cpu.paged_decode(q, kv.k, kv.v, table, lens, 0.1, sliding_window=0)
