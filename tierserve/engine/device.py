"""Which device and dtype an engine runs on: ``EngineConfig.device`` and ``ModelConfig.dtype`` resolved.

``device``: ``"auto"`` is ``cuda`` (the current CUDA device, i.e. the first one
visible; under Ray the GPU Ray assigned the replica, through
CUDA_VISIBLE_DEVICES) when ``torch.cuda.is_available()``, else ``cpu``;
``"cpu"``; ``"cuda"``; ``"cuda:N"`` with N < the visible device count.
Asking for CUDA where there is none, or for an index past the count, is an
InvalidParameterError naming ``device``.

``dtype``: ``"auto"`` is bfloat16 on CUDA and float32 on the CPU (the CPU
path is the fp32 reference); an explicit name is kept.
"""

from __future__ import annotations

import torch

from tierserve.errors import InvalidParameterError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InvalidParameterError("device", f"{name!r} asks for CUDA but torch sees no CUDA device here")
        index = torch.cuda.current_device() if name == "cuda" else _index(name)
        count = torch.cuda.device_count()
        if index >= count:
            raise InvalidParameterError("device", f"{name!r}: index must be < {count} (visible CUDA devices)")
        return torch.device("cuda", index)
    raise InvalidParameterError("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")


def _index(name: str) -> int:
    tail = name.split(":", 1)[1]
    if not tail.isdigit():
        raise InvalidParameterError("device", f"must be 'cuda:N' with N a non-negative integer, got {name!r}")
    return int(tail)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
