"""``tierserve prune-weights``: sparsify every linear of a model's decoder layers, write a servable copy.

Methods (the mask rules are in tierserve/tools/sparsity.py):

* ``magnitude``: keep the largest ``|W|`` per row (or per group of 4 for 2:4);
* ``wanda``: keep the largest ``|W_ij| ||X_j||``, X the layer's inputs over the
  calibration windows;
* ``elsa`` / ``elsa-l``: ADMM on the language-model loss (tierserve/tools/elsa.py),
  ELSA-L with its optimiser and ADMM state in bf16; with ``elsa={"init": "wanda"}`` it
  starts from the Wanda solution instead of the dense weights.

Calibration text: ``calib_windows`` windows of ``seq_len`` tokens from the
Austen calibration novels (tools/calibration.py ``CALIBRATION_NOVELS``; the
held-out novels are never read here), each opening with the tokens the
tokenizer puts before a text (Gemma's ``<bos>``, none for SmolLM2): Gemma3
calibrated on windows without its ``<bos>`` is pruned for inputs it never serves.
The pruned matrices are those of every ``nn.Linear`` inside the decoder layers
(attention q/k/v/o, MLP gate/up/down, experts included); embeddings, norms
(Gemma3's q/k norms and four per-layer norms too) and the output head are kept.

Output: ``out`` is the input folder's copy (tokenizer and generation files,
the same config) with the pruned weights in one ``model.safetensors``, plus
``pruning.json``: the method, pattern and sparsity asked, the sparsity
measured over the pruned matrices, the calibration loss of the dense and the
pruned model, and for ELSA its per-iteration record. Written atomically
(tools/model_folder.py).

Bad input: an unknown method or pattern, a sparsity outside (0, 1) (2:4:
exactly 0.5), fewer calibration windows than the method needs (ELSA: its
``batch_size``; magnitude none, Wanda one: tools/calibration_limits.py says
why): each an ``InvalidParameterError`` naming the field and the limit, raised
before the model is loaded.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable

import torch

from tierserve.errors import InvalidParameterError
from tierserve.tools.calibration import CALIBRATION_NOVELS, austen_token_windows
from tierserve.tools.calibration_limits import check_elsa_windows
from tierserve.tools.elsa import ElsaConfig, elsa_prune, lm_loss
from tierserve.tools.model_folder import write_model_folder
from tierserve.tools.sparsity import check_sparsity, magnitude_scores, mask_from_scores, wanda_scores

METHODS = ("magnitude", "wanda", "elsa", "elsa-l")
RECORD = "pruning.json"


def load_training_model(folder: str):
    """The folder's transformers model in fp32 (differentiable; CPU)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def decoder_linears(model) -> dict[str, torch.nn.Parameter]:
    """``{checkpoint name: weight}`` of every nn.Linear inside the decoder layers."""
    layers = model.model.layers
    return {f"model.layers.{name}.weight": mod.weight for name, mod in layers.named_modules()
            if isinstance(mod, torch.nn.Linear)}


@torch.no_grad()
def input_norms(model, names: list[str], windows: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Per linear, the L2 norm of each input channel over every token of ``windows``."""
    sums: dict[str, torch.Tensor] = {}
    handles = []
    modules = dict(model.named_modules())
    for name in names:
        mod = modules[name[: -len(".weight")]]

        def hook(_m, args, key=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[key] = sums.get(key, 0) + x.square().sum(0)
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        for s in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[s:s + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {k: v.sqrt() for k, v in sums.items()}


@torch.no_grad()
def calibration_loss(model, windows: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    for s in range(0, windows.shape[0], batch_size):
        batch = windows[s:s + batch_size]
        total += float(lm_loss(model, batch)) * batch.shape[0]
    return total / windows.shape[0]


def prune_weights(in_folder: str, out_folder: str, method: str, sparsity: float, pattern: str = "unstructured",
                  calib_windows: int = 16, seq_len: int = 128, elsa: dict | None = None,
                  progress: Callable[[int, dict], None] | None = None) -> dict:
    """Prune ``in_folder`` into ``out_folder``; returns the record written as ``pruning.json``."""
    if method not in METHODS:
        raise InvalidParameterError("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    check_sparsity(pattern, sparsity)
    for field, value in (("calib_windows", calib_windows), ("seq_len", seq_len)):
        if value < 1:
            raise InvalidParameterError(field, f"must be >= 1, got {value}")
    cfg = None
    if method.startswith("elsa"):
        cfg = ElsaConfig(sparsity=sparsity, pattern=pattern, low_precision=method == "elsa-l", **(elsa or {}))
        check_elsa_windows(calib_windows, cfg.batch_size)
    from transformers import AutoTokenizer

    windows = austen_token_windows(AutoTokenizer.from_pretrained(in_folder), CALIBRATION_NOVELS, calib_windows,
                                   seq_len, bos=True)
    model = load_training_model(in_folder)
    vocab = model.get_input_embeddings().num_embeddings
    if int(windows.max()) >= vocab:
        raise InvalidParameterError("model", f"its tokenizer gives id {int(windows.max())} but the model holds "
                                             f"{vocab} embeddings")
    targets = decoder_linears(model)
    batch = cfg.batch_size if cfg else 4
    dense_loss = calibration_loss(model, windows, batch)
    history = None
    wanda = method == "wanda" or (cfg is not None and cfg.init == "wanda")
    norms = input_norms(model, list(targets), windows, batch) if wanda else {}
    with torch.no_grad():
        sparse = {name: w * mask_from_scores(wanda_scores(w, norms[name]) if wanda else magnitude_scores(w),
                                             pattern, sparsity) for name, w in targets.items()}
    if cfg is not None:
        history = elsa_prune(model, targets, windows, cfg, progress, sparse if wanda else None)
    else:
        with torch.no_grad():
            for name, w in targets.items():
                w.copy_(sparse[name])
    zeros = sum(int((w == 0).sum()) for w in targets.values())
    record = {"method": method, "pattern": pattern, "sparsity": sparsity,
              "measured_sparsity": zeros / sum(w.numel() for w in targets.values()),
              "pruned_matrices": len(targets), "calib_windows": calib_windows, "seq_len": seq_len,
              "calibration_loss_dense": dense_loss,
              "calibration_loss_pruned": calibration_loss(model, windows, batch)}
    if cfg is not None:
        record["elsa"] = {k: getattr(cfg, k) for k in ("iterations", "steps_per_iteration", "lr", "rho",
                                                      "rho_growth", "rho_max", "batch_size", "low_precision",
                                                      "init")}
        record["history"] = history
    _write(in_folder, out_folder, {name: w.detach() for name, w in targets.items()}, record)
    return record


def _write(in_folder: str, out_folder: str, pruned: dict[str, torch.Tensor], record: dict) -> None:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(in_folder, "*.safetensors")))
    if not files:
        raise InvalidParameterError("model", f"{in_folder} holds no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    missing = sorted(set(pruned) - set(tensors))
    if missing:
        raise InvalidParameterError("model", f"the checkpoint lacks the pruned weights {missing[:3]} "
                                             f"(not a transformers-named folder?)")
    for name, w in pruned.items():
        tensors[name] = w.to(tensors[name].dtype).contiguous()
    with open(os.path.join(in_folder, "config.json")) as f:
        config = json.load(f)
    skip = {"config.json", "model.safetensors.index.json", RECORD}
    write_model_folder(out_folder, tensors, config, RECORD, record, in_folder,
                       lambda name: name not in skip and not name.endswith(".safetensors"))
