"""Record expert usage of a built MoE model: a transform, not a model flag.

``attach_usage_recorder(model, usage)`` wraps the ``route`` method of every
routed MoE block (``routed_blocks``: a ``SparseMoeBlock``, or a module routing with
the very same ``SparseMoeBlock.route`` such as the expert-offload transform's
``OffloadedMoeBlock``; numbered in module order, which is layer order) on the instance: the wrapper calls the
``route`` in place before it (the class method or another transform's wrapper), then adds ``bincount(ids, minlength=E)`` to
``usage.counts[layer]``. That is one extra small host copy per MoE layer and
step next to the block's own ``bincount(...).tolist()``; routing results are
returned unchanged, so outputs are bit-identical with and without recording.
``detach()`` on the returned handle restores the original methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierserve.errors import InvalidParameterError
from tierserve.models.moe import SparseMoeBlock
from tierserve.offload.usage import ExpertUsage


@dataclass
class RouteHandle:
    """Blocks whose ``route`` was wrapped on the instance (usage recorder, routing traces); ``detach`` restores."""

    blocks: list[torch.nn.Module]
    previous: list  # each block's own ``route`` instance attribute before attaching (None: the class method)

    def detach(self) -> None:
        for block, prev in zip(self.blocks, self.previous):
            if prev is None:
                block.__dict__.pop("route", None)
            else:
                block.route = prev


def moe_blocks(model: torch.nn.Module) -> list[SparseMoeBlock]:
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def routed_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules routing tokens with ``SparseMoeBlock.route`` (resident or offloaded blocks), in model order."""
    return [m for m in model.modules()
            if isinstance(m, SparseMoeBlock) or getattr(type(m), "route", None) is SparseMoeBlock.route]


def attach_usage_recorder(model: torch.nn.Module, usage: ExpertUsage) -> RouteHandle:
    blocks = routed_blocks(model)
    if len(blocks) != usage.num_layers:
        raise InvalidParameterError("num_layers", f"usage has {usage.num_layers} layers but the model has "
                                                  f"{len(blocks)} MoE blocks")
    previous: list = []
    for layer, block in enumerate(blocks):
        if block.num_experts != usage.num_experts:
            raise InvalidParameterError("num_experts", f"usage has {usage.num_experts} experts but MoE block "
                                                       f"{layer} has {block.num_experts}")
        previous.append(block.__dict__.get("route"))
        original = block.route  # whatever routes now (another transform's wrapper included)

        def route(x, _original=original, _layer=layer, _e=block.num_experts):
            weights, ids = _original(x)
            usage.record_counts(_layer, torch.bincount(ids.reshape(-1), minlength=_e).tolist())
            return weights, ids

        block.route = route  # instance attribute shadows the class method
    return RouteHandle(blocks, previous)
