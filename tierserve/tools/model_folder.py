"""Writing a derived model folder atomically: what MoEfication and expert pruning both produce.

``write_model_folder(out_dir, tensors, config, record_name, record, source_dir, copy)`` fills a fresh
temporary folder beside ``out_dir`` with ``model.safetensors`` (``tensors``), ``config.json`` (sorted keys),
``record_name`` (the tool's JSON record of how the folder was made) and the files of ``source_dir`` that
``copy(name)`` selects (tokenizer and generation files), then replaces ``out_dir`` by renaming the
temporary folder onto it. A failure at any point leaves ``out_dir`` as it was (or absent) and removes the
temporary folder, so a half-written model is never found at ``out_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable

import torch
from safetensors.torch import save_file


def write_model_folder(out_dir: str, tensors: dict[str, torch.Tensor], config: dict, record_name: str,
                       record: dict, source_dir: str, copy: Callable[[str], bool]) -> None:
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".model-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, record_name), "w") as f:
            json.dump(record, f, indent=2)
        for name in os.listdir(source_dir):
            src = os.path.join(source_dir, name)
            if os.path.isfile(src) and copy(name):
                shutil.copy(src, tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
