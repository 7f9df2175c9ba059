"""The DRAM and disk tiers under capacity pressure: LMCache's CPU buffer evicts the least recently used chunk.

A DRAM-only tier of 0.004 GiB (4.3 MB) holds records of 1 MiB of payload: at most 4 fit. Records 0..3
are put, record 0 is read (now the most recently used), then records 4 and 5 are put: each allocation
that needs room evicts the least recently used record, so records 1 and 2 go and 0, 3, 4, 5 stay, each
with its exact bytes; the holdings report the same set. The disk tier's test (its docstring) adds a
removal, whose space must be given back.
"""

from __future__ import annotations

import torch

from tierserve.cache.tiers.chunk import record_size, verify_record, write_record
from tierserve.cache.tiers.config import KVTierConfig
from tierserve.cache.tiers.registry import build_tiers

SHAPE = (2, 2, 256, 4, 64)  # [layers, K/V, chunk tokens, kv heads, head dim] float32: 1 MiB of payload


def _put(runtime, dram, i: int) -> tuple[bytes, bytes]:
    key = bytes([i + 1]) * 32
    payload = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
    raw = payload.view(torch.uint8).view(-1).numpy()
    record = runtime.allocate(record_size(raw.nbytes))
    assert record is not None
    write_record(record.view(), key, "float32", SHAPE, memoryview(raw))
    assert dram.put(key, record) is True
    record.release()
    return key, raw.tobytes()


def test_dram_tier_evicts_least_recently_used(tmp_path):
    cfg = KVTierConfig(tiers=("dram",), chunk_blocks=16, dram_gib=0.004)
    runtime, backends = build_tiers(cfg, "tier-lru-test", "float32", SHAPE[2], SHAPE)
    (dram,) = backends
    try:
        stored = [_put(runtime, dram, i) for i in range(4)]
        assert all(dram.contains(k) for k, _ in stored)
        first = dram.get(stored[0][0])  # record 0 becomes the most recently used
        assert bytes(verify_record(first.view(), stored[0][0], "float32", SHAPE)) == stored[0][1]
        first.release()
        stored += [_put(runtime, dram, i) for i in (4, 5)]
        held = {i for i, (k, _) in enumerate(stored) if dram.contains(k)}
        assert held == {0, 3, 4, 5}, held
        for i in sorted(held):
            got = dram.get(stored[i][0])
            assert bytes(verify_record(got.view(), stored[i][0], "float32", SHAPE)) == stored[i][1]
            got.release()
        assert dram.holdings().keys == frozenset(stored[i][0] for i in held)
    finally:
        dram.close()
        runtime.close()


def test_disk_tier_evicts_least_recently_used_and_frees_removed_space(tmp_path):
    """The disk tier of 0.0045 GiB (4.8 MB) holds 4 of these records (1 MiB + header each), not 5.

    Records 0..3 are written (each waited for: the index only lists landed files, so eviction candidates
    are deterministic), record 0 is read (now the most recently used), record 1 is removed (its size is
    given back), then 4 and 5 are written: 4 fits in the freed space, 5 evicts the least recently used,
    record 2. Held: 0, 3, 4, 5, each with its exact bytes; their files are on disk and 1's and 2's are not.
    (A removal that kept its size reserved, as LMCache's own does, evicts 2 and then 3; reads not counted
    as use would evict 0 instead of 2.)
    """
    import os

    from polling import wait_for

    cfg = KVTierConfig(tiers=("disk",), chunk_blocks=16, dram_gib=0.01, disk_gib=0.0045,
                       disk_path=str(tmp_path / "kvdisk"))
    runtime, backends = build_tiers(cfg, "tier-disk-lru-test", "float32", SHAPE[2], SHAPE)
    (disk,) = backends
    try:
        stored = []
        for i in range(4):
            stored.append(_put(runtime, disk, i))
            wait_for(lambda: disk.contains(stored[-1][0]))
        first = disk.get(stored[0][0])
        assert bytes(verify_record(first.view(), stored[0][0], "float32", SHAPE)) == stored[0][1]
        first.release()
        disk.remove(stored[1][0])
        for i in (4, 5):
            stored.append(_put(runtime, disk, i))
            wait_for(lambda: disk.contains(stored[-1][0]))
        held = {i for i, (k, _) in enumerate(stored) if disk.contains(k)}
        assert held == {0, 3, 4, 5}, held
        for i in sorted(held):
            got = disk.get(stored[i][0])
            assert bytes(verify_record(got.view(), stored[i][0], "float32", SHAPE)) == stored[i][1]
            got.release()
        assert disk.holdings().keys == frozenset(stored[i][0] for i in held)
        files = {os.path.join(cfg.disk_path, runtime.key(k).to_string() + ".pt"): i for i, (k, _) in enumerate(stored)}
        assert {i for f, i in files.items() if os.path.exists(f)} == held
        assert disk.failures == 0
    finally:
        disk.close()
        runtime.close()
