"""``tierserve moefy`` and ``tierserve prune``: argparse wiring for the offline MoE tools.

* ``moefy --model IN --out OUT --experts E --top-k K [--calib-windows N --seq-len L --seed S --router fit|zero]``
  (``IN`` defaults to the embedded SmolLM2-135M-Instruct; see ``tierserve.tools.moefy``);
* ``prune --method reap|frequency|random --ratio R --model IN --out OUT [--calib-windows N --seq-len L --seed S]``
  (see ``tierserve.tools.reap``).
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
