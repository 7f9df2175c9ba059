"""The torch decode path of paged attention (kernels/paged_attention.py) against the form it replaced and brute force.

- ``paged_decode`` is bit-equal to the per-layer form it replaced (table cut and reshaped per call, a fresh
  ``arange < lens`` mask per step, written out here) at batch 1 and 3, with and without a sliding window and
  logit soft-capping, and within float32 rounding of a float64 brute-force attention per sequence.
- At batch 1 the mask allocates nothing: masks of different steps are views of one constant vector, with the
  values of ``arange(width) < L`` (and ``>= L - window``), also past the vector's first capacity. Without a window
  or soft-capping a batch-1 step builds no mask at all (the gathered keys are cut to L): within one float32
  rounding of the masked form, and within the same bound of brute force.
- The step's table cut and flat ids are built once per step (every layer gets the same tensors).
"""

from __future__ import annotations

import pytest
import torch

from tierserve.kernels import paged_attention as pa
from tierserve.kernels.kv_pages import LayerKV
from tierserve.kernels.paged_attention import AttentionMetadata, paged_decode

BS, HKV, HQ, D = 4, 2, 4, 16


def _old_decode(q, kv, meta, scale, window, softcap):
    """The decode path as it was: per call, the table cut to the width and gathered, a fresh mask."""
    nb = -(-max(meta.seq_lens) // meta.block_size)
    table = meta.block_tables[:, :nb]
    keys = torch.index_select(kv.k, 0, table.reshape(-1)).view(table.shape[0], -1, HKV, D).transpose(1, 2)
    vals = torch.index_select(kv.v, 0, table.reshape(-1)).view(table.shape[0], -1, HKV, D).transpose(1, 2)
    lens = torch.tensor(meta.seq_lens, dtype=torch.long)[:, None]
    pos = torch.arange(keys.shape[2])[None, :]
    mask = pos < lens
    if window is not None:
        mask &= pos >= lens - window
    return pa._attend(q[:, :, None, :], keys, vals, mask[:, None, None, :], scale, softcap)[:, :, 0, :]


def _brute(q, kv, meta, scale, window, softcap):
    out = []
    for b, seq_len in enumerate(meta.seq_lens):
        ids = [int(meta.block_tables[b, j // BS]) * BS + j % BS for j in range(seq_len)]
        keep = [j for j in range(seq_len) if window is None or j >= seq_len - window]
        k = kv.k.reshape(-1, HKV, D)[[ids[j] for j in keep]].double().repeat_interleave(HQ // HKV, 1)
        v = kv.v.reshape(-1, HKV, D)[[ids[j] for j in keep]].double().repeat_interleave(HQ // HKV, 1)
        s = torch.einsum("hd,lhd->hl", q[b].double(), k) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        out.append(torch.einsum("hl,lhd->hd", s.softmax(-1), v))
    return torch.stack(out)


def _case(seq_lens, seed):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 40
    kv = LayerKV(torch.randn(num_blocks, BS, HKV, D, generator=g), torch.randn(num_blocks, BS, HKV, D, generator=g))
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, start = [], 0
    for seq_len in seq_lens:
        n = -(-seq_len // BS)
        tables.append(perm[start:start + n])
        start += n
    meta = AttentionMetadata.build([1] * len(seq_lens), seq_lens, tables, BS)
    return torch.randn(len(seq_lens), HQ, D, generator=g), kv, meta


@pytest.mark.parametrize("seq_lens", [[13], [16], [13, 5, 22]])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_decode_equals_replaced_form_and_brute_force(seq_lens, window, softcap):
    q, kv, meta = _case(seq_lens, seed=sum(seq_lens))
    with torch.inference_mode():
        got = paged_decode(q, kv, meta, 0.3, window, softcap)
        again = paged_decode(q, kv, meta, 0.3, window, softcap)  # the second layer of a step: memoised inputs
    old = _old_decode(q, kv, meta, 0.3, window, softcap)
    if len(seq_lens) == 1 and window is None and softcap is None:  # unmasked keys cut to L: one rounding apart
        assert torch.equal(got, again) and (got - old).abs().max().item() <= 2e-6
    else:
        assert torch.equal(got, old) and torch.equal(again, old)
    # float32 SDPA against float64: |out| <= max |v| ~ 4; 1e-5 is ~100 float32 roundings of that
    assert (got.double() - _brute(q, kv, meta, 0.3, window, softcap)).abs().max().item() <= 1e-5


def test_batch1_mask_is_a_view_of_one_constant():
    """Masks of steps at lengths 13 and 14 share the constant's storage; values equal a fresh comparison,
    also for a width past the constant's first capacity (it regrows) and with a window."""
    def mask(seq_len, width, window=None):
        meta = AttentionMetadata.build([1], [seq_len], [list(range(-(-seq_len // BS)))], BS)
        return meta.decode_mask(width, window, torch.device("cpu"))

    a, b = mask(13, 16), mask(14, 16)
    assert a.shape == (1, 1, 1, 16)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    for seq_len, width, window in [(13, 16, None), (14, 16, 6), (3000, 3000, None), (2999, 3000, 700),
                                   (5, 8, 100)]:
        pos = torch.arange(width)
        want = (pos < seq_len) & ((pos >= seq_len - window) if window is not None else True)
        assert torch.equal(mask(seq_len, width, window).reshape(-1), want), (seq_len, width, window)


def test_decode_table_built_once_per_step():
    _, _, meta = _case([13, 5], seed=1)
    table, flat = meta.decode_table()
    assert meta.decode_table()[1] is flat
    assert torch.equal(table, meta.block_tables[:, :4]) and torch.equal(flat, table.reshape(-1))


def test_batch1_without_window_builds_no_mask():
    """Batch 1, no window, no soft-cap: attention over the first L gathered keys, no mask asked for; the output is
    that of brute force over exactly L keys (a page's stale slots past L never count)."""
    q, kv, meta = _case([13], seed=5)
    kv.k[int(meta.block_tables[0, 3]), 1:] = 1e3  # the last page's slots past L = 13 (offsets 1..3)
    with torch.inference_mode():
        got = paged_decode(q, kv, meta, 0.3)
    assert not any(isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], int) for key in meta._masks)
    assert (got.double() - _brute(q, kv, meta, 0.3, None, None)).abs().max().item() <= 1e-5
