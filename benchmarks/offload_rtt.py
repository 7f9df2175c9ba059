"""ExpertHost.compute round trip for benchmarks/offload.py: plain Ray actor calls vs the socket channel.

Two ExpertHost actors (on the running Ray cluster) each load ``layer_experts`` random
fp32 experts (64 wide) of layer 0; one decode-sized payload (1 and 4 rows) goes to one
and to both hosts, 110 times per variant, median of the last 100, in milliseconds:
``ray_{n}host_rows_{r}_median_ms`` (``ray.get`` of ``compute.remote`` calls) and
``socket_{n}host_rows_{r}_median_ms`` (tierserve.offload.socket_channel, sends then reads).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import ray


def round_trip(hidden: int, layer_experts: int) -> dict:
    from tierserve.actors.expert_host import ExpertHost
    from tierserve.offload.expert_weights import ExpertWeights
    from tierserve.offload.socket_channel import SocketChannel

    hosts = [ExpertHost.remote("auto") for _ in range(2)]
    w = ExpertWeights(np.random.randn(2 * 64, hidden).astype(np.float32),
                      np.random.randn(hidden, 64).astype(np.float32), "silu", "float32")
    ray.get([h.load_experts.remote({(0, e): w for e in range(layer_experts)}) for h in hosts])
    channels = [SocketChannel((ip, port), 30.0, bytes.fromhex(token))
                for ip, port, token in ray.get([h.open_channel.remote() for h in hosts])]

    def ray_call(hs, x, ids):
        ray.get([h.compute.remote(0, x, ids) for h in hs])

    def socket_call(chs, x, ids):
        for ch in chs:
            ch.send(0, x, ids, "float32")
        for ch in chs:
            ch.recv(time.monotonic() + 30.0)

    res = {}
    for rows in (1, 4):
        x = np.random.randn(rows, hidden).astype(np.float32)
        ids = np.zeros(rows, dtype=np.int64)
        for name, call, targets in (("ray", ray_call, hosts), ("socket", socket_call, channels)):
            for n in (1, 2):
                times = []
                for _ in range(110):
                    t0 = time.perf_counter()
                    call(targets[:n], x, ids)
                    times.append(time.perf_counter() - t0)
                res[f"{name}_{n}host_rows_{rows}_median_ms"] = 1e3 * statistics.median(times[10:])
    for ch in channels:
        ch.close()
    for h in hosts:
        ray.kill(h)
    return res
