"""Sparse Mixture-of-Experts block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

Routing, for tokens ``x [T, hidden]`` with ``E`` experts and ``k = top_k``:

    logits = router(x)                       # [T, E], Linear without bias ("gate")
    p      = softmax(float32(logits))        # over all experts
    w, ids = topk(p, k)                      # [T, k], k-slots in descending weight
    if renormalize: w = w / sum(w)           # Mixtral always; Qwen-MoE/OLMoE iff norm_topk_prob
    y_t    = sum_{j=0..k-1} w[t, j] * expert_{ids[t, j]}(x_t)
    (+ sigmoid(shared_expert_gate(x_t)) * shared_expert(x_t) for Qwen2-MoE)

Dispatch: the ``T*k`` (token, slot) pairs are grouped by expert with a stable
argsort; each expert runs once on only its routed tokens (``index_select``),
its output is scaled by the gate weight and written to row ``t*k + j`` of a
``[T, k, hidden]`` buffer. The combine then sums the buffer over the slot
dimension in slot order, ``((b[:,0] + b[:,1]) + b[:,2]) + ...``, explicitly, so
the result depends only on each expert's output, never on which device or host
computed it or in what order experts ran: an expert-offload transform whose
remote experts return bit-identical outputs gives bit-identical block output.
One host sync per MoE layer (``bincount(...).tolist()``) sizes the per-expert
batches; experts with no routed token are skipped.

``experts`` is an ``nn.ModuleList`` of per-expert ``GatedMLP`` modules. A later
transform may replace ``experts[i]`` with any module mapping ``[n, hidden] ->
[n, hidden]`` (for example a proxy to a cold expert held by an expert host);
``route`` is public so such a transform can plan dispatch before running experts.
"""

from __future__ import annotations

import torch
from torch import nn

from tierserve.models.layers import GatedMLP, Slot, linear


def expert_rows(ids: torch.Tensor, num_experts: int) -> list[tuple[int, torch.Tensor]]:
    """(expert id, its rows ``t*k + j`` ascending) for every expert with routed tokens, in expert order."""
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    groups, start = [], 0
    for expert_id, n in enumerate(counts):
        if n:
            groups.append((expert_id, order[start:start + n]))
            start += n
    return groups


def sum_slots(buf: torch.Tensor, t: int, k: int) -> torch.Tensor:
    """Sum a ``[t*k, hidden]`` buffer of gated expert outputs over the k slots, in slot order."""
    buf = buf.view(t, k, -1)
    out = buf[:, 0]
    for j in range(1, k):
        out = out + buf[:, j]
    return out


class SparseMoeBlock(nn.Module):
    graph_capturable = False  # expert_rows sizes each expert's batch on the host (one sync per layer)

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, renormalize: bool,
                 act: str, dtype: torch.dtype, expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                 shared_intermediate: int = 0):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = linear(hidden, num_experts, False, dtype)
        self.experts = nn.ModuleList(
            GatedMLP(hidden, intermediate, act, dtype, hf_names=expert_names) for _ in range(num_experts))
        self.shared_expert = GatedMLP(hidden, shared_intermediate, act, dtype) if shared_intermediate else None
        self.shared_expert_gate = linear(hidden, 1, False, dtype) if shared_intermediate else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] in x's dtype, expert ids [T, k] long)."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        out = self.combine(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def combine(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Run each expert on its routed tokens and sum the k slots in slot order (see module doc)."""
        t, k = ids.shape
        flat_w = weights.reshape(-1, 1)
        buf = x.new_empty(t * k, x.shape[-1])
        for expert_id, rows in expert_rows(ids, self.num_experts):
            y = self.experts[expert_id](x.index_select(0, rows // k))
            buf.index_copy_(0, rows, y * flat_w.index_select(0, rows))
        return sum_slots(buf, t, k)

    def hf_slots(self, prefix: str, gate_name: str = "gate") -> dict[str, Slot]:
        slots = {f"{prefix}{gate_name}.weight": Slot(self.gate.weight)}
        for i, expert in enumerate(self.experts):
            slots.update(expert.hf_slots(f"{prefix}experts.{i}."))
        if self.shared_expert is not None:
            slots.update(self.shared_expert.hf_slots(prefix + "shared_expert."))
            slots["{}shared_expert_gate.weight".format(prefix)] = Slot(self.shared_expert_gate.weight)
        return slots
