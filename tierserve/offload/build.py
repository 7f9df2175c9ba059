"""offload_from_config: the one place an ``OffloadHook`` is built from ``OffloadConfig``.

``offload_from_config(model, offload_config, weights_path, linear_backend, launcher=None)``,
called by the engine on a freshly loaded model BEFORE the linear-backend transform:

1. the model must have MoE layers (else InvalidParameterError ``resident_experts``);
   ``weights_path`` that is not a folder (a .gguf file) gives no checkpoint to re-read a
   dead host's experts from (``ExpertHostError`` then);
2. usage file: ``OffloadConfig.usage_path`` when set (a missing file means "start from
   zero counts and save here"), else ``expert_usage.json`` beside the model folder when
   it exists (saved back there); with neither, counts are uniform (ties broken by
   expert id) and nothing is saved;
3. placement: ``plan_placement(counts, resident_experts, per_layer_floor)``;
   ``host_weight_format="dfloat11"`` needs bf16 experts (InvalidParameterError);
4. hosts: ``launcher.launch(expert_hosts, HostSpec(linear_backend, host_weight_format,
   host_threads, channel, timeout_s))``; ``launcher`` None means a
   ``ProcessHostLauncher`` (plain local processes, no Ray); the server and CLI pass
   ``RayHostLauncher`` (tierserve/actors/ray_launcher.py) when running on Ray. If the
   rest of the build fails, the launcher is shut down;
5. ``apply_expert_offload`` ships the experts and swaps the blocks; with
   ``spare_slots`` the spare ring's ``CostModel`` is measured against a live host
   (``CostModel.measure``: a fetch, 1- and 64-row round trips, local runs) and
   installed on every block (its local runs on ``device``: a GPU worker's rows cost
   a fraction of a host's, so the crossover to fetching falls inside a normal prefill);
6. the hook gets the launcher (``close()`` shuts the hosts down), the usage file, the
   promotion thresholds (``promotion_min_gain``, ``promotion_max_swaps``) and
   ``usage_save_interval_s``, and the prefetch policy (``prefetch``, tierserve/offload/prefetch.py).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from tierserve.config import OffloadConfig
from tierserve.errors import InvalidParameterError
from tierserve.offload.apply import apply_expert_offload, load_counts, moe_blocks
from tierserve.offload.hook import OffloadHook
from tierserve.offload.launcher import HostLauncher, HostSpec, ProcessHostLauncher
from tierserve.offload.placement import plan_placement
from tierserve.offload.spare_slots import CostModel
from tierserve.offload.usage import usage_path


def offload_from_config(model: nn.Module, offload_config: OffloadConfig, weights_path: str | None,
                        linear_backend: str, launcher: HostLauncher | None = None,
                        device: torch.device | str = "cpu") -> OffloadHook:
    """Apply ``offload_config`` to a freshly loaded model and return its live hook (module doc); the model is
    on the CPU here, ``device`` is where the engine runs it afterwards (a CUDA worker)."""
    cfg = offload_config
    blocks = moe_blocks(model)
    if not blocks:
        raise InvalidParameterError("resident_experts", "the model has no MoE layers to offload")
    model_path = weights_path if weights_path is not None and os.path.isdir(weights_path) else None
    file = cfg.usage_path or (usage_path(model_path) if model_path is not None else None)
    counts = load_counts(file, [b.num_experts for _, b in blocks])
    if cfg.usage_path is None and not (file and os.path.isfile(file)):
        file = None  # no usage file beside the model: do not create one
    placement = plan_placement(counts, cfg.resident_experts, cfg.per_layer_floor)
    dtype = blocks[0][1].experts[0].gate_up_proj.weight.dtype
    if cfg.host_weight_format == "dfloat11" and dtype != torch.bfloat16:
        raise InvalidParameterError("host_weight_format", f"'dfloat11' is lossless for bfloat16 weights only; the "
                                                          f"model's experts are {dtype} (set dtype='bfloat16')")
    spec = HostSpec(linear_backend, cfg.host_weight_format, cfg.host_threads, cfg.channel, cfg.timeout_s)
    launcher = launcher if launcher is not None else ProcessHostLauncher()
    hosts = launcher.launch(cfg.expert_hosts, spec)
    try:
        hook = apply_expert_offload(model, placement, hosts, model_path=model_path, linear_backend=linear_backend,
                                    counts=counts, timeout_s=cfg.timeout_s, spare_slots=cfg.spare_slots,
                                    device=device)
        if hook.spare is not None and hook.pool.owners:
            cost = CostModel.measure(hook.pool, min(hook.pool.owners))
            for block in hook.blocks:
                block.cost = cost
    except BaseException:
        for transport in hosts.values():
            transport.close()
        launcher.shutdown()
        raise
    hook.launcher = launcher
    hook.usage_file = file
    hook.min_gain, hook.max_swaps = cfg.promotion_min_gain, cfg.promotion_max_swaps
    hook.save_interval_s = cfg.usage_save_interval_s
    hook.prefetch = cfg.prefetch
    return hook
