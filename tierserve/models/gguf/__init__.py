"""The engine's own GGUF loader: parse, dequantise, map to HF names and config.

    g = read_gguf(path)                  # header + memory-mapped data
    g.load("blk.0.attn_q.weight")        # float32 torch tensor, row-major
    gguf_to_hf_config(g)                 # HF config.json dict
    for name, t in iter_gguf_hf_tensors(g): ...   # HF names, fp32, one at a time
"""

from tierserve.models.gguf.dequant import SUPPORTED_GGML_TYPES, dequantize
from tierserve.models.gguf.hf_mapping import gguf_to_hf_config, iter_gguf_hf_tensors
from tierserve.models.gguf.reader import GGUFFile, GGUFTensorInfo, read_gguf
from tierserve.models.gguf.tokenizer import write_hf_tokenizer

__all__ = [
    "GGUFFile", "GGUFTensorInfo", "SUPPORTED_GGML_TYPES", "dequantize", "gguf_to_hf_config",
    "iter_gguf_hf_tensors", "read_gguf", "write_hf_tokenizer",
]
