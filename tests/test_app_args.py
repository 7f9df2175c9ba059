"""The serve command line and the Serve app's args reach the engine config unchanged (offload included).

Flags and Serve keys are generated from the config dataclasses (tierserve/config_fields.py): every engine
option and every serving option (server/serve_options.py) is a flag of ``serve``, every engine option a flag of
``generate``, and every one a key of AppArgs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tierserve.cli import _build_parser, _engine_kwargs, serve_args
from tierserve.config import EngineConfig, OffloadConfig
from tierserve.config_fields import flat_values, options
from tierserve.engine.llm import build_engine_config
from tierserve.errors import InvalidParameterError
from tierserve.server.app_args import AppArgs
from tierserve.server.serve_options import ServeOptions


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
    assert gen.kv_compression == ("kv4",)
    both = _build_parser().parse_args(["serve", "--kv-compression", "kv4,expected_attention", "--kv-ratio", "0.5"])
    assert engine_config_of(serve_args(both, api_key=None)).kv_compression.methods == ("kv4", "expected_attention")
    streaming = _build_parser().parse_args(["serve", "--kv-compression", "streaming"])
    with pytest.raises(InvalidParameterError, match="kv_budget"):
        build_engine_config(streaming.model, **_engine_kwargs(streaming))
    with pytest.raises(ValidationError, match="kv_budget"):  # AppArgs builds the config: refused at the YAML edge
        engine_config_of(serve_args(streaming, None))


def flags_of(command: str) -> set[str]:
    sub = next(a for a in _build_parser()._actions if a.dest == "command")
    return {flag for action in sub.choices[command]._actions for flag in action.option_strings}


def test_every_option_is_a_flag_and_a_serve_key():
    engine, serving = options(EngineConfig), options(ServeOptions)
    assert {o.flag for o in engine} <= flags_of("generate")
    assert {o.flag for o in (*engine, *serving)} <= flags_of("serve")
    assert set(AppArgs.model_fields) == {o.name for o in (*engine, *serving)}
    # the established spellings still parse
    assert {"--kv-budget", "--kv-ratio", "--kv-dram-gib", "--resident-experts", "--expert-hosts",
            "--no-prefix-caching", "--threads", "--max-replicas", "--api-key", "--max-body-bytes"} <= flags_of("serve")
    assert {o.name: o.default for o in engine} == flat_values(EngineConfig())
    assert AppArgs.model_validate({}).engine_config() == EngineConfig()
    assert AppArgs.model_validate({}).serve_options() == ServeOptions()


OFFLOAD_FLAGS = ["--resident-experts", "9", "--offload-channel", "ray", "--offload-spare-slots", "2",
                 "--offload-promotion-min-gain", "8", "--offload-promotion-max-swaps", "0",
                 "--offload-host-weight-format", "dfloat11", "--offload-timeout-s", "5",
                 "--offload-per-layer-floor", "1", "--offload-usage-path", "/u.json"]
OFFLOAD = OffloadConfig(resident_experts=9, channel="ray", spare_slots=2, promotion_min_gain=8,
                        promotion_max_swaps=0, host_weight_format="dfloat11", timeout_s=5.0, per_layer_floor=1,
                        usage_path="/u.json")


def test_offload_flags_reach_the_config_through_generate_serve_and_yaml():
    gen = _build_parser().parse_args(["generate", "hi", *OFFLOAD_FLAGS])
    assert build_engine_config(gen.model, **_engine_kwargs(gen)).offload == OFFLOAD
    app_args = serve_args(_build_parser().parse_args(["serve", *OFFLOAD_FLAGS, "--no-prefix-caching",
                                                      "--router", "pow2", "--max-replicas", "3"]), api_key="k")
    a = AppArgs.model_validate(app_args)
    assert a.engine_config().offload == OFFLOAD and not a.engine_config().cache.enable_prefix_caching
    assert (a.serve_options().router, a.serve_options().max_replicas, a.serve_options().api_key) == ("pow2", 3, "k")
    yaml_args = {"resident_experts": 9, "offload_channel": "ray", "offload_spare_slots": 2,
                 "offload_promotion_min_gain": 8, "offload_promotion_max_swaps": 0,
                 "offload_host_weight_format": "dfloat11", "offload_timeout_s": 5, "offload_per_layer_floor": 1,
                 "offload_usage_path": "/u.json"}
    assert AppArgs.model_validate(yaml_args).engine_config().offload == OFFLOAD


def test_yaml_kv_tiers_take_a_list_or_a_string():
    for tiers in (["redis", "dram"], "dram,redis"):
        cfg = AppArgs.model_validate({"kv_tiers": tiers, "kv_redis_url": "redis://h:1"}).engine_config()
        assert cfg.kv_tiers.tiers == ("dram", "redis")


def test_unknown_yaml_key_is_rejected_by_name():
    with pytest.raises(ValidationError, match="spare_slots") as err:
        AppArgs.model_validate({"spare_slots": 2})  # the option is offload_spare_slots
    assert "Extra inputs are not permitted" in str(err.value)
    with pytest.raises(ValidationError, match="kv_tier_sizes"):
        AppArgs.model_validate({"kv_tier_sizes": 1})
    with pytest.raises(InvalidParameterError) as bad:
        build_engine_config(None, spare_slots=2)
    assert bad.value.field == "spare_slots"


@pytest.mark.parametrize("args,field", [
    ({"offload_channel": "tcp"}, "offload_channel"),          # not a choice
    ({"kv_compression": "zip"}, "kv_compression"),
    ({"kv_tiers": ["dram", "tape"]}, "kv_tiers"),
    ({"quantization": "q3_k"}, "quantization"),
    ({"router": "random"}, "router"),
    ({"offload_spare_slots": -1}, "offload_spare_slots"),     # out of range
    ({"offload_promotion_min_gain": 0}, "offload_promotion_min_gain"),
    ({"kv_redis_timeout_s": 0}, "kv_redis_timeout_s"),
    ({"block_size": 12}, "block_size"),
    ({"replicas": 0}, "replicas"),
    ({"replicas": 5, "max_replicas": 4}, "replicas"),
    ({"min_replicas": 1}, "min_replicas"),
    ({"router_min_match_ratio": 1.5}, "router_min_match_ratio"),
    ({"max_num_seqs": "many"}, "max_num_seqs"),                # wrong type
])
def test_bad_yaml_values_name_the_field(args, field):
    with pytest.raises(ValidationError, match=field):
        AppArgs.model_validate(args)


@pytest.mark.parametrize("argv,flag", [(["--offload-channel", "tcp"], "--offload-channel"),
                                       (["--kv-compression", "zip"], "--kv-compression"),
                                       (["--router", "random"], "--router")])
def test_bad_serve_flags_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        _build_parser().parse_args(["serve", *argv])
    assert flag in capsys.readouterr().err


def test_generate_keeps_its_sampling_seed_apart_from_the_engine_seed():
    args = _build_parser().parse_args(["generate", "hi", "--seed", "3", "--engine-seed", "5"])
    assert args.sampling_seed == 3 and build_engine_config(None, **_engine_kwargs(args)).seed == 5


def test_gpu_flags_reach_engine_and_replica_options():
    """--device and --attention-backend reach the engine config; --worker-gpus reserves GPUs for each replica."""
    args = _build_parser().parse_args(["serve", "--device", "cuda:0", "--attention-backend", "triton",
                                       "--enforce-eager", "--worker-gpus", "1"])
    a = AppArgs.model_validate(serve_args(args, api_key=None))
    cfg = a.engine_config()
    assert (cfg.device, cfg.model.attention_backend, cfg.model.enforce_eager) == ("cuda:0", "triton", True)
    assert a.serve_options().worker_gpus == 1
    with pytest.raises(ValidationError, match="device"):
        AppArgs.model_validate({"device": "tpu"})
    with pytest.raises(ValidationError, match="worker_gpus"):
        AppArgs.model_validate({"worker_gpus": -1})
