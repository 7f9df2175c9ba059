"""The pruning table of benchmarks/offload.py ``--reap``: held-out perplexity of the MoE after expert pruning.

Saliency is collected once on ``calib_windows`` x 256 tokens of the calibration
novels (tierserve.tools.calibration); each method (``reap``: S_j = mean over routed
tokens of g_j(x) * ||f_j(x)||, ``frequency``: routed-token counts, ``random``)
removes ``ratio`` of each layer's experts (tierserve.tools.reap.prune), and the
pruned checkpoint is evaluated on ``eval_windows`` held-out windows.
"""

from __future__ import annotations

import os
import shutil
import tempfile

REAP_RATIOS = (0.25, 0.5)


def reap_table(path: str, calib_windows: int, eval_windows: int, seq_len: int = 256) -> list[dict]:
    """Held-out perplexity: unpruned, and REAP / frequency / random at REAP_RATIOS (module doc)."""
    from transformers import AutoTokenizer

    from tierserve.kernels.cpu_linear import apply_linear_backend
    from tierserve.models.loader import load_model
    from tierserve.tools.calibration import CALIBRATION_NOVELS, HELDOUT_NOVELS, austen_token_windows, perplexity
    from tierserve.tools.reap import collect_saliency, prune

    tok = AutoTokenizer.from_pretrained(path)
    heldout = austen_token_windows(tok, HELDOUT_NOVELS, eval_windows, seq_len)
    acc = collect_saliency(load_model(path).model, austen_token_windows(tok, CALIBRATION_NOVELS, calib_windows,
                                                                        seq_len))

    def ppl(folder: str) -> float:
        model = load_model(folder).model
        apply_linear_backend(model, "auto")
        return perplexity(model, heldout)

    rows = [dict(method="none", ratio=0.0, perplexity=ppl(path))]
    tmp = tempfile.mkdtemp(prefix="moe-reap-")
    try:
        for ratio in REAP_RATIOS:
            for method in ("reap", "frequency", "random"):
                out = os.path.join(tmp, f"{method}-{ratio}")
                prune(path, out, method, ratio, calib_windows, seq_len, acc=acc)
                rows.append(dict(method=method, ratio=ratio, perplexity=ppl(out)))
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows
