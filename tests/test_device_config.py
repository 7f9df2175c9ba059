"""Device and dtype resolution (engine/device.py) and the CUDA-graph bucket table (engine/cuda_graphs.py), on CPU.

Exact assertions: ``auto`` resolves to the CPU here and to fp32 on it, bf16 on a CUDA device; asking for CUDA
where torch sees none, a malformed ``cuda:N`` or an unknown name is an InvalidParameterError naming
``device``; the buckets are 1, 2, 4, multiples of 8 to 32, multiples of 16 beyond, capped by max_num_seqs
(which is always a bucket itself), so every batch size up to the cap has a bucket.
"""

from __future__ import annotations

import pytest
import torch

from tierserve.config import EngineConfig
from tierserve.engine.cuda_graphs import graph_buckets
from tierserve.engine.device import resolve_device, resolve_dtype
from tierserve.errors import InvalidParameterError


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answers; on a CUDA machine auto picks the GPU")
def test_auto_is_cpu_without_cuda_and_cuda_names_are_refused():
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(InvalidParameterError) as err:
            resolve_device(name)
        assert err.value.field == "device" and "no CUDA device" in str(err.value)


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""])
def test_malformed_device_names_are_refused(name):
    with pytest.raises(InvalidParameterError) as err:
        resolve_device(name)
    assert err.value.field == "device"
    with pytest.raises(InvalidParameterError):
        EngineConfig(device=name)


def test_dtype_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cuda", 0)) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_graph_buckets_table():
    assert graph_buckets(256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128]
    assert graph_buckets(128, max_batch=64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert graph_buckets(1) == [1]
    assert graph_buckets(3) == [1, 2, 3]
    assert graph_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert graph_buckets(50) == [1, 2, 4, 8, 16, 24, 32, 48, 50]
    for cap in range(1, 140):
        buckets = graph_buckets(cap)
        top = min(cap, 128)
        assert buckets[-1] == top and buckets == sorted(set(buckets))
        assert all(any(b >= n for b in buckets) for n in range(1, top + 1))
