"""Draft trees verified in the engine: greedy output token-identical to plain decoding.

Two proposers:

* ``ContinuationTrees``: trees built around the target's own greedy
  continuation (from a plain run), with decoy siblings (random tokens)
  always placed before the true token at depth 1 and randomly elsewhere,
  decoy subtrees, and the true token left out at random depths. So
  verification accepts paths through non-first children (the accepted nodes'
  KV must be moved to consecutive positions, or the next step attends over
  a decoy's KV) and stops at corrections. This checks the tree forward (mask,
  positions), the walk, the compaction and the rollback on SmolLM2 (marked
  slow) and on a tiny Llama with both attention backends, with several
  sequences per step (one tree each, trimmed to the step's token budget),
  chunked prefill and prefix caching (later prompts hit blocks written by
  tree steps).
* the real gumiho proposer (random heads on a tiny Llama): its trees go
  through the same path, and a width-1 tree equals its chain.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig

from model_harness import build_and_save
from tierserve import LLM, SamplingParams
from tierserve.engine.spec_decode.gumiho import GumihoProposer
from tierserve.engine.spec_decode.gumiho_heads import GumihoConfig, GumihoHeads
from tierserve.engine.spec_decode.proposer import Proposer
from tierserve.engine.spec_decode.tree import DraftTree
from tierserve.errors import InvalidParameterError
from tierserve.models.loader import load_model
from tierserve.tools.calibration import forward_hidden
from tierserve.tools.random_model import word_tokenizer

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


class ContinuationTrees(Proposer):
    """Trees around known greedy continuations (see the module docstring)."""

    name = "continuation"

    def __init__(self, sequences: list[list[int]], vocab: int):
        self.sequences, self.vocab = sequences, vocab

    def propose(self, token_ids, num_tokens, request_id=None):
        return []

    def propose_tree(self, token_ids, depth, width, budget, request_id=None):
        ids = list(token_ids)
        seq = next((s for s in self.sequences if s[:len(ids)] == ids), None)
        if seq is None:
            return DraftTree((), ())
        rng = random.Random(len(ids))
        truth = seq[len(ids):len(ids) + depth]
        tokens: list[int] = []
        parents: list[int] = []
        anchor, decoy = -1, None  # the true path's last node; a decoy of the previous depth
        for d, true in enumerate(truth):
            kids = [rng.randrange(self.vocab) for _ in range(1 if d == 0 else rng.randrange(0, width))]
            if d == 0 or rng.random() > 0.15:
                kids.insert(rng.randrange(1 if d == 0 else 0, len(kids) + 1), true)
            level = [(k, anchor) for k in kids] + ([(rng.randrange(self.vocab), decoy)] if decoy is not None else [])
            first = len(tokens)
            for tok, parent in level[:budget - len(tokens)]:
                tokens.append(tok)
                parents.append(parent)
            placed = [first + i for i, (tok, p) in enumerate(level) if p == anchor and tok == true
                      and first + i < len(tokens)]
            decoy = next((first + i for i, (tok, p) in enumerate(level) if p == anchor and tok != true
                          and first + i < len(tokens)), None)
            if not placed:
                break
            anchor = placed[0]
        return DraftTree(tuple(tokens), tuple(parents))


PROMPTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, must be",
           "The capital of France is",
           "It is a truth universally acknowledged, that a single man in possession of a good fortune, is"]


@pytest.mark.slow  # ~40 s on the shared 2-core machine; the tiny-model tests below check the same paths fast
def test_smollm_trees_with_batching_and_prefix_caching(smollm_folder, smollm_llm):
    ref = smollm_llm.generate(PROMPTS, GREEDY)
    llm = LLM(smollm_folder, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=48, enable_prefix_caching=True,
              speculative="ngram", num_speculative_tokens=5, draft_tree_width=3, draft_tree_nodes=12)
    spec = llm.engine.spec
    spec.proposer = ContinuationTrees([r.prompt_token_ids + r.token_ids for r in ref], llm.engine.vocab_size)
    first = llm.generate(PROMPTS[:2], GREEDY)  # two sequences per step, one tree each
    again = llm.generate(PROMPTS[2:], GREEDY)  # shares the first prompt's leading blocks
    assert [o.token_ids for o in first + again] == [r.token_ids for r in ref]
    assert again[0].num_cached_tokens >= 16  # a prefix-cache hit on blocks written with trees around
    stats = llm.engine.spec_decode_stats()
    assert stats.mean_accepted_length > 2.0 and stats.num_draft_tokens > 3 * stats.num_drafts, stats


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny"))
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    build_and_save(cfg, path, seed=3, noise=0.3)
    word_tokenizer(128).save_pretrained(path)
    heads = str(tmp_path_factory.mktemp("heads"))
    torch.manual_seed(0)
    GumihoHeads(GumihoConfig(hidden_size=64, vocab_size=128, num_heads=4, intermediate_size=64, window=8)).save(heads)
    return path, heads


@pytest.mark.parametrize("attention_backend", ["torch", "triton"])
def test_continuation_trees_exact_on_a_tiny_model(tiny, attention_backend):
    """The same trees on the tiny Llama (block size 4: compaction moves cross pages), both attention paths; the
    last prompt extends the first one's output, so its prefix-cache hit reads KV that tree steps wrote."""
    path, _ = tiny
    prompts = [[5, 9, 33, 2, 71, 8, 6, 6, 1], [40, 41, 42], [5, 9, 33, 2, 71, 8, 6, 6, 2, 3]]
    plain = LLM(path, num_blocks=64, max_num_seqs=4)
    ref = plain.generate(prompts, GREEDY)
    prompts.append(prompts[0] + ref[0].token_ids[:11])  # its KV after the prompt was written by tree steps
    ref += plain.generate(prompts[3:], GREEDY)
    llm = LLM(path, num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=24,
              enable_prefix_caching=True, speculative="ngram", num_speculative_tokens=5, draft_tree_width=3,
              draft_tree_nodes=12, attention_backend=attention_backend)
    llm.engine.spec.proposer = ContinuationTrees([r.prompt_token_ids + r.token_ids for r in ref], 128)
    out = llm.generate(prompts[:2], GREEDY) + llm.generate(prompts[2:3], GREEDY) + llm.generate(prompts[3:], GREEDY)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    assert out[2].num_cached_tokens >= 8 and out[3].num_cached_tokens >= 16  # prefix-cache hits
    stats = llm.engine.spec_decode_stats()
    assert stats.mean_accepted_length > 2.0 and stats.num_draft_tokens > 3 * stats.num_drafts, stats


def test_continuation_trees_exact_under_preemption(tiny):
    """12 pages of 4 tokens for three requests of up to 25 tokens: requests are preempted and recomputed between
    tree steps (a tree's drafts never preempt: they are dropped when their pages do not fit)."""
    path, _ = tiny
    prompts = [[5, 9, 33, 2, 71, 8, 6, 6, 1], [40, 41, 42, 43, 44, 45, 46], [7, 7, 8, 100, 3, 17]]
    ref = LLM(path, num_blocks=64, max_num_seqs=4).generate(prompts, GREEDY)
    llm = LLM(path, num_blocks=12, block_size=4, max_num_seqs=4, max_num_batched_tokens=24, speculative="ngram",
              num_speculative_tokens=5, draft_tree_width=3, draft_tree_nodes=12)
    llm.engine.spec.proposer = ContinuationTrees([r.prompt_token_ids + r.token_ids for r in ref], 128)
    eng = llm.engine
    for p in prompts:
        eng.add_request(p, GREEDY)
    out: dict[str, list[int]] = {rid: [] for rid in eng.request_ids()}
    preemptions = 0
    while eng.has_unfinished():
        for rid in eng.request_ids():
            preemptions = max(preemptions, eng.get_request(rid).num_preemptions)
        for o in eng.step():
            out[o.request_id].extend(o.new_token_ids)
    assert list(out.values()) == [r.token_ids for r in ref]
    assert preemptions > 0 and eng.spec_decode_stats().num_accepted_tokens > 10


def test_gumiho_trees_exact_on_a_tiny_model(tiny):
    path, heads = tiny
    prompts = [[5, 9, 33, 2, 71, 8], [40, 41, 42], [5, 9, 33, 2, 71, 8, 100, 3, 17]]
    ref = LLM(path, num_blocks=64, max_num_seqs=4).generate(prompts, GREEDY)
    llm = LLM(path, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=40, speculative="gumiho",
              speculative_model=heads, num_speculative_tokens=4, draft_tree_width=3, draft_tree_nodes=10)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == [r.token_ids for r in ref]
    stats = llm.engine.spec_decode_stats()
    assert stats.num_drafts > 10 and stats.num_draft_tokens > 8 * stats.num_drafts, stats  # trees, not chains
    sampled = [SamplingParams(max_tokens=8, temperature=0.8, seed=s, ignore_eos=True, logprobs=1) for s in (1, 2)]
    runs = [llm.generate(prompts[:2], sampled) for _ in range(2)]
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]  # seeded: the same tree walks
    assert all(len(o.token_ids) == 8 and len(o.logprobs) == 8 for o in runs[0])


def test_accepted_paths_hidden_states_reach_the_gumiho_window(tiny):
    """Gumiho observing the target's hidden states while trees around the true continuation are verified: after
    every step the window holds the full recompute's hidden states of its positions (the root's and the accepted
    path's rows, not the rows that follow the root in flattened order)."""
    path, heads = tiny
    prompts = [[5, 9, 33, 2, 71, 8, 6, 6, 1], [40, 41, 42]]
    ref = LLM(path, num_blocks=64, max_num_seqs=4).generate(prompts, GREEDY)
    llm = LLM(path, num_blocks=64, block_size=4, max_num_seqs=4, speculative="gumiho", speculative_model=heads,
              num_speculative_tokens=5, draft_tree_width=3, draft_tree_nodes=12)
    eng, model = llm.engine, load_model(path, torch.float32).model.eval()
    prop, oracle = eng.spec.proposer, ContinuationTrees([r.prompt_token_ids + r.token_ids for r in ref], 128)
    prop.propose_tree = oracle.propose_tree
    for p in prompts:
        eng.add_request(p, GREEDY)
    checked = 0
    while eng.has_unfinished():
        eng.step()
        for rid in eng.request_ids():
            w, seq = prop.windows[rid], eng.get_request(rid).token_ids()
            with torch.no_grad():
                full = forward_hidden(model, torch.tensor([seq[:w.end]]))
            assert w.tokens == seq[w.end - len(w.tokens) + 1:w.end + 1]
            torch.testing.assert_close(w.hidden, full[w.end - len(w.tokens):w.end], atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked >= 6 and eng.spec_decode_stats().mean_accepted_length > 2.0


def test_width_one_tree_is_the_chain(tiny):
    path, heads = tiny
    model = load_model(path, torch.float32).model.eval()
    prop = GumihoProposer(GumihoHeads.load(heads), model)
    g = torch.Generator().manual_seed(1)
    prop.observe("r", 0, torch.randn(7, 64, generator=g), [3, 1, 4, 1, 5, 9, 2])
    ids = [0, 3, 1, 4, 1, 5, 9, 2]
    chain = prop.propose(ids, 5, "r")
    assert len(chain) == 5 and prop.propose_tree(ids, 5, 1, 12, "r") == DraftTree.chain(chain)
    tree = prop.propose_tree(ids, 5, 3, 12, "r")
    assert len(tree) == 12 and tree.depth <= 5 and len(tree.children(-1)) == 3
    assert tree.tokens[tree.children(-1)[0]] == chain[0]  # the most likely root child comes first


def test_tree_options_are_checked(tiny):
    path, heads = tiny
    for field, value in (("draft_tree_width", 9), ("draft_tree_width", 0), ("draft_tree_nodes", 63)):
        with pytest.raises(InvalidParameterError, match=field):
            LLM(path, speculative="gumiho", speculative_model=heads, **{field: value})
    with pytest.raises(InvalidParameterError, match="draft_tree_width.*plain KV"):
        LLM(path, num_blocks=64, speculative="gumiho", speculative_model=heads, draft_tree_width=2,
            kv_compression="kv4", kv_group_size=16)


def test_trees_on_a_sliding_window_model_are_refused(tmp_path):
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=384, max_position_embeddings=128,
                           sliding_window=8, query_pre_attn_scalar=24, tie_word_embeddings=False,
                           layer_types=["sliding_attention", "full_attention"])
    build_and_save(cfg, str(tmp_path / "model"))
    word_tokenizer(384).save_pretrained(str(tmp_path / "model"))
    GumihoHeads(GumihoConfig(hidden_size=64, vocab_size=384, num_heads=4, intermediate_size=64)).save(
        str(tmp_path / "heads"))
    with pytest.raises(InvalidParameterError, match="draft_tree_width.*sliding-window attention \\(1 layers\\)"):
        LLM(str(tmp_path / "model"), num_blocks=16, speculative="gumiho", speculative_model=str(tmp_path / "heads"),
            draft_tree_width=2)
