"""Gumiho draft heads: training (tools/train_draft.py), loading, and exact drafting in the engine.

Targets: ``bigram``, a tiny random Llama whose attention output projections
are zero, so its next token is a function of the current token alone (heads
can learn it in a few dozen steps: this is where training must show), and
``tiny``, the same shape with attention on (the next token depends on the
whole context, so KV bookkeeping errors would change the output). Heads are
trained on the target's own greedy continuations of random prompts.

Checked: the training loss falls and trained heads get most drafts accepted
where untrained heads of the same shape get few; every draft the engine
proposes equals a from-scratch recomputation (the target's hidden states of
the whole sequence, the heads run on its last ``window`` pairs) under chunked
prefill, prefix caching and a batch; greedy output is token-identical to
the engine without speculation; a resumed training run repeats an
uninterrupted one loss for loss; heads for another model are refused with
both shapes named. SmolLM2: heads trained a few steps on the Austen training
split by ``tierserve train-draft`` draft in the engine with greedy
output identical to plain decoding.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

from model_harness import build_and_save
from tierserve import LLM, SamplingParams
from tierserve.cli import main
from tierserve.engine.spec_decode.gumiho_heads import GumihoConfig, GumihoHeads
from tierserve.errors import InvalidParameterError
from tierserve.models.loader import load_model
from tierserve.tools.calibration import forward_hidden
from tierserve.tools.random_model import word_tokenizer
from tierserve.tools.train_draft import TrainDraftOptions, train_draft

VOCAB = 128
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
OPTIONS = TrainDraftOptions(steps=40, batch_size=8, seq_len=48, lr=1e-2, window=8, checkpoint_every=10,
                            intermediate_size=128)


def save_target(path: str, attention_scale: float) -> str:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    model = build_and_save(cfg, path, seed=3, noise=0.3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(attention_scale)
    model.save_pretrained(path)
    word_tokenizer(VOCAB).save_pretrained(path)
    return path


def prompts(seed: int, n: int, length: int = 6) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


def greedy_windows(path: str) -> torch.Tensor:
    """The target's greedy continuations (6-token prompt + 42 tokens) of 64 random prompts."""
    ps = prompts(1, 64)
    outs = LLM(path, num_blocks=128, max_num_seqs=8).generate(ps, SamplingParams(max_tokens=42, temperature=0.0,
                                                                                 ignore_eos=True))
    return torch.tensor([p + o.token_ids for p, o in zip(ps, outs)])


def trained_heads(path: str, out: str, options: TrainDraftOptions = OPTIONS):
    model = load_model(path, torch.float32).model.eval()
    return train_draft(model, greedy_windows(path), out, options, progress=False)


@pytest.fixture(scope="module")
def bigram(tmp_path_factory):
    path = save_target(str(tmp_path_factory.mktemp("bigram")), 0.0)
    heads = str(tmp_path_factory.mktemp("bigram_heads"))
    return path, heads, trained_heads(path, heads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_target(str(tmp_path_factory.mktemp("tiny")), 1.0)
    heads = str(tmp_path_factory.mktemp("tiny_heads"))
    trained_heads(path, heads, TrainDraftOptions(**{**OPTIONS.__dict__, "steps": 20}))
    return path, heads


def spec_llm(path, heads, k=5, **kw):
    return LLM(path, num_blocks=128, max_num_seqs=8, max_num_batched_tokens=16, speculative="gumiho",
               speculative_model=heads, num_speculative_tokens=k, **kw)


def test_training_loss_falls_and_trained_heads_are_accepted(bigram, tmp_path):
    path, heads, result = bigram
    assert result.steps == OPTIONS.steps and len(result.losses) == OPTIONS.steps
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    test_prompts = prompts(2, 6)  # unseen prompts
    ref = LLM(path, num_blocks=128, max_num_seqs=8).generate(test_prompts, GREEDY)
    llm = spec_llm(path, heads)
    assert [o.token_ids for o in llm.generate(test_prompts, GREEDY)] == [r.token_ids for r in ref]
    stats = llm.engine.spec_decode_stats()
    torch.manual_seed(0)
    GumihoHeads(GumihoHeads.load(heads).config).save(str(tmp_path))  # untrained, same shape
    raw = spec_llm(path, str(tmp_path))
    assert [o.token_ids for o in raw.generate(test_prompts, GREEDY)] == [r.token_ids for r in ref]
    raw_stats = raw.engine.spec_decode_stats()
    assert stats.acceptance_rate > 0.5 and stats.mean_accepted_length > 2.5, stats
    assert raw_stats.acceptance_rate < 0.2, raw_stats


def reference_drafts(model, heads: GumihoHeads, seq: list[int], k: int, first: int = 0) -> list[int]:
    """Chain drafts recomputed from scratch: the whole sequence's hidden states, the last ``window`` pairs
    from position ``first`` on (the engine never computed the hidden states of a prefix-cache hit)."""
    w, lm = heads.config.window, model.head_weight()
    embed = lambda ids: model.embed_tokens(torch.tensor(ids))  # noqa: E731
    with torch.no_grad():
        hidden = forward_hidden(model, torch.tensor([seq]))
        pairs = heads.pairs(hidden[:-1], embed(seq[1:]))[first:][-w:]
        out: list[int] = []
        for _ in range(min(k, heads.config.serial_depth)):
            z = heads.serial_forward(pairs[None])[0, -1]
            out.append(int((z @ lm.T).argmax()))
            pairs = torch.cat([pairs, heads.pairs(z[None], embed(out[-1:]))])[-w:]
        for feats in heads.mlp_forward(z[None], embed(out[-1:]))[:k - len(out)]:
            out.append(int((feats @ lm.T).argmax()))
    return out


@pytest.mark.parametrize("prefix_caching, num_blocks", [(True, 128), (False, 10)])
def test_every_draft_equals_a_full_recompute_and_output_is_exact(tiny, prefix_caching, num_blocks):
    """With 10 blocks of 16 tokens the batch does not fit: requests are preempted and recomputed, and the
    recompute's hidden states replace the window's (a position observed again drops what followed it)."""
    path, heads_dir = tiny
    model = load_model(path, torch.float32).model.eval()
    heads = GumihoHeads.load(heads_dir)
    shared = prompts(3, 1, 20)[0]
    batch = [shared + [1, 2], shared + [3], *prompts(4, 3, 13)]  # shared prefix blocks, prompts > one chunk
    ref = LLM(path, num_blocks=128, max_num_seqs=8).generate(batch, GREEDY)
    llm = LLM(path, num_blocks=num_blocks, max_num_seqs=8, max_num_batched_tokens=16, speculative="gumiho",
              speculative_model=heads_dir, num_speculative_tokens=5, enable_prefix_caching=prefix_caching)
    eng = llm.engine
    for p in batch:
        eng.add_request(p, GREEDY)
    out: dict[str, list[int]] = {rid: [] for rid in eng.request_ids()}
    checked = hits = preemptions = 0
    while eng.has_unfinished():
        for rid in eng.request_ids():
            req = eng.get_request(rid)
            hits = max(hits, req.num_cached_tokens)
            preemptions = max(preemptions, req.num_preemptions)
            if req.spec_token_ids:
                assert req.spec_token_ids == reference_drafts(model, heads, req.token_ids(), len(req.spec_token_ids),
                                                              req.num_cached_tokens), (rid, req.num_tokens)
                checked += 1
        for o in eng.step():
            out[o.request_id].extend(o.new_token_ids)
    assert list(out.values()) == [r.token_ids for r in ref]
    stats = eng.spec_decode_stats()
    assert checked >= stats.num_drafts > len(batch) * 10  # drafts of a request preempted are never verified
    if prefix_caching:
        assert hits >= 16  # the shared prompt prefix was a prefix-cache hit
    else:
        assert preemptions > 0
    assert stats.num_accepted_tokens > 0


def test_window_keeps_the_last_pairs_by_position():
    """``_Window.put`` against a dict of position -> (state, token): a put at ``p`` drops positions >= p first;
    a put that leaves a gap (or starts before the window) restarts the window."""
    from tierserve.engine.spec_decode.gumiho import _Window

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        w, ref, limit = _Window(), {}, 6
        for _ in range(8):
            first = int(torch.randint(0, 24, (1,), generator=g))
            n = int(torch.randint(1, 5, (1,), generator=g))
            toks = torch.randint(0, 100, (n,), generator=g).tolist()
            start = w.end - len(w.tokens)
            if not (w.hidden is not None and start <= first <= w.end):
                ref = {}
            ref = {p: t for p, t in ref.items() if p < first}
            ref.update({first + i: t for i, t in enumerate(toks)})
            ref = {p: ref[p] for p in sorted(ref)[-limit:]}
            w.put(first, torch.tensor(toks, dtype=torch.float32)[:, None], toks, limit)
            assert w.end == max(ref) + 1
            assert w.tokens == list(ref.values()) == w.hidden[:, 0].long().tolist()
            assert sorted(ref) == list(range(w.end - len(ref), w.end))


def test_resumed_training_repeats_the_uninterrupted_run(bigram, tmp_path):
    path, _, full = bigram
    half = TrainDraftOptions(**{**OPTIONS.__dict__, "steps": 20})
    assert trained_heads(path, str(tmp_path), half).steps == 20
    resumed = trained_heads(path, str(tmp_path))
    assert resumed.steps == OPTIONS.steps
    assert resumed.losses == pytest.approx(full.losses, rel=1e-4)
    with pytest.raises(InvalidParameterError, match="lr"):
        trained_heads(path, str(tmp_path), TrainDraftOptions(**{**OPTIONS.__dict__, "lr": 1e-4}))


def test_heads_for_another_model_are_refused(bigram, tmp_path):
    path = bigram[0]
    GumihoHeads(GumihoConfig(hidden_size=32, vocab_size=100, num_heads=2, intermediate_size=64)).save(str(tmp_path))
    with pytest.raises(InvalidParameterError, match="speculative_model") as err:
        spec_llm(path, str(tmp_path))
    msg = str(err.value)
    assert "hidden size 32" in msg and "vocabulary 100" in msg
    assert f"hidden size 64 and vocabulary {VOCAB}" in msg


def test_gumiho_needs_a_heads_folder(bigram, tmp_path):
    with pytest.raises(InvalidParameterError, match="speculative_model"):
        LLM(bigram[0], num_blocks=32, speculative="gumiho")
    with pytest.raises(InvalidParameterError, match="train-draft"):
        spec_llm(bigram[0], str(tmp_path))


def test_smollm_heads_from_austen_draft_exactly(smollm_folder, smollm_llm, tmp_path, capsys):
    """``tierserve train-draft`` (the CLI) on SmolLM2, then the heads in the engine."""
    argv = ["train-draft", "--model", smollm_folder, "--out", str(tmp_path), "--steps", "12", "--batch-size", "2",
            "--seq-len", "64", "--num-windows", "24", "--lr", "3e-3", "--checkpoint-every", "6", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 12 and summary["last_loss"] < summary["first_loss"]
    llm = LLM(smollm_folder, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=32, speculative="gumiho",
              speculative_model=str(tmp_path), num_speculative_tokens=4)
    prompts_ = ["It is a truth universally acknowledged, that a single man in possession of a good fortune,",
                "The capital of France is"]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ref = smollm_llm.generate(prompts_, params)
    assert [o.token_ids for o in llm.generate(prompts_, params)] == [r.token_ids for r in ref]
    stats = llm.engine.spec_decode_stats()
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0, stats
