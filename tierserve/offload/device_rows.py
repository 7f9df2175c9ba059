"""DeviceRows: the routed rows of a fused dispatch between the worker's device and host memory.

An expert host computes on CPU arrays; the worker's activations live on its
device. Per MoE layer and step, the dispatcher (tierserve.offload.dispatch)
hands this class the rows it sends (one index list per host message) and the
hosts' replies:

* ``index(rows, device)``: an int64 index tensor on the activations' device.
* ``to_host(x, token_lists)``: one numpy array per message, the rows
  ``x[tokens]`` in order (16-bit floats as their int16 bit patterns, the wire
  form of tierserve.offload.expert_weights.tensor_to_numpy). On the CPU this is
  ``tensor_to_numpy(x.index_select(0, tokens))``, the path the CPU tests pin
  down. On CUDA every message's rows are gathered and copied device-to-host
  into pinned buffers on a side stream that first waits for the compute
  stream (so the copies never run ahead of the rows' producer), and each
  message's copy gets its own event: ``to_host`` returns a generator that
  yields message ``i`` as soon as its copy has landed, so the first host's
  message is on the wire while the later copies still run.
* ``to_device(y, dtype, device)``: a reply as a tensor on ``device``. On CUDA
  the reply is staged in a pinned buffer and copied host-to-device with
  ``non_blocking=True`` on the current (compute) stream, which is where the
  dispatcher uses it next (the caching host allocator keeps the pinned buffer
  alive until that copy has run, so a buffer is never reused under a copy).

Pinned buffers come from torch's caching host allocator: a full pool grows,
it never hands out a buffer a pending copy still reads. Copies are exact
(bytes moved, no conversion), so a row computed on a host is the same bit
pattern on the device as in the host's reply.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from tierserve.offload.expert_weights import numpy_to_tensor, tensor_to_numpy


class DeviceRows:
    def __init__(self):
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @staticmethod
    def index(rows: Sequence[int], device: torch.device) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=device)

    def to_host(self, x: torch.Tensor, token_lists: Sequence[Sequence[int]]) -> Iterator[np.ndarray]:
        """Message ``i``'s rows ``x[token_lists[i]]`` as a host array, in order (module doc)."""
        if x.device.type != "cuda":
            for tokens in token_lists:
                yield tensor_to_numpy(x.index_select(0, self.index(tokens, x.device)))
            return
        side = self._side_stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        staged = []
        with torch.cuda.stream(side):
            for tokens in token_lists:
                rows = x.index_select(0, self.index(tokens, x.device))
                host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
                host.copy_(rows, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
                staged.append((host, done))
        for host, done in staged:
            done.synchronize()
            yield tensor_to_numpy(host)

    @staticmethod
    def to_device(y: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A host reply as a ``dtype`` tensor on ``device`` (module doc)."""
        t = numpy_to_tensor(y, dtype) if device.type != "cuda" else _pinned(y, dtype)
        return t if device.type != "cuda" else t.to(device, non_blocking=True)

    def _side_stream(self, device: torch.device) -> "torch.cuda.Stream":
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream


def _pinned(y: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``y`` (16-bit floats as int16 patterns) copied into a pinned ``dtype`` buffer."""
    host = torch.empty(y.shape, dtype=dtype, pin_memory=True)
    view = host.view(torch.int16) if dtype in (torch.bfloat16, torch.float16) else host
    view.copy_(torch.from_numpy(np.ascontiguousarray(y)))
    return host
