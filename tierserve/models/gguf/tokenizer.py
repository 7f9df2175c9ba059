"""Write the Hugging Face tokenizer embedded in a GGUF file to a folder.

transformers rebuilds a fast tokenizer from the GGUF's ``tokenizer.ggml.*``
metadata (BPE for ``gpt2``-style vocabularies, Unigram/BPE for ``llama``
SentencePiece ones) including the chat template; ``save_pretrained`` then
writes tokenizer.json / tokenizer_config.json next to the converted weights,
so the folder loads without the GGUF. transformers is imported lazily.
"""

from __future__ import annotations

import os

from tierserve.errors import ModelLoadError


def write_hf_tokenizer(gguf_path: str, out_dir: str) -> list[str]:
    """Save the tokenizer of ``gguf_path`` into ``out_dir``; returns the files written."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"cannot build a tokenizer from GGUF file {gguf_path}: {exc}") from exc
    return list(tokenizer.save_pretrained(out_dir))
