"""quantize_model: the module-swap transform that puts a weight format into a built model.

Every ``nn.Linear`` of the model (the fused ``qkv_proj`` / ``gate_up_proj`` are
single Linears, so they are quantized as one matrix) whose module name does not
match a ``skip`` pattern is replaced by a ``QuantizedLinear`` holding
``get_format(scheme, **options).quantize(weight, name)``; the bias stays float.
A module registered under several names (an untied ``lm_head`` is also
``logits_head``) is quantized once and swapped under every name. The default
``skip`` keeps embeddings and the LM head in full precision (``embed_tokens``,
``lm_head``, ``logits_head``). A pattern matches a module name when
``fnmatch`` matches the whole name or the name ends with ``"." + pattern``.
A weight the format cannot hold (e.g. in-features not a multiple of the group)
raises the format's InvalidParameterError naming the module, before any swap.

Calibration hook (for formats that learn from activations, e.g. SigmaScale or
GPTQ): a format declares ``needs_calibration = True`` and accepts
``quantize(weight, tensor_name, activations=X)`` with ``X [tokens, in]`` the
inputs that module saw. ``calibration`` is either a mapping module name -> X
or a callable name -> X; ``capture_activations(model, run, names)`` builds the
mapping with forward pre-hooks while ``run(model)`` executes real text through
the model. Formats without the flag never see activations. Too few calibration tokens for the format
(GPTQ / Qronos: fewer than the widest quantized linear's in_features; a format's ``min_calibration_tokens``)
raise InvalidParameterError naming the count and the limit before any swap (calibration_rows.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatch

import torch
from torch import nn

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import QuantizedLinear, get_format
from tierserve.kernels.quant.calibration_rows import calibration_tokens, check_calibration_tokens

DEFAULT_SKIP: tuple[str, ...] = ("embed_tokens", "lm_head", "logits_head")
Calibration = Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class QuantizedModuleInfo:
    format: str
    shape: tuple[int, int]
    meta: dict
    nbytes: int


@dataclass
class QuantizeReport:
    """What ``quantize_model`` did: per swapped module its format/shape/meta, and the byte counts."""

    scheme: str
    options: dict
    modules: dict[str, QuantizedModuleInfo] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    float_bytes: int = 0
    packed_bytes: int = 0

    def modules_config(self) -> dict:
        return {name: {"format": m.format, "shape": list(m.shape), "meta": dict(m.meta)}
                for name, m in self.modules.items()}


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch(name, p) or name.endswith("." + p) for p in patterns)


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Unique ``nn.Linear`` modules by their first registered name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def swap_module(model: nn.Module, old: nn.Module, new: nn.Module) -> int:
    """Replace ``old`` by ``new`` under every name it is registered; returns how many names."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, name, new)
                count += 1
    return count


def capture_activations(model: nn.Module, run: Callable[[nn.Module], object],
                        names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Inputs ``[tokens, in]`` each named module receives while ``run(model)`` executes (hooks removed after)."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name in names:
        if name not in modules:
            raise InvalidParameterError("calibration", f"model has no module named {name!r}")
        handles.append(modules[name].register_forward_pre_hook(
            lambda mod, args, n=name: seen.setdefault(n, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(xs) for n, xs in seen.items()}


def _activations(calibration: Calibration | None, scheme: str, name: str) -> torch.Tensor:
    if calibration is None:
        raise InvalidParameterError("calibration", f"scheme {scheme!r} needs calibration activations "
                                                   f"(module {name!r}); pass calibration=")
    x = calibration(name) if callable(calibration) else calibration.get(name)
    if x is None:
        raise InvalidParameterError("calibration", f"no calibration activations for module {name!r}")
    return x


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str, *, skip: tuple[str, ...] = DEFAULT_SKIP,
                   calibration: Calibration | None = None, **options) -> QuantizeReport:
    """Swap the model's linears for QuantizedLinear in ``scheme`` (see module docstring)."""
    try:
        fmt = get_format(scheme, **options)
    except TypeError as exc:  # an option the format's constructor does not take
        raise InvalidParameterError("options", f"scheme {scheme!r} rejects options {options}: {exc}") from exc
    report = QuantizeReport(scheme, dict(options))
    targets = {}
    for name, lin in linear_modules(model).items():
        if matches(name, skip):
            report.skipped.append(name)
            continue
        fmt.check_shape(f"{name}.weight", tuple(lin.weight.shape))
        targets[name] = lin
    tokens = None
    for name, lin in targets.items():
        if getattr(fmt, "needs_calibration", False):
            x = _activations(calibration, scheme, name)
            if tokens is None:  # at the first linear, before any swap
                tokens = calibration_tokens(calibration, targets, x)
                check_calibration_tokens(scheme, fmt, {n: int(m.weight.shape[1]) for n, m in targets.items()},
                                         tokens, field="calibration")
            packed = fmt.quantize(lin.weight, f"{name}.weight", activations=x)
        else:
            packed = fmt.quantize(lin.weight, f"{name}.weight")
        bias = None if lin.bias is None else lin.bias.detach()
        swap_module(model, lin, QuantizedLinear(fmt, packed, bias))
        report.modules[name] = QuantizedModuleInfo(packed.format, packed.shape, dict(packed.meta), packed.nbytes)
        report.float_bytes += lin.weight.numel() * lin.weight.element_size()
        report.packed_bytes += packed.nbytes
    return report


def model_nbytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameter and buffer storages (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
