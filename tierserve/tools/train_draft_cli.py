"""``tierserve train-draft --model M --out HEADS``: argparse wiring for tools/train_draft.py.

Every ``TrainDraftOptions`` field is a flag (``--steps``, ``--batch-size``,
``--seq-len``, ``--lr``, ``--window``, ``--serial-depth``, ``--num-mlp-heads``,
``--draft-vocab-size``, ``--checkpoint-every``, ...), defaulting to the
dataclass default. ``--model`` defaults to the embedded SmolLM2. Running it
again on the same ``--out`` resumes (a larger ``--steps`` trains further).
Prints a one-line JSON summary: steps, first and last loss, the heads folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from tierserve.tools.train_draft import TrainDraftOptions


def add_train_draft_parser(sub) -> None:
    p = sub.add_parser("train-draft", help="train Gumiho draft heads for a frozen model on Austen's training split")
    p.add_argument("--model", default=None, help="safetensors folder of the target (default: embedded SmolLM2)")
    p.add_argument("--out", required=True, help="heads folder (resumed when it holds a training state)")
    for f in dataclasses.fields(TrainDraftOptions):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train_draft)


def _train_draft(args: argparse.Namespace) -> int:
    from tierserve.tools.train_draft import train_draft_from_path

    options = TrainDraftOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainDraftOptions)})
    result = train_draft_from_path(args.model, args.out, options, progress=not args.no_progress)
    print(json.dumps({"steps": result.steps, "first_loss": result.losses[0] if result.losses else None,
                      "last_loss": result.losses[-1] if result.losses else None, "heads": args.out}))
    return 0
