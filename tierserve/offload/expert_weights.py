"""One expert's weights as numpy buffers, the module that runs them, and re-reading them from disk.

An expert is a ``GatedMLP``: ``down(act(gate_up(x)[:I]) * gate_up(x)[I:])``. To a host
it travels as :class:`ExpertWeights` (two numpy arrays; bf16/fp16 as their raw 16-bit
patterns, since numpy has no bfloat16). ``build_expert`` turns them back into a
``GatedMLP`` and applies the SAME linear backend (``apply_linear_backend``) the worker
uses, so a host, a spare slot and a resident expert run identical kernels on
identical shapes and their outputs are bit-identical.

``CheckpointExperts`` re-reads a cold expert from the model's safetensors folder
(fault recovery: the worker keeps no copy of cold weights). It records, at offload
time, which HF tensor names (and row ranges of the fused ``gate_up_proj``) hold each
expert, taken from the model's own ``hf_slots`` map, and copies them the way the
loader does (``copy_`` into a tensor of the model dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open

from tierserve.errors import ModelLoadError
from tierserve.kernels.cpu_linear import apply_linear_backend
from tierserve.models.layers import GatedMLP

_RAW16 = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy copy of ``t`` (copied to the host first when on a device); 16-bit floats as int16 bit patterns."""
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().copy()
    return t.numpy().copy()


def numpy_to_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`tensor_to_numpy` (copies: Ray hands out read-only buffers)."""
    t = torch.from_numpy(np.array(a, copy=True))
    return t.view(dtype) if dtype in (torch.bfloat16, torch.float16) else t


@dataclass
class ExpertWeights:
    """``gate_up`` [2I, hidden] and ``down`` [hidden, I]; ``dtype`` the torch dtype name."""

    gate_up: np.ndarray
    down: np.ndarray
    act: str
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(self.gate_up.nbytes + self.down.nbytes)

    @classmethod
    def from_module(cls, expert: GatedMLP, act: str) -> "ExpertWeights":
        for lin in (expert.gate_up_proj, expert.down_proj):
            if not isinstance(lin, torch.nn.Linear) or lin.bias is not None:
                raise ModelLoadError(
                    "expert offload needs plain bias-free nn.Linear experts: apply it before the linear "
                    f"backend transform (got {type(lin).__name__})")
        dtype = str(expert.gate_up_proj.weight.dtype).removeprefix("torch.")
        return cls(tensor_to_numpy(expert.gate_up_proj.weight), tensor_to_numpy(expert.down_proj.weight),
                   act, dtype)


def _host_module(w: ExpertWeights) -> GatedMLP:
    """A CPU ``GatedMLP`` holding ``w`` in its dtype, in eval mode, without gradients."""
    dtype = getattr(torch, w.dtype)
    inter2, hidden = w.gate_up.shape
    mlp = GatedMLP(hidden, inter2 // 2, w.act, dtype)
    with torch.no_grad():
        mlp.gate_up_proj.weight.copy_(numpy_to_tensor(w.gate_up, dtype))
        mlp.down_proj.weight.copy_(numpy_to_tensor(w.down, dtype))
    return mlp.eval().requires_grad_(False)


def _copy_to(mlp: torch.nn.Module, device: torch.device) -> None:
    """Point ``mlp``'s parameters at copies on ``device``, issued through pinned buffers on the current stream
    without waiting."""
    with torch.no_grad():
        for p in mlp.parameters():
            p.data = p.data.pin_memory().to(device, non_blocking=True)


def build_expert(w: ExpertWeights, linear_backend: str, device: torch.device | None = None,
                 stream=None) -> torch.nn.Module:
    """A ``GatedMLP`` holding ``w``, with ``linear_backend`` applied (module doc); on ``device`` when given (a
    CUDA worker's spare slots and rebuilt experts), its weights copied there on ``stream`` (None: the current
    one) and waited for, so the module is ready to run on any stream of that device."""
    mlp = _host_module(w)
    if device is not None and torch.device(device).type == "cuda":
        device = torch.device(device)
        stream = stream or torch.cuda.current_stream(device)
        with torch.cuda.stream(stream):
            _copy_to(mlp, device)
        stream.synchronize()
    apply_linear_backend(mlp, linear_backend)  # after the move: a CUDA module is left to the CUDA kernels
    return mlp


def build_expert_on_stream(w: ExpertWeights, linear_backend: str, device: torch.device,
                           stream) -> tuple[torch.nn.Module, "torch.cuda.Event"]:
    """``build_expert`` on a CUDA ``device`` without waiting: the weights are copied through pinned buffers
    and the linear backend applied on ``stream``, whose event (recorded after both) is returned; a consumer
    waits for the event before it reads the module (tierserve.offload.spare_slots)."""
    mlp = _host_module(w)
    with torch.no_grad(), torch.cuda.stream(stream):
        _copy_to(mlp, device)
        apply_linear_backend(mlp, linear_backend)
        done = torch.cuda.Event()
        done.record(stream)
    return mlp, done


@dataclass(frozen=True)
class _Part:
    name: str        # HF tensor name
    target: str      # "gate_up" or "down"
    start: int
    end: int | None


class CheckpointExperts:
    """Reads single experts back from a safetensors folder (see module doc)."""

    def __init__(self, folder: str, parts: dict[tuple[int, int], list[_Part]],
                 shapes: dict[tuple[int, int], tuple[tuple[int, int], tuple[int, int]]], act: dict[int, str],
                 dtype: str):
        self.folder = folder
        self._parts = parts
        self._shapes = shapes
        self._act = act
        self._dtype = dtype
        self._file_of: dict[str, str] | None = None

    @classmethod
    def from_model(cls, folder: str, model: torch.nn.Module, experts: dict[tuple[int, int], GatedMLP],
                   act: dict[int, str]) -> "CheckpointExperts":
        owner = {}
        for key, mlp in experts.items():
            owner[id(mlp.gate_up_proj.weight)] = (key, "gate_up")
            owner[id(mlp.down_proj.weight)] = (key, "down")
        parts: dict[tuple[int, int], list[_Part]] = {k: [] for k in experts}
        for name, slot in model.hf_slots().items():
            hit = owner.get(id(slot.param))
            if hit is not None:
                parts[hit[0]].append(_Part(name, hit[1], slot.start, slot.end))
        shapes = {k: (tuple(m.gate_up_proj.weight.shape), tuple(m.down_proj.weight.shape))
                  for k, m in experts.items()}
        dtype = str(next(iter(experts.values())).gate_up_proj.weight.dtype).removeprefix("torch.") if experts \
            else "float32"
        return cls(folder, parts, shapes, act, dtype)

    def _files(self) -> dict[str, str]:
        if self._file_of is None:
            from tierserve.models.loader import safetensors_files

            self._file_of = {}
            for path in safetensors_files(self.folder):
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        self._file_of[name] = path
        return self._file_of

    @torch.no_grad()
    def read(self, layer: int, expert: int) -> ExpertWeights:
        key = (layer, expert)
        if key not in self._parts:
            raise ModelLoadError(f"expert {key} was not offloaded from {self.folder!r}")
        dtype = getattr(torch, self._dtype)
        gu_shape, down_shape = self._shapes[key]
        out = {"gate_up": torch.empty(gu_shape, dtype=dtype), "down": torch.empty(down_shape, dtype=dtype)}
        files = self._files()
        for part in self._parts[key]:
            if part.name not in files:
                raise ModelLoadError(f"{self.folder!r} no longer holds tensor {part.name!r}")
            with safe_open(files[part.name], framework="pt") as f:
                tensor = f.get_tensor(part.name)
            dest = out[part.target] if part.end is None else out[part.target][part.start:part.end]
            dest.copy_(tensor)
        return ExpertWeights(tensor_to_numpy(out["gate_up"]), tensor_to_numpy(out["down"]), self._act[layer],
                             self._dtype)
