"""The engine on CUDA against the CPU fp32 path (``cuda`` marker: skipped without a GPU; run by
benchmarks/device_check.sh). The CPU twin of the triton path is tests/test_engine_triton_attention.py.

Model: a random-weight Llama (4 layers, hidden 256, GQA 8/2, vocab 1024) with a word tokenizer, built here.
- bf16 on CUDA vs fp32 on the CPU, one prefill of 24 tokens: the relative L2 error of the last logits is
  bounded by 8 * 2^-8 * sqrt(layers) = 0.0625: bf16 keeps 8 mantissa bits (unit roundoff 2^-9, a factor 2
  for the weights' and the activations' rounding), the error of a residual stream grows like the square root
  of the number of layers it passes, and a factor 4 covers the amplification by the norms and the softmax.
- fp32 on CUDA (triton attention, CUDA graphs, the eager path) vs fp32 on the CPU: greedy tokens identical.
- a Q4_0 / NVFP4 checkpoint of the same model (tierserve quantize) on CUDA: every packed linear is a triton
  kernel module, bf16 logits within the same bound of the CPU fp32 path over the same packed weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig

from model_harness import build_and_save, engine_prefill_logits
from tierserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tierserve.engine.llm_engine import LLMEngine
from tierserve.sampling_params import SamplingParams
from tierserve.tools.random_model import word_tokenizer

pytestmark = pytest.mark.cuda
LAYERS = 4
PROMPTS = [[(7 * i + 3) % 1000 + 1 for i in range(24)], [(11 * i + 5) % 1000 + 1 for i in range(40)], [9, 8, 7]]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny_llama_cuda"))
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512)
    build_and_save(cfg, path, seed=3)
    word_tokenizer(cfg.vocab_size).save_pretrained(path)
    return path


def _engine(folder, device, dtype, eager=False) -> LLMEngine:
    return LLMEngine(EngineConfig(model=ModelConfig(model=folder, dtype=dtype, enforce_eager=eager), device=device,
                                  cache=CacheConfig(num_blocks=64, block_size=16),
                                  scheduler=SchedulerConfig(max_num_seqs=8)))


def _greedy(eng: LLMEngine) -> list[list[int]]:
    ids = [eng.add_request(p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)) for p in PROMPTS]
    out = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            out[o.request_id].extend(o.new_token_ids)
    return [out[i] for i in ids]


def test_bf16_cuda_logits_within_bf16_bound_of_cpu_fp32(tiny_llama):
    cpu = engine_prefill_logits(_engine(tiny_llama, "cpu", "float32"), PROMPTS[0])
    gpu = engine_prefill_logits(_engine(tiny_llama, "cuda", "bfloat16"), PROMPTS[0])
    rel = float((gpu - cpu).norm() / cpu.norm())
    assert rel <= 8 * 2 ** -8 * math.sqrt(LAYERS), rel


def test_fp32_cuda_greedy_tokens_equal_cpu(tiny_llama):
    cpu = _greedy(_engine(tiny_llama, "cpu", "float32"))
    graphs = _engine(tiny_llama, "cuda", "float32")
    assert graphs.runner.graphs is not None  # decode steps replay CUDA graphs
    assert _greedy(graphs) == cpu
    assert _greedy(_engine(tiny_llama, "cuda", "float32", eager=True)) == cpu


def test_weights_and_pages_live_on_the_device(tiny_llama):
    eng = _engine(tiny_llama, "cuda", "bfloat16")
    assert {p.device.type for p in eng.model.parameters()} == {"cuda"}
    assert {p.dtype for p in eng.model.parameters()} == {torch.bfloat16}
    assert eng.runner.kv_caches[0].k.is_cuda and eng.runner.block_tables.table.is_cuda
    assert not eng.runner.block_tables.host.is_cuda


def _quantized_engine(folder, device, dtype) -> LLMEngine:
    return LLMEngine(EngineConfig(model=ModelConfig(model=folder, dtype=dtype, quantization="auto"), device=device,
                                  cache=CacheConfig(num_blocks=64, block_size=16),
                                  scheduler=SchedulerConfig(max_num_seqs=8)))


@pytest.mark.parametrize("scheme", ["q4_0", "nvfp4"])
def test_quantized_checkpoint_served_by_the_triton_kernels(tiny_llama, tmp_path, scheme):
    """A quantized checkpoint on CUDA: every packed linear runs its triton kernel module (gpu_linear), and
    the bf16 logits stay within the bf16 bound of the CPU fp32 path over the same packed weights."""
    from tierserve.kernels.gpu_linear import TritonLinear
    from tierserve.kernels.quant.base import QuantizedLinear
    from tierserve.models.quantized_checkpoint import load_for_engine
    from tierserve.tools.quantize import quantize_checkpoint

    out = str(tmp_path / scheme)
    quantize_checkpoint(tiny_llama, out, scheme, {})
    packed = load_for_engine(out, torch.float32, "auto").model
    n_packed = len({id(m) for m in packed.modules() if isinstance(m, QuantizedLinear)})
    assert n_packed >= 4 * LAYERS  # at least qkv, o, gate_up, down of every layer
    cpu = engine_prefill_logits(_quantized_engine(out, "cpu", "float32"), PROMPTS[0])
    eng = _quantized_engine(out, "cuda", "bfloat16")
    assert len({id(m) for m in eng.model.modules() if isinstance(m, TritonLinear)}) == n_packed
    assert not any(isinstance(m, QuantizedLinear) for m in eng.model.modules())
    gpu = engine_prefill_logits(eng, PROMPTS[0])
    rel = float((gpu - cpu).norm() / cpu.norm())
    assert rel <= 8 * 2 ** -8 * math.sqrt(LAYERS), rel
