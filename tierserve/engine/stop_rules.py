"""When a request stops (checked after each sampled token, in this order).

1. a stop token: eos (unless ``ignore_eos``) or one of ``stop_token_ids``,
   only once ``min_tokens`` outputs exist -> "stop";
2. a stop string matched by the detokenizer -> "stop";
3. ``max_tokens`` outputs, or the sequence reaching ``max_model_len`` -> "length".
"""

from __future__ import annotations

from dataclasses import dataclass

from tierserve.engine.request import Request, RequestStatus
from tierserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class StopRules:
    eos_ids: frozenset[int]
    max_model_len: int

    @classmethod
    def from_model(cls, tokenizer, hf_config: dict, max_model_len: int) -> "StopRules":
        ids: set[int] = set()
        for value in (getattr(tokenizer, "eos_token_id", None), hf_config.get("eos_token_id")):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return cls(frozenset(ids), max_model_len)

    def stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= self.eos_ids
        return ids

    def check(self, req: Request, token: int, stop_string: str | None):
        params = req.params
        n_out = len(req.output_token_ids)
        if n_out >= params.min_tokens:
            if token in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token
            if not params.ignore_eos and token in self.eos_ids:
                return RequestStatus.FINISHED_STOPPED, None
        if stop_string is not None:
            return RequestStatus.FINISHED_STOPPED, stop_string
        if n_out >= params.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None
