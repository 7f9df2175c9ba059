"""LLM: offline batch generation over the step loop (vLLM's ``LLM`` shape)."""

from __future__ import annotations

from collections.abc import Sequence

from tierserve.config import EngineConfig
from tierserve.config_fields import build_config
from tierserve.engine.llm_engine import LLMEngine
from tierserve.engine.outputs import CompletionOutput
from tierserve.sampling_params import SamplingParams


def build_engine_config(model: str | None = None, **options) -> EngineConfig:
    """The EngineConfig of flat options: the names of ``config_fields.options(EngineConfig)``.

    The same names are the CLI flags (``--kv-dram-gib``) and Serve YAML keys
    (``kv_dram_gib``); they are derived from the config dataclasses
    (tierserve/config.py), so this accepts exactly those and raises
    InvalidParameterError naming an unknown one. ``resident_experts`` (None:
    every expert resident) turns on MoE expert offload over ``expert_hosts``
    expert hosts (local processes; pass ``host_launcher`` to ``LLM`` for others,
    e.g. tierserve.actors.ray_launcher.RayHostLauncher on a Ray cluster);
    ``kv_tiers`` takes ``"dram,disk"`` or a tuple.
    """
    return build_config(EngineConfig, {"model": model, **options})


class LLM:
    """``LLM(model=...).generate(prompts, params)``: all prompts run together, continuously batched."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, host_launcher=None,
                 **kwargs):
        self.engine = LLMEngine(config or build_engine_config(model, **kwargs), host_launcher=host_launcher)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[CompletionOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        ids = []
        try:
            for prompt, p in zip(prompts, params_list):
                ids.append(self.engine.add_request(prompt, p))
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        results = {rid: _Collect(rid, self.engine.get_request(rid).prompt_token_ids) for rid in ids}
        while any(not r.finished for r in results.values()):
            for out in self.engine.step():
                results[out.request_id].add(out)
        return [results[rid].result() for rid in ids]


class _Collect:
    def __init__(self, request_id: str, prompt_ids: list[int]):
        self.request_id, self.prompt_ids = request_id, list(prompt_ids)
        self.tokens: list[int] = []
        self.text: list[str] = []
        self.logprobs: list = []
        self.finished = False
        self.reason: str | None = None
        self.cached = 0

    def add(self, out) -> None:
        self.tokens.extend(out.new_token_ids)
        self.text.append(out.new_text)
        self.logprobs.extend(out.new_logprobs)
        self.cached = out.num_cached_tokens
        if out.finished:
            self.finished, self.reason = True, out.finish_reason

    def result(self) -> CompletionOutput:
        return CompletionOutput(self.request_id, self.prompt_ids, self.tokens, "".join(self.text),
                                self.reason, self.logprobs or None, self.cached)
