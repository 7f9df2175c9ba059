"""Offline expert pruning: REAP (CerebrasResearch/reap), frequency and random baselines.

REAP saliency of expert j in a layer, over calibration tokens x routed to j:

    S_j = mean_{x : j in topk(x)} g_j(x) * ||f_j(x)||_2

``g_j`` is the router softmax weight renormalised over the top-k (what
``SparseMoeBlock.route`` returns for a renormalising block), ``f_j(x)`` the
expert's output before gating. An expert never routed to has S_j = 0.
Accumulated online per (layer, expert) with the parallel form of Welford's mean
update (Chan et al.): a batch of n_b values with mean m_b updates (n, m) to
(n + n_b, m + (m_b - m) * n_b / (n + n_b)), in float64.

Methods, per layer, remove ``floor(E * ratio)`` experts:

* ``reap``: the lowest S_j;
* ``frequency``: the fewest routed (token, slot) assignments;
* ``random``: a uniform sample (``random.Random(seed + layer)``).

Ties go to the lower expert id. The router rows of removed experts are deleted
and the remaining experts renumbered in ascending original order; top-k is
unchanged (an error names ``num_experts_per_tok`` if it exceeds the experts
left). The result is written in the input's Mixtral layout, with
``num_local_experts`` reduced and ``reap.json`` recording the removed ids.

Calibration (``collect_saliency``) wraps each block's ``route`` on the
instance (a transform, like the usage recorder): after routing it runs each
routed expert on its tokens once more to take the output norms, so the model's
own outputs are unchanged.
"""

from __future__ import annotations

import json
import math
import os
import random
import re

import torch

from tierserve.errors import InvalidParameterError
from tierserve.offload.usage_hook import moe_blocks
from tierserve.tools.model_folder import write_model_folder

METHODS = ("reap", "frequency", "random")
#: files of the source folder a pruned folder does not inherit (its own records replace them)
_NOT_COPIED = ("config.json", "model.safetensors.index.json", "expert_usage.json", "reap.json", "moefy.json")
_EXPERT_RE = re.compile(r"^(model\.layers\.(\d+)\.block_sparse_moe\.)experts\.(\d+)\.(.*)$")
_GATE_RE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")


class ReapAccumulator:
    """Running (count, mean of g * ||f||) per (layer, expert), float64."""

    def __init__(self, num_layers: int, num_experts: int):
        self.count = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.mean = torch.zeros(num_layers, num_experts, dtype=torch.float64)

    def update(self, layer: int, expert: int, values: torch.Tensor) -> None:
        n_b = values.numel()
        if n_b == 0:
            return
        m_b = values.double().mean()
        n = self.count[layer, expert] + n_b
        self.mean[layer, expert] += (m_b - self.mean[layer, expert]) * (n_b / n)
        self.count[layer, expert] = n

    def observe(self, layer: int, block, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> None:
        """Add one routed batch of ``block``: ``weights``/``ids`` ``[T, k]`` as returned by ``route(x)``."""
        flat_ids = ids.reshape(-1)
        flat_w = weights.reshape(-1).double()
        k = ids.shape[1]
        for expert in torch.unique(flat_ids).tolist():
            rows = torch.nonzero(flat_ids == expert).flatten()
            out = block.experts[expert](x.index_select(0, rows // k))
            self.update(layer, expert, flat_w[rows] * out.double().norm(dim=-1))

    def saliency(self) -> list[list[float]]:
        return self.mean.tolist()

    def frequency(self) -> list[list[int]]:
        return [[int(c) for c in row] for row in self.count.tolist()]


@torch.inference_mode()
def collect_saliency(model, windows: torch.Tensor, batch_size: int = 8) -> ReapAccumulator:
    """Run ``windows [B, L]`` through ``model`` and accumulate REAP statistics of every MoE block."""
    from tierserve.tools.calibration import forward_hidden

    blocks = moe_blocks(model)
    if not blocks:
        raise InvalidParameterError("model", "has no SparseMoeBlock to prune")
    acc = ReapAccumulator(len(blocks), blocks[0].num_experts)
    for layer, block in enumerate(blocks):
        original = block.route

        def route(x, _original=original, _layer=layer, _block=block):
            weights, ids = _original(x)
            acc.observe(_layer, _block, x, weights, ids)
            return weights, ids

        block.route = route
    try:
        for start in range(0, windows.shape[0], batch_size):
            forward_hidden(model, windows[start:start + batch_size])
    finally:
        for block in blocks:
            block.__dict__.pop("route", None)
    return acc


def select_pruned(method: str, ratio: float, saliency: list[list[float]], frequency: list[list[int]],
                  seed: int = 0) -> list[list[int]]:
    """Per layer, the sorted expert ids to remove (see module docstring)."""
    if method not in METHODS:
        raise InvalidParameterError("method", f"must be one of {METHODS}, got {method!r}")
    if not 0.0 <= ratio < 1.0:
        raise InvalidParameterError("ratio", f"must be in [0, 1), got {ratio}")
    out = []
    for layer, (sal, freq) in enumerate(zip(saliency, frequency)):
        num = len(sal)
        n_prune = math.floor(num * ratio)
        if method == "random":
            chosen = random.Random(seed + layer).sample(range(num), n_prune)
        else:
            score = sal if method == "reap" else freq
            chosen = sorted(range(num), key=lambda e: (score[e], e))[:n_prune]
        out.append(sorted(chosen))
    return out


def prune_checkpoint(in_folder: str, out_folder: str, pruned: list[list[int]], record: dict | None = None) -> str:
    """Copy a Mixtral-format folder without the ``pruned[layer]`` experts and their router rows."""
    from safetensors import safe_open

    from tierserve.models.loader import safetensors_files

    with open(os.path.join(in_folder, "config.json")) as f:
        config = json.load(f)
    num = int(config["num_local_experts"])
    counts = {num - len(p) for p in pruned}
    if len(counts) != 1:
        raise InvalidParameterError("pruned", f"every layer must keep the same number of experts, got {counts}")
    keep_n = counts.pop()
    if int(config["num_experts_per_tok"]) > keep_n:
        raise InvalidParameterError("num_experts_per_tok", f"is {config['num_experts_per_tok']} but only {keep_n} "
                                                           f"experts remain per layer after pruning")
    keep = [[e for e in range(num) if e not in set(p)] for p in pruned]
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(in_folder):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                m, g = _EXPERT_RE.match(name), _GATE_RE.match(name)
                if m:
                    layer, expert = int(m.group(2)), int(m.group(3))
                    if expert in keep[layer]:
                        tensors[f"{m.group(1)}experts.{keep[layer].index(expert)}.{m.group(4)}"] = f.get_tensor(name)
                elif g:
                    tensors[name] = f.get_tensor(name)[keep[int(g.group(1))]].contiguous()
                else:
                    tensors[name] = f.get_tensor(name)
    config["num_local_experts"] = keep_n
    write_model_folder(out_folder, tensors, config, "reap.json", {**(record or {}), "pruned": pruned}, in_folder,
                       lambda name: not name.endswith(".safetensors") and name not in _NOT_COPIED)
    return out_folder


def prune(in_folder: str, out_folder: str, method: str, ratio: float, calib_windows: int = 8, seq_len: int = 256,
          seed: int = 0, acc: ReapAccumulator | None = None) -> dict:
    """Calibrate on Austen text (unless ``acc`` is given), choose experts by ``method`` and write the pruned model."""
    from transformers import AutoTokenizer

    from tierserve.models.loader import load_model
    from tierserve.tools.calibration import CALIBRATION_NOVELS, austen_token_windows

    if acc is None and method != "random":
        model = load_model(in_folder).model
        windows = austen_token_windows(AutoTokenizer.from_pretrained(in_folder), CALIBRATION_NOVELS,
                                       calib_windows, seq_len)
        acc = collect_saliency(model, windows)
    with open(os.path.join(in_folder, "config.json")) as f:
        cfg = json.load(f)
    shape = (int(cfg["num_hidden_layers"]), int(cfg["num_local_experts"]))
    sal = acc.saliency() if acc is not None else [[0.0] * shape[1] for _ in range(shape[0])]
    freq = acc.frequency() if acc is not None else [[0] * shape[1] for _ in range(shape[0])]
    pruned = select_pruned(method, ratio, sal, freq, seed)
    record = {"method": method, "ratio": ratio, "seed": seed, "saliency": sal, "frequency": freq, "pruned": pruned}
    prune_checkpoint(in_folder, out_folder, pruned, record)
    return record
