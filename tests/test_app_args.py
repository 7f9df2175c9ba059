"""The serve command line and the Serve app's args reach the engine config unchanged (offload included)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tierserve.cli import _build_parser, serve_args
from tierserve.engine.llm import build_engine_config
from tierserve.errors import InvalidParameterError
from tierserve.server.app import AppArgs


def engine_config_of(app_args: dict):
    a = AppArgs.model_validate(app_args)
    fields = {k: getattr(a, k) for k in ("dtype", "max_model_len", "block_size", "num_blocks",
                                         "kv_cache_memory_gib", "enable_prefix_caching", "max_num_seqs",
                                         "max_num_batched_tokens", "num_threads", "linear_backend",
                                         "quantization", "resident_experts", "expert_hosts", "kv_tiers",
                                         "kv_dram_gib", "kv_redis_url", "kv_compression", "kv_budget", "kv_ratio")}
    return build_engine_config(a.model, **fields)


def test_serve_flags_reach_offload_config():
    args = _build_parser().parse_args(["serve", "--model", "/m", "--resident-experts", "12", "--expert-hosts", "3",
                                       "--max-num-seqs", "7", "--threads", "1"])
    app_args = serve_args(args, api_key=None)
    assert app_args["resident_experts"] == 12 and app_args["expert_hosts"] == 3
    cfg = engine_config_of(app_args)
    assert cfg.offload.enabled
    assert (cfg.offload.resident_experts, cfg.offload.expert_hosts) == (12, 3)
    assert cfg.scheduler.max_num_seqs == 7 and cfg.num_threads == 1 and cfg.model.model == "/m"


def test_offload_off_by_default():
    cfg = engine_config_of(serve_args(_build_parser().parse_args(["serve"]), api_key=None))
    assert not cfg.offload.enabled and cfg.offload.expert_hosts == 2


def test_bad_offload_args_name_the_field():
    with pytest.raises(ValidationError, match="expert_hosts"):
        AppArgs.model_validate({"resident_experts": 4, "expert_hosts": 0})
    with pytest.raises(ValidationError, match="resident_experts"):
        AppArgs.model_validate({"resident_experts": -1})
    with pytest.raises(InvalidParameterError, match="expert_hosts"):
        build_engine_config(None, resident_experts=4, expert_hosts=0)


def test_kv_flags_reach_engine_config():
    args = _build_parser().parse_args(["serve", "--kv-tiers", "dram,redis", "--kv-dram-gib", "2",
                                       "--kv-redis-url", "redis://127.0.0.1:6399", "--kv-compression",
                                       "paged_eviction", "--kv-budget", "256"])
    cfg = engine_config_of(serve_args(args, api_key=None))
    assert cfg.kv_tiers.tiers == ("dram", "redis") and cfg.kv_tiers.dram_gib == 2.0
    assert cfg.kv_tiers.redis_url == "redis://127.0.0.1:6399"
    assert (cfg.kv_compression.method, cfg.kv_compression.budget, cfg.kv_compression.ratio) == \
        ("paged_eviction", 256, None)
    gen = _build_parser().parse_args(["generate", "hi", "--kv-compression", "kv4"])
    assert gen.kv_compression == "kv4"
    with pytest.raises(InvalidParameterError, match="kv_budget"):
        engine_config_of(serve_args(_build_parser().parse_args(["serve", "--kv-compression", "streaming"]), None))
