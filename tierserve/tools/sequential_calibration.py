"""Sequential calibration for Qronos: each linear's inputs from the float model AND from the partially quantized one.

Qronos (``kernels/quant/qronos.py``) rounds a linear against two input sets on
the same calibration tokens, row for row: ``X``, what the float model feeds the
linear, and ``X~``, what it is fed once every EARLIER linear is quantized (so
the rounding also corrects the error those layers pass on). GPTQ's calibration
(``calibration.calibration_activations``) captures only ``X``, in one float
pass, before anything is quantized; ``X~`` can only be seen while the model is
being quantized. ``SequentialCalibration`` is the ``calibration=`` callable of
``transform.quantize_model`` (name -> ``PairedInputs``) that provides both:

* construction (``from_text``): ``X`` of every named linear, captured in one
  pass of the still-float model over ``num_windows`` x ``seq_len`` tokens of
  ``novels`` (``CALIBRATION_NOVELS`` by default), ``batch_size`` windows per
  forward: the same capture, token windows and checks as GPTQ's calibration;
* ``quantize_model`` quantizes the linears one at a time in module order, which
  is the forward order of the decoder models (layer 0's ``qkv_proj``,
  ``o_proj``, ``gate_up_proj``, ``down_proj``, then layer 1, ...), and swaps each
  one in place before asking for the next one's inputs. Each call re-runs the
  same windows through the model as it is at that moment (every earlier linear
  already a QuantizedLinear) with a forward pre-hook on the asked module that
  records its input ``X~`` and stops the forward there (nothing after it can
  change that input). Its ``X`` is handed over and dropped (peak memory: all
  ``X`` of the float pass, as GPTQ).
* Resuming: for a module of decoder layer i (name ``layers.<i>.…`` in a model
  whose ``layers`` is a ModuleList of layers that take the hidden state first
  and return it, as every decoder model here), the hidden states entering
  layer i are cached per batch once all earlier layers are quantized (they no
  longer change), and the cut forwards replay them: layers < i return the
  cached state instead of computing (an instance ``forward`` that is removed
  afterwards), so the whole calibration costs about three full forwards
  instead of one per linear. Other modules get whole cut forwards.
* Calls must follow ``names`` in order (each name at most once): a call out of
  order would pair ``X~`` with a model whose earlier layers are not all
  quantized, so it raises InvalidParameterError naming the expected module.

The first linear sees nothing quantized, so its ``X~`` equals its ``X`` exactly
(and Qronos gives GPTQ's codes there); tests/test_qronos_calibration.py checks
that, that later linears' ``X~`` are the inputs of the partially quantized model
(captured independently), and the ``tierserve quantize --option qronos=true`` path.
"""

from __future__ import annotations

import torch

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.qronos import PairedInputs
from tierserve.tools.calibration import (CALIBRATION_NOVELS, austen_token_windows, calibration_activations,
                                         forward_hidden)


class _StopForward(Exception):
    """Raised by the capture hook once the asked module's input is recorded."""


class SequentialCalibration:
    """``calibration=`` for quantize_model with a ``paired_calibration`` format (module docstring)."""

    def __init__(self, model: torch.nn.Module, windows: torch.Tensor, float_inputs: dict[str, torch.Tensor],
                 names: list[str], batch_size: int):
        missing = [n for n in names if n not in float_inputs]
        if missing:
            raise InvalidParameterError("calibration", f"no float inputs captured for {missing[:3]}")
        self.model = model
        self.windows = windows
        self.batch_size = batch_size
        self._float = dict(float_inputs)
        self._order = list(names)
        self._next = 0
        self._resume: tuple[int, list[torch.Tensor]] | None = None  # (decoder layer i, its inputs per batch)

    @classmethod
    def from_text(cls, model: torch.nn.Module, tokenizer, names: list[str], num_windows: int, seq_len: int,
                  batch_size: int = 4, novels: tuple[str, ...] = CALIBRATION_NOVELS) -> "SequentialCalibration":
        """Capture ``X`` of ``names`` from the (still float) ``model`` over Austen windows; see the module doc."""
        float_inputs = calibration_activations(model, tokenizer, names, num_windows, seq_len, batch_size, novels)
        windows = austen_token_windows(tokenizer, novels, num_windows, seq_len)
        return cls(model, windows, float_inputs, names, batch_size)

    def __call__(self, name: str) -> PairedInputs:
        if self._next >= len(self._order) or name != self._order[self._next]:
            expected = self._order[self._next] if self._next < len(self._order) else "none (all done)"
            raise InvalidParameterError("calibration", f"sequential calibration asked for {name!r} but the next "
                                                       f"module in forward order is {expected!r}")
        self._next += 1
        return PairedInputs(self._float.pop(name), self.quantized_inputs(name))

    @torch.inference_mode()
    def quantized_inputs(self, name: str) -> torch.Tensor:
        """``[num_windows * seq_len, in]``: the input of ``name`` in the model as it is now (see the module doc)."""
        module = dict(self.model.named_modules())[name]
        layer = self._layer_of(name)
        replay = 0
        if layer is not None:
            if self._resume is None or self._resume[0] != layer:
                start, hidden = self._resume if self._resume is not None and self._resume[0] < layer else (0, None)
                self._resume = (layer, self._cut_forward(self.model.layers[layer], start, hidden))
            replay = layer
        return torch.cat(self._cut_forward(module, replay, self._resume[1] if replay else None))

    def _layer_of(self, name: str) -> int | None:
        layers = getattr(self.model, "layers", None)
        parts = name.split(".")
        if isinstance(layers, torch.nn.ModuleList) and len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit():
            return int(parts[1])
        return None

    def _cut_forward(self, module: torch.nn.Module, replay: int,
                     hidden: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Per batch of windows, the input of ``module``; decoder layers ``< replay`` return ``hidden[batch]``."""
        seen: list[torch.Tensor] = []

        def hook(_mod, args):
            seen.append(args[0].detach().clone())
            raise _StopForward

        handle = module.register_forward_pre_hook(hook)
        replaced = list(self.model.layers[:replay]) if replay else []
        try:
            for b, start in enumerate(range(0, self.windows.shape[0], self.batch_size)):
                for layer in replaced:  # an instance attribute shadows the class's forward until deleted
                    layer.forward = lambda h, *args, _b=b, **kwargs: hidden[_b]
                try:
                    forward_hidden(self.model, self.windows[start:start + self.batch_size])
                except _StopForward:
                    pass
        finally:
            handle.remove()
            for layer in replaced:
                layer.__dict__.pop("forward", None)
        return [x.reshape(-1, x.shape[-1]) for x in seen]
