"""Why Qronos's KL against GPTQ's: rounding variants side by side, with per-layer output errors.

On one model (SmolLM2-135M by default; ``--gemma`` for Gemma-3-270m) and one
format (``--scheme nvfp4 --hadamard`` or ``--scheme q4_0``), each variant
quantizes a fresh copy on ``--calib-windows`` x ``--seq-len`` tokens of
``CALIBRATION_NOVELS`` and is evaluated on ``--windows`` x ``--seq-len``
held-out tokens (``HELDOUT_NOVELS``; perplexity and KL(P_fp32 || P_q) as in
``quality.py``). Variants (``--variants``):

- ``rtn``: round to nearest at the format's scales (no calibration);
- ``gptq``: GPTQ on the float model's inputs X (one float pass; ``quality.py``'s row);
- ``gptq-seq``: GPTQ as in its original sequential mode: the Hessian of the
  inputs X~ of the partially quantized model (``SequentialCalibration``'s X~);
- ``qronos``: Qronos as the formats run it (the inherited error ridge-fitted, ``qronos.qronos_moments``);
- ``qronos-plain``: the paper's plain least-squares fit of the inherited error (``qronos.raw_moments``);
- ``qronos-d<r>``: ``qronos-plain`` with relative damping ``r`` instead of GPTQ's 0.01.

Per-layer error (``--layers``): for every quantized linear, the relative
output error ``||X W^T - X~ Q^T|| / ||X W^T||`` of the quantized model (its
own inputs X~) against the float model (inputs X), on the first calibration
windows and on the held-out windows; printed for a few layers and averaged.

Each row also prints the load average and the memory copy bandwidth (``decode.memcopy_bandwidth``) measured
right after it (the machine may be shared).

Measured with the inherited-error ridge (calibration 16 x 256, held-out 4 x 256, ``OMP_NUM_THREADS=1``,
2 shared cores, load average 1-10, copy 4.8-6.4 GB/s; ppl / KL; fp32 ppl SmolLM2 56.475, Gemma 180.136):

==================  ==============  ==============  ==============  ==============
model, format       round to near.  GPTQ            GPTQ seq        Qronos
SmolLM2 nvfp4 +had  76.356 / 0.404  64.142 / 0.117  61.505 / 0.109  60.996 / 0.102
SmolLM2 q4_0        70.324 / 0.345  65.284 / 0.218  65.830 / 0.213  62.289 / 0.116
Gemma nvfp4 +had    185.02 / 0.653  202.67 / 0.228  201.56 / 0.216  177.43 / 0.208
Gemma q4_0          364.12 / 0.951  169.80 / 0.287  195.91 / 0.332  177.60 / 0.259
==================  ==============  ==============  ==============  ==============

Qronos has the lowest KL in all four (the target: below GPTQ at the same format), also below GPTQ's
sequential mode; on Gemma q4_0 its perplexity is higher than GPTQ's while its KL is lower (GPTQ's
perplexity there is below fp32's, so perplexity is no proxy for fidelity to the float model).

Usage: OMP_NUM_THREADS=2 python benchmarks/qronos_study.py [--gemma] [--scheme nvfp4|q4_0] [--hadamard]
       [--calib-windows 16] [--windows 4] [--variants gptq gptq-seq qronos] [--layers]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode import memcopy_bandwidth  # noqa: E402  (benchmarks/decode.py)
from quality import evaluate, reference_logprobs  # noqa: E402

import tierserve.kernels.quant.fp4_format as fp4_format  # noqa: E402
import tierserve.kernels.quant.q4_0_calibrated as q4_0_calibrated  # noqa: E402
from tierserve.kernels.quant.qronos import qronos_moments, qronos_quantize, raw_moments  # noqa: E402
from tierserve.kernels.quant.transform import (DEFAULT_SKIP, capture_activations, linear_modules,  # noqa: E402
                                              matches, quantize_model)
from tierserve.models.loader import load_model  # noqa: E402
from tierserve.tools.calibration import (CALIBRATION_NOVELS, HELDOUT_NOVELS, austen_token_windows,  # noqa: E402
                                         calibration_activations, forward_logits)
from tierserve.tools.sequential_calibration import SequentialCalibration  # noqa: E402


def _with_damp(damp: float | None) -> None:
    """In the formats: None = Qronos as shipped; else the plain fit (raw_moments) at relative damping ``damp``."""
    kw = {} if damp is None else {"damp": damp}
    fp4_format.qronos_moments = q4_0_calibrated.qronos_moments = qronos_moments if damp is None else raw_moments
    fp4_format.qronos_quantize = lambda w, h, c, q, block=128, damp=None: qronos_quantize(w, h, c, q, block, **kw)
    q4_0_calibrated.qronos_quantize = lambda w, h, c, q: qronos_quantize(w, h, c, q, **kw)


@torch.inference_mode()
def linear_outputs(model, names, windows, batch) -> dict[str, torch.Tensor]:
    """Per linear name, its outputs over ``windows`` ``[tokens, out]``: each module applied to the inputs
    ``capture_activations`` recorded for it."""
    xs = capture_activations(model, lambda m: [forward_logits(m, windows[s:s + batch])
                                               for s in range(0, windows.shape[0], batch)], names)
    mods = dict(model.named_modules())
    return {n: mods[n](x) for n, x in xs.items()}


def relative_errors(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float((ref[n] - got[n]).norm() / ref[n].norm()) for n in ref}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gemma", action="store_true")
    p.add_argument("--scheme", default="nvfp4")
    p.add_argument("--hadamard", action="store_true")
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--variants", nargs="+", default=["gptq", "gptq-seq", "qronos"])
    p.add_argument("--layers", action="store_true", help="per-layer relative output errors")
    args = p.parse_args()
    from transformers import AutoTokenizer

    from tierserve.models.default_model import ensure_converted, ensure_default_model, gemma3_270m_gguf_path

    folder = ensure_converted(gemma3_270m_gguf_path()) if args.gemma else ensure_default_model()
    load = os.getloadavg()
    print(f"{folder}; {args.scheme} hadamard={args.hadamard}; calibration {args.calib_windows} x {args.seq_len}, "
          f"held-out {args.windows} x {args.seq_len}; threads {torch.get_num_threads()}, "
          f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    tok = AutoTokenizer.from_pretrained(folder)
    base = load_model(folder).model.eval()
    held = austen_token_windows(tok, HELDOUT_NOVELS, args.windows, args.seq_len)
    calw = austen_token_windows(tok, CALIBRATION_NOVELS, args.calib_windows, args.seq_len)
    ref = reference_logprobs(base, held, args.batch)
    batches = [held[s:s + args.batch] for s in range(0, held.shape[0], args.batch)]
    nll = -sum(float(r.gather(-1, w[:, 1:, None]).sum()) for r, w in zip(ref, batches))
    print(f"{'float':<16} ppl {math.exp(nll / held[:, 1:].numel()):8.3f}", flush=True)
    names = [n for n in linear_modules(base) if not matches(n, DEFAULT_SKIP)]
    calib = calibration_activations(base, tok, names, args.calib_windows, args.seq_len, args.batch,
                                    CALIBRATION_NOVELS)
    probe = calw[:min(4, calw.shape[0])]
    if args.layers:
        float_cal, float_held = (linear_outputs(base, names, w, args.batch) for w in (probe, held))
    opts = {"hadamard": True} if args.hadamard else {}
    for variant in args.variants:
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        if variant == "rtn":
            quantize_model(model, args.scheme, **opts)
        elif variant == "gptq":
            quantize_model(model, args.scheme, calibration=calib, gptq=True, **opts)
        elif variant == "gptq-seq":
            seq = SequentialCalibration(model, calw, calib, names, args.batch)
            quantize_model(model, args.scheme, calibration=lambda n: seq(n).quant_inputs, gptq=True, **opts)
        else:
            plain = {"qronos": None, "qronos-plain": 0.01}
            _with_damp(plain[variant] if variant in plain else float(variant[len("qronos-d"):]))
            seq = SequentialCalibration(model, calw, calib, names, args.batch)
            quantize_model(model, args.scheme, calibration=seq, qronos=True, **opts)
        res = evaluate(model, held, ref, args.batch)
        load = os.getloadavg()
        line = (f"{variant:<16} ppl {res['ppl']:8.3f}  KL {res['kl']:.5f}  ({time.perf_counter() - t0:.0f}s; "
                f"load {load[0]:.2f} {load[1]:.2f}; copy {memcopy_bandwidth():.1f} GB/s)")
        if args.layers:
            ec = relative_errors(float_cal, linear_outputs(model, names, probe, args.batch))
            eh = relative_errors(float_held, linear_outputs(model, names, held, args.batch))
            line += (f"  mean rel out err calib {sum(ec.values()) / len(ec):.4f} held-out "
                     f"{sum(eh.values()) / len(eh):.4f}")
            pick = [names[i] for i in (0, 1, 2, 3, len(names) // 2, len(names) - 2, len(names) - 1)]
            line += "\n" + "\n".join(f"    {n:<28} calib {ec[n]:.4f}  held-out {eh[n]:.4f}" for n in pick)
        print(line, flush=True)
        del model


if __name__ == "__main__":
    main()
