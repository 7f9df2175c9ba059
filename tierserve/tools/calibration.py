"""Calibration text and whole-sequence forwards for offline MoE tools (MoEfication, REAP, perplexity).

* ``austen_token_windows``: tokenize Austen novels (``tierserve.data.austen``) and
  cut them into ``num_windows`` non-overlapping windows of ``seq_len`` tokens,
  taken in order from the start of the concatenated novels (deterministic, no
  sampling). Calibration uses ``CALIBRATION_NOVELS``, evaluation the held-out
  ``HELDOUT_NOVELS``; the two sets share no novel. With ``bos=True`` each
  window opens with the ids the tokenizer puts before any text
  (``leading_special_tokens``: Gemma's ``<bos>``; none for SmolLM2), followed by
  ``seq_len`` minus that many text tokens: Gemma3 without its ``<bos>`` is far
  off its trained regime (Gemma-3-270m, 128-token held-out windows: perplexity
  272 without, 45 with).
* ``forward_logits``: runs a tierserve model on a batch of equal-length
  sequences the way the engine does a prefill (paged KV cache, one block table
  per sequence) and returns float32 logits ``[B, L, vocab]``.
* ``perplexity``: ``exp(mean NLL)`` of next-token prediction over every
  position but the last of each window, batched ``batch_size`` windows at a time.
* ``capture_mlp_inputs``: forward pre-hooks on every layer's ``mlp`` collect the
  FFN input (the post-attention RMSNorm output) of each token, per layer.
* ``calibration_activations``: the inputs ``[num_windows * seq_len, in]`` that
  each named module (e.g. the linears a calibrated weight format will quantize)
  receives while ``num_windows`` x ``seq_len`` tokens of ``novels`` (default
  ``CALIBRATION_NOVELS``) are prefilled ``batch_size`` windows per forward
  (``transform.capture_activations`` over ``forward_hidden``). Token ids must
  be below the model's vocabulary size, else InvalidParameterError.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tierserve.kernels.kv_pages import allocate_kv_cache
from tierserve.kernels.paged_attention import AttentionMetadata
from tierserve.models.context import ForwardContext

CALIBRATION_NOVELS = ("Emma", "Mansfield Park", "Sense & Sensibility")
HELDOUT_NOVELS = ("Persuasion", "Northanger Abbey")
_BLOCK_SIZE = 16


def leading_special_tokens(tokenizer) -> list[int]:
    """The ids ``tokenizer.encode`` puts before a text's own tokens (``[]`` when it adds none there)."""
    full, bare = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    n = len(full) - len(bare)
    return list(full[:n]) if n > 0 and list(full[n:]) == list(bare) else []


def austen_token_windows(tokenizer, novels: tuple[str, ...], num_windows: int, seq_len: int,
                         cache_dir: str | None = None, bos: bool = False) -> torch.Tensor:
    """``[num_windows, seq_len]`` token ids from the start of ``novels`` (joined by blank lines); with ``bos``
    each window starts with ``leading_special_tokens(tokenizer)``, then the next text tokens."""
    from tierserve.data.austen import austen_texts

    prefix = leading_special_tokens(tokenizer) if bos else []
    if len(prefix) >= seq_len:
        raise ValueError(f"seq_len = {seq_len} leaves no text after the {len(prefix)} leading special tokens")
    texts = austen_texts(cache_dir)
    text_len = seq_len - len(prefix)
    need = num_windows * text_len
    ids: list[int] = []
    for title in novels:
        # tokenize paragraph-sized pieces so we never tokenize a whole novel just to take its start
        for para in texts[title].split("\n\n"):
            if len(ids) >= need:
                break
            para = " ".join(para.split())
            if para:
                ids.extend(tokenizer.encode(para + "\n\n", add_special_tokens=False))
    if len(ids) < need:
        raise ValueError(f"num_windows * seq_len = {need} tokens requested but {novels} hold only {len(ids)}")
    windows = torch.tensor(ids[:need], dtype=torch.long).view(num_windows, text_len)
    if prefix:
        windows = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(num_windows, -1), windows], dim=1)
    return windows


@torch.inference_mode()
def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill ``tokens [B, L]`` as B independent sequences; float32 logits ``[B, L, vocab]``."""
    hidden = forward_hidden(model, tokens)
    return model.compute_logits(hidden).view(tokens.shape[0], tokens.shape[1], -1)


@torch.inference_mode()
def forward_hidden(model, tokens: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[B * L, hidden]`` of ``tokens [B, L]`` prefilled as B sequences."""
    b, n = tokens.shape
    blocks_per_seq = -(-n // _BLOCK_SIZE)
    kv = allocate_kv_cache(model.kv_spec(_BLOCK_SIZE), b * blocks_per_seq)
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(b)]
    meta = AttentionMetadata.build([n] * b, [n] * b, tables, _BLOCK_SIZE)
    positions = torch.arange(n).repeat(b)
    return model(tokens.reshape(-1), positions, ForwardContext(meta, kv))


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """``exp`` of the mean next-token NLL over all windows (positions 0..L-2 predict 1..L-1)."""
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        logits = forward_logits(model, batch)[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def calibration_activations(model, tokenizer, names, num_windows: int, seq_len: int, batch_size: int = 4,
                            novels: tuple[str, ...] = CALIBRATION_NOVELS) -> dict[str, torch.Tensor]:
    """Per module name, its inputs ``[num_windows * seq_len, in]`` over Austen calibration text."""
    from tierserve.errors import InvalidParameterError
    from tierserve.kernels.quant.transform import capture_activations

    for field, value in (("num_windows", num_windows), ("seq_len", seq_len), ("batch_size", batch_size)):
        if value < 1:
            raise InvalidParameterError(field, f"must be >= 1, got {value}")
    windows = austen_token_windows(tokenizer, novels, num_windows, seq_len)
    vocab = model.embed_tokens.num_embeddings
    if int(windows.max()) >= vocab:
        raise InvalidParameterError("tokenizer", f"calibration text has token id {int(windows.max())} but the "
                                                 f"model's vocabulary holds {vocab} ids; wrong tokenizer?")
    return capture_activations(model, lambda m: [forward_hidden(m, windows[s:s + batch_size])
                                                 for s in range(0, num_windows, batch_size)], names)


@torch.inference_mode()
def capture_mlp_inputs(model, windows: torch.Tensor, batch_size: int = 8,
                       layer_filter: Callable[[int], bool] | None = None) -> list[torch.Tensor | None]:
    """Per layer, the FFN inputs ``[num_windows * seq_len, hidden]`` (None for layers filtered out)."""
    layers = model.layers
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        if layer_filter is not None and not layer_filter(i):
            continue
        handles.append(layer.mlp.register_forward_pre_hook(
            lambda _m, args, i=i: captured[i].append(args[0].detach().clone())))
    try:
        for start in range(0, windows.shape[0], batch_size):
            forward_hidden(model, windows[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(c) if c else None for c in captured]
