"""Attention over evicted blocks against an independent reference: transformers with a 4D mask.

After PagedEviction drops blocks from a sequence's table, the engine's next
tokens attend to the kept tokens only, at their original positions (keys
carry the RoPE of where they were computed; the new token's position keeps
counting real tokens). The same computation in transformers: one forward over
prompt + generated tokens with a custom 4D mask, causal everywhere, except
that the rows of the tokens decoded after the eviction see only the kept
positions (and the tokens after them). Logits must agree to fp32 noise
(measured ~3e-5), while the unmasked forward differs by several units.
"""

from __future__ import annotations

import torch

from model_harness import compressed_engine, greedy_run
from tierserve.config import KVCompressionConfig

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be on "
        "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
        "families, that he is considered the rightful property of some one or other of their daughters. "
        "My dear Mr. Bennet, said his lady to him one day, have you heard that Netherfield Park is let at "
        "last? Mr. Bennet replied that he had not.")
BS = 16


def test_evicted_attention_matches_masked_transformers(smollm_folder, hf_smollm):
    hf, _ = hf_smollm
    engine = compressed_engine(smollm_folder, KVCompressionConfig("paged_eviction", budget=48), num_blocks=32,
                               block_size=BS, max_num_seqs=1, enable_prefix_caching=False, linear_backend="torch")
    ids = engine.tokenize(TEXT)
    n = len(ids)
    assert n > 48 + 2 * BS
    tables = []

    def record_table(eng, rids):
        if eng.has_unfinished():
            tables.append(list(eng.get_request(rids[0]).block_ids))

    tokens, logits = greedy_run(engine, [ids], 3, after_step=record_table)
    tokens, logits = tokens[0], torch.cat(logits)
    # a fresh pool hands out blocks 0, 1, 2, ... so block b held positions [16 b, 16 b + 16)
    kept = tables[0]
    assert tables[0] == tables[1] and len(kept) < -(-n // BS)  # evicted after the prefill, not again
    L = n + 2
    visible = torch.zeros(L, dtype=torch.bool)
    for b in kept[:-1]:
        visible[BS * b: BS * (b + 1)] = True
    visible[BS * kept[-1]:] = True  # the current block and everything after it
    allowed = torch.ones(L, L, dtype=torch.bool).tril()
    allowed[n:] &= visible
    mask = torch.zeros(1, 1, L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
    full = torch.tensor([ids + tokens[:2]])
    with torch.no_grad():
        ref = hf(full, attention_mask=mask).logits[0]
        unmasked = hf(full).logits[0]
    for step in range(3):  # step 0: the prefill (before any eviction); 1, 2: decodes after it
        torch.testing.assert_close(logits[step], ref[n - 1 + step], rtol=0, atol=2e-4)
    assert (unmasked[n] - logits[1]).abs().max() > 0.1  # the eviction did change the computation
