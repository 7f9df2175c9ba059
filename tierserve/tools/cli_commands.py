"""``tierserve moefy``, ``prune`` and ``prune-weights``: argparse wiring for the offline model tools.

* ``moefy --model IN --out OUT --experts E --top-k K [--calib-windows N --seq-len L --seed S --router fit|zero]``
  (``IN`` defaults to the embedded SmolLM2-135M-Instruct; see ``tierserve.tools.moefy``);
* ``prune --method reap|frequency|random --ratio R --model IN --out OUT [--calib-windows N --seq-len L --seed S]``
  (see ``tierserve.tools.reap``);
* ``prune-weights --method magnitude|wanda|elsa|elsa-l --sparsity S [--pattern unstructured|2:4] --model IN
  --out OUT [--calib-windows N --seq-len L --iterations I --steps S --lr LR --rho R]`` (``IN`` defaults to the
  embedded SmolLM2; see ``tierserve.tools.prune_weights``).
Each prints a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json


def add_moe_parsers(sub) -> None:
    moe = sub.add_parser("moefy", help="split a dense model's FFNs into experts (Mixtral format)")
    moe.add_argument("--model", default=None, help="dense safetensors folder (default: embedded SmolLM2)")
    moe.add_argument("--out", required=True, help="output folder")
    moe.add_argument("--experts", type=int, default=8)
    moe.add_argument("--top-k", type=int, default=4)
    moe.add_argument("--calib-windows", type=int, default=16)
    moe.add_argument("--seq-len", type=int, default=256)
    moe.add_argument("--seed", type=int, default=0)
    moe.add_argument("--router", default="fit", choices=["fit", "zero"])
    moe.set_defaults(func=_moefy)
    pr = sub.add_parser("prune", help="remove experts of a Mixtral-format MoE (REAP / frequency / random)")
    pr.add_argument("--method", required=True, choices=["reap", "frequency", "random"])
    pr.add_argument("--ratio", type=float, required=True, help="fraction of experts removed per layer")
    pr.add_argument("--model", required=True, help="Mixtral-format safetensors folder")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--calib-windows", type=int, default=8)
    pr.add_argument("--seq-len", type=int, default=256)
    pr.add_argument("--seed", type=int, default=0)
    pr.set_defaults(func=_prune)
    pw = sub.add_parser("prune-weights", help="sparsify the decoder's linears (magnitude / Wanda / ELSA ADMM)")
    pw.add_argument("--method", required=True, choices=["magnitude", "wanda", "elsa", "elsa-l"])
    pw.add_argument("--sparsity", type=float, required=True, help="fraction of each row pruned, in (0, 1)")
    pw.add_argument("--pattern", default="unstructured", choices=["unstructured", "2:4"])
    pw.add_argument("--model", default=None, help="safetensors folder (default: embedded SmolLM2)")
    pw.add_argument("--out", required=True, help="output folder")
    pw.add_argument("--calib-windows", type=int, default=16)
    pw.add_argument("--seq-len", type=int, default=128)
    pw.add_argument("--iterations", type=int, default=None, help="ELSA: ADMM iterations (default 12)")
    pw.add_argument("--steps", type=int, default=None, help="ELSA: optimiser steps per iteration (default 4)")
    pw.add_argument("--lr", type=float, default=None, help="ELSA: Adam learning rate (default 2e-4)")
    pw.add_argument("--rho", type=float, default=None, help="ELSA: initial ADMM penalty (default 0.05)")
    pw.add_argument("--init", default=None, choices=["magnitude", "wanda"],
                    help="ELSA: the starting solution (default magnitude; wanda: the Wanda-pruned weights, "
                         "the lower held-out perplexity on SmolLM2 at 8 steps, benchmarks/pruning.py)")
    pw.set_defaults(func=_prune_weights)


def _moefy(args: argparse.Namespace) -> int:
    from tierserve.models.default_model import ensure_default_model
    from tierserve.tools.moefy import MoefyConfig, moefy

    cfg = MoefyConfig(num_experts=args.experts, top_k=args.top_k, calib_windows=args.calib_windows,
                      seq_len=args.seq_len, seed=args.seed, router=args.router)
    stats = moefy(args.model or ensure_default_model(), args.out, cfg)
    layers = stats["layers"]
    print(json.dumps({"out": args.out, "experts": cfg.num_experts, "top_k": cfg.top_k,
                      "mean_top1_accuracy": sum(s["top1_accuracy"] for s in layers) / len(layers),
                      "mean_rel_error": sum(s["rel_error"] for s in layers) / len(layers)}))
    return 0


def _prune(args: argparse.Namespace) -> int:
    from tierserve.tools.reap import prune

    record = prune(args.model, args.out, args.method, args.ratio, args.calib_windows, args.seq_len, args.seed)
    print(json.dumps({"out": args.out, "method": args.method, "ratio": args.ratio,
                      "pruned_per_layer": len(record["pruned"][0]) if "pruned" in record else None}))
    return 0


def _prune_weights(args: argparse.Namespace) -> int:
    import sys

    from tierserve.models.default_model import ensure_default_model
    from tierserve.tools.prune_weights import prune_weights

    elsa = {k: v for k, v in (("iterations", args.iterations), ("steps_per_iteration", args.steps),
                              ("lr", args.lr), ("rho", args.rho), ("init", args.init)) if v is not None}

    def progress(it: int, rec: dict) -> None:
        print(f"iteration {it + 1}: loss {rec['loss']:.4f} rho {rec['rho']:.3g} gap {rec['relative_gap']:.4f}",
              file=sys.stderr, flush=True)

    record = prune_weights(args.model or ensure_default_model(), args.out, args.method, args.sparsity,
                           args.pattern, args.calib_windows, args.seq_len, elsa, progress)
    print(json.dumps({"out": args.out, **{k: record[k] for k in ("method", "pattern", "sparsity",
                                                                 "measured_sparsity", "calibration_loss_dense",
                                                                 "calibration_loss_pruned")}}))
    return 0
