"""Test helpers: tiny random HF models saved to disk, and a paged-KV runner for one sequence.

``build_and_save`` makes a transformers model from a config (eager attention,
float32), perturbs every parameter with seeded noise (so norm weights, biases
and Gemma's zero-initialised norms are not at their trivial init and a wrong
mapping shows), and saves it with ``save_pretrained``.

``PagedRunner`` drives one sequence through ``model.forward`` the way the
engine does: each step appends tokens, builds ``AttentionMetadata`` from a
shuffled (non-contiguous) block table and returns the step's logits.
"""

from __future__ import annotations

import os
import random

import torch
from transformers import AutoModelForCausalLM

from tierserve.kernels.kv_pages import allocate_kv_cache
from tierserve.kernels.paged_attention import AttentionMetadata
from tierserve.models.context import ForwardContext


def build_and_save(config, path, seed: int = 0, noise: float = 0.05):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    model.eval()
    model.save_pretrained(path)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def save_tiny_llama(path: str, seed: int = 3, **shape) -> str:
    """Save a random Llama (hidden 64, 2 layers, GQA 4/2 heads, vocabulary 256 unless ``shape`` overrides) and a
    word tokenizer of its vocabulary at ``path``; return ``path``."""
    from transformers import LlamaConfig

    from tierserve.tools.random_model import word_tokenizer

    cfg = LlamaConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=256, max_position_embeddings=128), **shape})
    build_and_save(cfg, path, seed=seed)
    word_tokenizer(cfg.vocab_size).save_pretrained(path)
    return path


def save_tiny_smollm_vocab(path: str, smollm_folder: str, **shape) -> str:
    """Save a random 2-layer Llama (hidden 64, GQA 4/2 heads, tied embeddings unless ``shape`` overrides) over
    SmolLM2's 49152-token vocabulary, with SmolLM2's tokenizer files copied beside it; return ``path``."""
    import shutil

    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                tie_word_embeddings=True), **shape})
    build_and_save(cfg, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(smollm_folder, name), os.path.join(path, name))
    return path


class PagedRunner:
    def __init__(self, model, block_size: int = 4, num_blocks: int = 32, seed: int = 0):
        self.model = model
        self.block_size = block_size
        self.kv = allocate_kv_cache(model.kv_spec(block_size), num_blocks)
        table = list(range(num_blocks))
        random.Random(seed).shuffle(table)
        self.table = table
        self.seq_len = 0

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Append ``tokens`` to the sequence; logits [len(tokens), vocab] float32."""
        n = len(tokens)
        self.seq_len += n
        blocks = self.table[: -(-self.seq_len // self.block_size)]
        meta = AttentionMetadata.build([n], [self.seq_len], [blocks], self.block_size)
        positions = torch.arange(self.seq_len - n, self.seq_len)
        hidden = self.model(torch.tensor(tokens, dtype=torch.long), positions, ForwardContext(meta, self.kv))
        return self.model.compute_logits(hidden)

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        out: list[int] = []
        logits = self.step(prompt)
        for _ in range(max_new_tokens):
            out.append(int(logits[-1].argmax()))
            if len(out) == max_new_tokens:
                break
            logits = self.step([out[-1]])
        return out


#: The tiny random Qwen3-MoE of the expert-offload runtime tests (2 layers x 8 experts, top-2).
TINY_QWEN3_MOE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=384, max_position_embeddings=128, initializer_range=0.1,
                      num_experts_per_tok=2, moe_intermediate_size=48, num_experts=8, norm_topk_prob=True)
MOE_PROMPT = [3, 17, 42, 99, 5, 250, 7, 31, 64, 128, 11, 300]


def tiny_moe_reference(path: str, seed: int, new_tokens: int):
    """Save TINY_QWEN3_MOE at ``path``; return (all-resident model on the auto linear backend, its prefill
    logits for MOE_PROMPT, its greedy tokens, the prefill's expert counts, the ExpertUsage of prefill + greedy)."""
    from transformers import Qwen3MoeConfig

    from tierserve.kernels.cpu_linear import apply_linear_backend
    from tierserve.models.loader import load_model
    from tierserve.offload.usage import ExpertUsage
    from tierserve.offload.usage_hook import attach_usage_recorder

    cfg = TINY_QWEN3_MOE
    build_and_save(Qwen3MoeConfig(**cfg), path, seed=seed, noise=0.2)
    ref = load_model(path).model
    apply_linear_backend(ref, "auto")
    usage = ExpertUsage(cfg["num_hidden_layers"], cfg["num_experts"])
    rec = attach_usage_recorder(ref, usage)
    logits = PagedRunner(ref).step(MOE_PROMPT)
    prefill_counts = [list(row) for row in usage.counts]
    tokens = PagedRunner(ref).greedy(MOE_PROMPT, new_tokens)
    rec.detach()
    return ref, logits, tokens, prefill_counts, usage


def engine_prefill_logits(eng, prompt: list[int]) -> torch.Tensor:
    """The logits of ``prompt``'s last position as the engine's first step computes them (fp32, on the CPU)."""
    from tierserve.engine.model_runner import ModelRunner
    from tierserve.sampling_params import SamplingParams

    captured = {}
    execute = ModelRunner.execute

    def spy(self, out, requests):
        run = execute(self, out, requests)
        captured.setdefault("logits", run.logits.float().cpu())
        return run

    eng.runner.execute = spy.__get__(eng.runner)
    eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    return captured["logits"][0]


def save_tiny_moe(path: str, seed: int) -> str:
    """Save TINY_QWEN3_MOE (parameters perturbed with noise 0.2) and a word tokenizer at ``path``; return it."""
    from transformers import Qwen3MoeConfig

    from tierserve.tools.random_model import word_tokenizer

    build_and_save(Qwen3MoeConfig(**TINY_QWEN3_MOE), path, seed=seed, noise=0.2)
    word_tokenizer(TINY_QWEN3_MOE["vocab_size"]).save_pretrained(path)
    return path


def compressed_engine(folder: str, kv_compression, **engine_kw):
    """An LLMEngine on ``folder`` (``build_engine_config(folder, **engine_kw)``) with ``kv_compression``."""
    import dataclasses

    from tierserve.engine.llm import build_engine_config
    from tierserve.engine.llm_engine import LLMEngine

    cfg = build_engine_config(folder, **engine_kw)
    return LLMEngine(dataclasses.replace(cfg, kv_compression=kv_compression))


def greedy_run(engine, prompts: list[list[int]], max_tokens: int, decode_only: bool = False, after_step=None):
    """Greedy generation of ``prompts`` batched on ``engine`` (temperature 0, ignore_eos), recording the runner's
    raw logits: (tokens per prompt, logits [rows, vocab] of each step that computed logits, fp32 on the CPU).
    ``decode_only`` keeps only steps in which every scheduled sequence decoded one token; ``after_step(engine,
    request_ids)`` runs after each step. The runner's ``execute`` is restored afterwards."""
    from tierserve.sampling_params import SamplingParams

    logits: list[torch.Tensor] = []
    execute = engine.runner.execute

    def recording(out, requests):  # records the real output, changes nothing
        run = execute(out, requests)
        if run.logits is not None and not (decode_only and any(s.num_tokens != 1 for s in out.scheduled)):
            logits.append(run.logits.float().cpu().clone())
        return run

    engine.runner.execute = recording
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        ids = [engine.add_request(p, params) for p in prompts]
        tokens: dict = {i: [] for i in ids}
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
            if after_step is not None:
                after_step(engine, ids)
    finally:
        engine.runner.execute = execute
    return [tokens[i] for i in ids], logits
