"""Set-up shared by the ``*_gpu`` benchmarks: arguments, the CUDA-absent exit, copy bandwidths.

``parse_device_args`` builds the benchmark's parser (``--out`` first, the
benchmark's own options, then ``--device cuda|cpu``, default cuda), parses the
command line and, for ``--device cuda`` on a machine without CUDA, prints
``<name>: CUDA is absent on this machine; nothing to measure`` and returns None
(the benchmark then exits 0). Otherwise it returns the arguments, the device
and the device's copy bandwidth (decode_gpu.copy_bandwidth: 2 GiB on CUDA,
128 MiB on the CPU, GB/s of bytes read + written) that every table prints.

``host_bandwidth`` is the host's copy bandwidth in the same unit (numpy, best
of 3 copies of ``nbytes``), for the benchmarks whose experts run on CPU hosts.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from decode_gpu import copy_bandwidth


@dataclass
class DeviceRun:
    args: argparse.Namespace
    device: torch.device
    copy_gbs: float  # the device's measured copy bandwidth (GB/s, read + write)


def parse_device_args(name: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                      argv: list[str] | None = None) -> DeviceRun | None:
    """The benchmark's arguments, device and device copy bandwidth; None where CUDA is asked for and absent."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", required=True)
    add_arguments(ap)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{name}: CUDA is absent on this machine; nothing to measure")
        return None
    device = torch.device(args.device)
    return DeviceRun(args, device, copy_bandwidth(device, 2**31 if device.type == "cuda" else 2**27))


def host_bandwidth(nbytes: int = 2**30) -> float:
    """Host copy bandwidth, GB/s of bytes read + written (best of 3 numpy copies)."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9
