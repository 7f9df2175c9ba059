"""CausalLM base: embedding, LM head, logits, checkpoint loading and the KV layout of a decoder.

Contract the engine relies on (every architecture class subclasses this):

- ``forward(input_ids [T], positions [T], ctx) -> hidden [T, hidden]`` (subclass).
- ``compute_logits(hidden [N, hidden]) -> [N, vocab] float32``: ``lm_head`` (the
  embedding matrix itself when ``tie_word_embeddings``), then final-logit
  soft-capping ``c * tanh(z / c)`` when the config sets ``final_logit_softcapping``.
- ``load_weights(iterable of (hf_name, tensor))``: every HF name must map to a
  ``Slot`` (see ``layers.py``); the tensor is copied (and cast) into it, one
  tensor at a time. A name that maps nowhere, a shape that differs from its
  slot, or a slot left unfilled raises ModelLoadError naming the tensor (and
  both shapes). Names ending in an entry of the class's ``ignored_hf_suffixes``
  are skipped on purpose (buffers some checkpoints carry that we recompute,
  e.g. ``rotary_emb.inv_freq``); with tied embeddings ``lm_head.weight`` is
  skipped too, since the head is the embedding tensor.
- ``kv_spec(block_size) -> KVSpec``.
- ``supports_cuda_graphs()``: False when a submodule is not ``graph_capturable`` (below): such a
  module synchronises with the host in its forward.
- ``graph_capturable(module)``: False exactly for a module that declares ``graph_capturable = False``
  (the resident ``SparseMoeBlock``: its routing sizes expert batches on the host; the expert-offload
  block, which also plans its dispatch on the host). A model whose only such modules are MoE blocks
  decodes with piecewise CUDA graphs around them (tierserve/engine/piecewise_graphs.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tierserve.kernels.kv_spec import KVSpec
from tierserve.errors import ModelLoadError
from tierserve.models.arch_config import ModelArchConfig
from tierserve.models.layers import Slot, linear

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class CausalLMBase(nn.Module):
    ignored_hf_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        if dtype not in _DTYPE_NAMES:
            raise ModelLoadError(f"dtype {dtype} is not supported; supported: {list(_DTYPE_NAMES.values())}")
        self.cfg = cfg
        self.dtype = dtype
        self.embed_tokens = torch.nn.utils.skip_init(nn.Embedding, cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                                     device=torch.get_default_device())
        self.lm_head = None if cfg.tie_word_embeddings else linear(cfg.hidden_size, cfg.vocab_size, False, dtype)
        # the projection compute_logits runs: a module, so backends can swap it like any linear
        self.logits_head = TiedLMHead(self.embed_tokens) if self.lm_head is None else self.lm_head

    def supports_cuda_graphs(self) -> bool:
        """Whether a whole forward can be captured in one CUDA graph: every submodule is ``graph_capturable``."""
        return all(graph_capturable(m) for m in self.modules())

    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.logits_head(hidden).float()
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def kv_spec(self, block_size: int) -> KVSpec:
        return KVSpec(num_layers=self.cfg.num_hidden_layers, num_kv_heads=self.cfg.num_key_value_heads,
                      head_dim=self.cfg.head_dim, block_size=block_size, dtype=_DTYPE_NAMES[self.dtype],
                      hidden_size=self.cfg.hidden_size)

    def hf_slots(self) -> dict[str, Slot]:
        """HF tensor name -> Slot for the whole model (subclasses add their layers)."""
        slots = {"model.embed_tokens.weight": Slot(self.embed_tokens.weight)}
        if self.lm_head is not None:
            slots["lm_head.weight"] = Slot(self.lm_head.weight)
        return slots

    def _ignored(self, name: str) -> bool:
        if self.lm_head is None and name == "lm_head.weight":
            return True
        return name.endswith(self.ignored_hf_suffixes)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], filled: Iterable[str] = ()) -> None:
        """Copy each (hf_name, tensor) into its slot; ``filled`` names slots another path already set."""
        slots = self.hf_slots()
        loaded: set[str] = set(filled)
        for name, tensor in weights:
            if self._ignored(name) or name in loaded:
                continue
            slot = slots.get(name)
            if slot is None:
                raise ModelLoadError(f"unexpected tensor {name!r} (shape {list(tensor.shape)}) for "
                                     f"{self.cfg.architecture}")
            target = slot.target()
            if tuple(tensor.shape) != tuple(target.shape):
                raise ModelLoadError(f"tensor {name!r} has shape {list(tensor.shape)} but the model expects "
                                     f"{list(target.shape)}")
            target.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(slots) - loaded)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ModelLoadError(f"checkpoint is missing tensor {missing[0]!r} for {self.cfg.architecture}: "
                                 f"missing {missing[:5]}{more}")


def graph_capturable(module: nn.Module) -> bool:
    """Whether ``module``'s own forward can run inside a CUDA graph (module doc); submodules not included."""
    return bool(getattr(module, "graph_capturable", True))


class TiedLMHead(nn.Module):
    """The LM head of a model with tied embeddings: ``hidden @ E^T`` over the embedding matrix."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = [embedding]  # not a submodule: the embedding is registered by the model

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding[0].weight

    bias = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight)

