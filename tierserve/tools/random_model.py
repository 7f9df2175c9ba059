"""Random-weight models of known shapes, saved as servable folders (no hub access needed).

GPU checks and benchmarks need real model shapes (Llama-3.2-1B, Qwen3-30B-A3B)
but no weights can be downloaded, and a checkpoint of that size cannot travel
to a check machine. ``save_random_model(shape, out, ...)`` builds the shape's
transformers model from its config with seeded random weights (transformers'
own initialisation, ``initializer_range`` 0.02), writes it with
``save_pretrained`` (safetensors, in the requested dtype) and adds a
word-level tokenizer over the whole vocabulary (token ``i`` is the word
``t{i}``; whitespace pre-tokenisation), so the folder loads in tierserve's
engine and in transformers alike.

Shapes (``SHAPES``): ``llama-1b`` (Llama-3.2-1B: 16 layers, hidden 2048,
intermediate 8192, 32 query / 8 KV heads of 64, vocab 128256, tied
embeddings) and ``qwen3-30b-a3b`` (Qwen3-30B-A3B: hidden 2048, 32 query / 4
KV heads of 128, 128 experts of intermediate 768, top-8, vocab 151936;
48 layers in the real model). ``num_layers`` cuts a shape to fewer layers
(to fit the check machine's time), which keeps every per-layer figure.
"""

from __future__ import annotations

import os

import torch

from tierserve.errors import InvalidParameterError

SHAPES: dict[str, dict] = {
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                     max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                     tie_word_embeddings=True),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                          max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1000000.0,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          tie_word_embeddings=False),
}


def shape_config(shape: str, num_layers: int | None = None):
    """The transformers config of a named shape, optionally cut to ``num_layers``."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise InvalidParameterError("shape", f"must be one of {sorted(SHAPES)}, got {shape!r}")
    fields = dict(SHAPES[shape])
    if num_layers is not None:
        if not 1 <= num_layers <= fields["num_hidden_layers"]:
            raise InvalidParameterError("num_layers", f"must be in [1, {fields['num_hidden_layers']}], "
                                                      f"got {num_layers}")
        fields["num_hidden_layers"] = num_layers
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def word_tokenizer(vocab_size: int):
    """A fast tokenizer whose token ``i`` is the word ``t{i}`` (eos = the last id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token=f"t{vocab_size - 1}")


def save_random_model(shape: str, out: str, *, num_layers: int | None = None, dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0, device: str = "cpu") -> str:
    """Write a random-weight ``shape`` model folder to ``out`` and return ``out`` (see module docstring)."""
    from transformers import AutoModelForCausalLM

    config = shape_config(shape, num_layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    word_tokenizer(config.vocab_size).save_pretrained(out)
    return out
