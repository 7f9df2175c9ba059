"""Weight pruning on Gemma3's layout (tools/prune_weights.py) and calibration windows that open with the
tokenizer's ``<bos>`` (tools/calibration.py ``austen_token_windows(bos=True)``).

A 2-layer Gemma3 (one sliding-window layer of 16 tokens, one full-attention layer; q/k norms, four norms per
layer, tied embeddings; random weights) with a word tokenizer that, like Gemma's, puts ``<bos>`` before every
text. References: the calibration loss transformers computes on windows built here from the tokenizer's
``bos_token_id`` and the plain (no-bos) windows; the checkpoint's own norms and embeddings; transformers'
logits on the pruned weights. Gemma-3-270m itself: benchmarks/pruning.py --gemma."""

from __future__ import annotations

import collections
import json
import os

import pytest
import torch

from tierserve.tools.calibration import CALIBRATION_NOVELS, austen_token_windows, leading_special_tokens
from tierserve.tools.sparsity import keep_per_row

VOCAB, BOS, WINDOW, SEQ = 256, 2, 16, 48


def _bos_word_tokenizer():
    """Whitespace words of Emma's 252 most common, plus <pad> <eos> <bos> <unk>; encode() prepends <bos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from tierserve.data.austen import austen_texts

    words = collections.Counter(austen_texts()["Emma"].split()).most_common(VOCAB - 4)
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + [w for w, _ in words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    from transformers import AutoTokenizer, Gemma3TextConfig

    from model_harness import build_and_save

    path = str(tmp_path_factory.mktemp("gemma3_prune"))
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=128, head_dim=16,
                           initializer_range=0.1, tie_word_embeddings=True, sliding_window=WINDOW,
                           query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"],
                           bos_token_id=BOS, eos_token_id=1, pad_token_id=0)
    build_and_save(cfg, path, seed=7)
    _bos_word_tokenizer().save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).encode("the", add_special_tokens=True)[0] == BOS
    return path


@pytest.fixture(scope="module")
def pruned(gemma_folder, tmp_path_factory):
    from tierserve.tools.prune_weights import prune_weights

    out = str(tmp_path_factory.mktemp("gemma3_pruned") / "wanda")
    prune_weights(gemma_folder, out, "wanda", 0.5, calib_windows=4, seq_len=SEQ)
    return out


def test_windows_open_with_bos_then_the_same_text(gemma_folder, smollm_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_folder)
    assert leading_special_tokens(tok) == [tok.bos_token_id] == [BOS]
    plain = austen_token_windows(tok, CALIBRATION_NOVELS, 5, SEQ)
    with_bos = austen_token_windows(tok, CALIBRATION_NOVELS, 5, SEQ, bos=True)
    assert with_bos.shape == (5, SEQ) and bool((with_bos[:, 0] == BOS).all())
    assert torch.equal(with_bos[:, 1:].flatten(), plain.flatten()[:5 * (SEQ - 1)])
    # SmolLM2 adds nothing before a text: its windows (and every SmolLM2 figure) are unchanged
    smol = AutoTokenizer.from_pretrained(smollm_folder)
    assert leading_special_tokens(smol) == []
    assert torch.equal(austen_token_windows(smol, CALIBRATION_NOVELS, 3, 32, bos=True),
                       austen_token_windows(smol, CALIBRATION_NOVELS, 3, 32))


def test_gemma3_calibration_reads_bos_windows(pruned, gemma_folder):
    """The recorded dense calibration loss is transformers' loss on <bos> + text windows (without the <bos> the
    same model's loss differs by far more than the tolerance)."""
    from transformers import AutoTokenizer

    from tierserve.tools.prune_weights import load_training_model

    rec = json.load(open(os.path.join(pruned, "pruning.json")))
    text = austen_token_windows(AutoTokenizer.from_pretrained(gemma_folder), CALIBRATION_NOVELS, 4, SEQ)
    ids = torch.cat([torch.full((4, 1), BOS), text.flatten()[:4 * (SEQ - 1)].view(4, SEQ - 1)], dim=1)
    model = load_training_model(gemma_folder)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        want = float(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)))
        logits = model(input_ids=text).logits[:, :-1]
        without = float(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), text[:, 1:].reshape(-1)))
    assert abs(rec["calibration_loss_dense"] - want) < 1e-4
    assert abs(without - want) > 1e-3


def test_gemma3_prunes_every_linear_and_keeps_norms_and_tied_embeddings(pruned, gemma_folder):
    from safetensors.torch import load_file

    dense = load_file(os.path.join(gemma_folder, "model.safetensors"))
    tensors = load_file(os.path.join(pruned, "model.safetensors"))
    rec = json.load(open(os.path.join(pruned, "pruning.json")))
    assert rec["pruned_matrices"] == 2 * 7 and abs(rec["measured_sparsity"] - 0.5) < 1e-3
    assert set(tensors) == set(dense) and "lm_head.weight" not in tensors  # still tied
    linears = [n for n in tensors if n.endswith("_proj.weight")]
    assert len(linears) == 14
    for name, t in tensors.items():
        if name in linears:
            assert int((t != 0).sum(dim=1).max()) <= keep_per_row(t.shape[1], 0.5), name
        else:  # embeddings, q/k norms, the four per-layer norms, the final norm: bit for bit
            assert torch.equal(t, dense[name]), name
    assert sum(".q_norm." in n or ".k_norm." in n or "feedforward_layernorm" in n for n in tensors) == 8


def test_pruned_gemma3_serves_and_matches_transformers(pruned):
    """Past the 16-token window, so the sliding layer's mask is exercised on the pruned weights."""
    from tierserve.models.loader import load_model
    from tierserve.tools.calibration import forward_logits
    from tierserve.tools.prune_weights import load_training_model

    ids = torch.randint(4, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    ids[0, 0] = BOS
    ours = forward_logits(load_model(pruned).model, ids)[0]
    with torch.no_grad():
        ref = load_training_model(pruned)(input_ids=ids).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-3
