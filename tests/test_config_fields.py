"""tierserve/config_fields.py: the flat options derived from the config dataclasses (names, flags, types,
choices from the registries, the reverse mapping and its errors). Pure Python except where a registry is read."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

import pytest

from tierserve.config import EngineConfig, KVCompressionConfig, OffloadConfig
from tierserve.config_fields import (add_arguments, build_config, flat_values, namespace_values, option, options,
                                     split_commas)
from tierserve.errors import InvalidParameterError


def leaf_paths(cls: type, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf field of a nested config dataclass, walked here independently of the generator."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaf_paths(hints[f.name], path + (f.name,))
        else:
            out.append(path + (f.name,))
    return out


def test_every_config_field_is_one_option_with_help():
    opts = options(EngineConfig)
    assert [o.path for o in opts] == leaf_paths(EngineConfig)
    assert len({o.name for o in opts}) == len({o.flag for o in opts}) == len(opts)
    assert all(o.help for o in opts)
    for o in opts:  # the option default is the dataclass default
        value = EngineConfig()
        for part in o.path:
            value = getattr(value, part)
        assert o.default == value, o.name


def test_names_and_flags_keep_the_established_spellings():
    by_path = {o.path: o for o in options(EngineConfig)}
    expected = {
        ("model", "model"): ("model", "--model"),
        ("cache", "enable_prefix_caching"): ("enable_prefix_caching", "--prefix-caching"),
        ("cache", "kv_cache_memory_gib"): ("kv_cache_memory_gib", "--kv-cache-memory-gib"),
        ("scheduler", "max_num_seqs"): ("max_num_seqs", "--max-num-seqs"),
        ("offload", "resident_experts"): ("resident_experts", "--resident-experts"),
        ("offload", "expert_hosts"): ("expert_hosts", "--expert-hosts"),
        ("offload", "channel"): ("offload_channel", "--offload-channel"),
        ("offload", "spare_slots"): ("offload_spare_slots", "--offload-spare-slots"),
        ("kv_compression", "methods"): ("kv_compression", "--kv-compression"),
        ("kv_compression", "budget"): ("kv_budget", "--kv-budget"),
        ("kv_compression", "ratio"): ("kv_ratio", "--kv-ratio"),
        ("kv_tiers", "tiers"): ("kv_tiers", "--kv-tiers"),
        ("kv_tiers", "dram_gib"): ("kv_dram_gib", "--kv-dram-gib"),
        ("num_threads",): ("num_threads", "--threads"),
        ("seed",): ("seed", "--engine-seed"),
    }
    assert {p: (by_path[p].name, by_path[p].flag) for p in expected} == expected


def test_choices_come_from_the_registries():
    from tierserve.cache.compress.base import KV_COMPRESSORS
    from tierserve.cache.tiers.config import TIER_ORDER
    from tierserve.kernels.cpu_linear import LINEAR_BACKENDS
    from tierserve.kernels.quant.base import WEIGHT_FORMATS
    from tierserve.offload.host_storage import HOST_WEIGHT_FORMATS

    choices = {o.name: o.choices() for o in options(EngineConfig)}
    assert choices["quantization"] == ("auto", "none", *sorted(WEIGHT_FORMATS))
    assert choices["kv_compression"] == ("none", *sorted(KV_COMPRESSORS))
    assert set(choices["linear_backend"]) == set(LINEAR_BACKENDS)
    assert set(choices["offload_host_weight_format"]) == set(HOST_WEIGHT_FORMATS)
    assert choices["kv_tiers"] == TIER_ORDER
    assert {"float32", "bfloat16", "float16"} <= set(choices["dtype"]) and "int8" not in choices["dtype"]
    assert choices["block_size"] is None


def test_build_config_round_trips_flat_values():
    values = {"model": "/m", "offload_channel": "ray", "offload_spare_slots": 3, "offload_promotion_min_gain": 5,
              "offload_promotion_max_swaps": 0, "resident_experts": 7, "kv_tiers": "redis, dram",
              "kv_redis_url": "redis://127.0.0.1:1", "kv_compression": "streaming", "kv_budget": 64,
              "enable_prefix_caching": False, "num_threads": 2}
    cfg = build_config(EngineConfig, values)
    assert cfg.offload == OffloadConfig(resident_experts=7, channel="ray", spare_slots=3, promotion_min_gain=5,
                                        promotion_max_swaps=0)
    assert cfg.kv_tiers.tiers == ("dram", "redis")  # a string splits; the config orders the tiers
    assert cfg.kv_compression == KVCompressionConfig("streaming", budget=64)
    assert (cfg.model.model, cfg.cache.enable_prefix_caching, cfg.num_threads) == ("/m", False, 2)
    flat = flat_values(cfg)
    assert build_config(EngineConfig, flat) == cfg
    assert flat["offload_channel"] == "ray" and flat["kv_tiers"] == ("dram", "redis")
    assert build_config(EngineConfig, {}) == EngineConfig()


def test_errors_name_the_option():
    with pytest.raises(InvalidParameterError) as err:
        build_config(EngineConfig, {"offload_spare_slots": -1})
    assert err.value.field == "offload_spare_slots" and "-1" in str(err.value)
    with pytest.raises(InvalidParameterError) as err:
        build_config(EngineConfig, {"offload_channel": "tcp"})
    assert err.value.field == "offload_channel" and "'socket', 'ray'" in str(err.value)
    with pytest.raises(InvalidParameterError) as err:
        build_config(EngineConfig, {"offload_promotion_min_gain": 0})
    assert err.value.field == "offload_promotion_min_gain"
    with pytest.raises(InvalidParameterError) as err:
        build_config(EngineConfig, {"kv_dram_gib": 0})
    assert err.value.field == "kv_dram_gib"
    with pytest.raises(InvalidParameterError) as err:
        build_config(EngineConfig, {"kv_compression": "zip"})
    assert err.value.field == "kv_compression"
    with pytest.raises(InvalidParameterError) as err:
        build_config(EngineConfig, {"num_threads": 0})
    assert err.value.field == "num_threads"
    with pytest.raises(InvalidParameterError) as err:
        build_config(EngineConfig, {"channel": "ray"})  # a field name is not an option name
    assert err.value.field == "channel" and "offload_channel" in str(err.value)


def test_engine_option_flags_parse_into_the_config():
    parser = argparse.ArgumentParser()
    add_arguments(parser, options(EngineConfig))
    args = parser.parse_args(["--offload-channel", "ray", "--offload-spare-slots", "4", "--no-prefix-caching",
                              "--offload-promotion-max-swaps", "1", "--offload-usage-path", "/u.json",
                              "--kv-tiers", "dram,disk", "--kv-disk-path", "/d", "--threads", "3"])
    cfg = build_config(EngineConfig, namespace_values(args, options(EngineConfig)))
    assert (cfg.offload.channel, cfg.offload.spare_slots, cfg.offload.promotion_max_swaps) == ("ray", 4, 1)
    assert cfg.offload.usage_path == "/u.json" and not cfg.cache.enable_prefix_caching
    assert cfg.kv_tiers.tiers == ("dram", "disk") and cfg.kv_tiers.disk_path == "/d" and cfg.num_threads == 3
    assert build_config(EngineConfig, namespace_values(parser.parse_args([]), options(EngineConfig))) == \
        EngineConfig()


@pytest.mark.parametrize("argv,flag", [(["--offload-channel", "tcp"], "--offload-channel"),
                                       (["--kv-tiers", "dram,tape"], "--kv-tiers"),
                                       (["--dtype", "int8"], "--dtype"),
                                       (["--offload-spare-slots", "two"], "--offload-spare-slots")])
def test_bad_flags_are_refused_naming_the_flag(argv, flag, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser, options(EngineConfig))
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert flag in capsys.readouterr().err


# ------------------------------------------------------------- the generator on toy dataclasses
@dataclass(frozen=True)
class _Inner:
    size: int = option(1, "inner size")
    names: tuple[str, ...] = option(("a",), "names", choices=("a", "b"))


@dataclass(frozen=True)
class _Outer:
    inner: _Inner = field(default_factory=_Inner, metadata={"prefix": "in_"})
    size: int | None = option(None, "outer size", flag="outer")
    on: bool = option(False, "a switch")


def test_generator_prefixes_flags_and_bools():
    opts = options(_Outer)
    assert [(o.name, o.flag, o.path, o.kind, o.optional) for o in opts] == [
        ("in_size", "--in-size", ("inner", "size"), int, False),
        ("in_names", "--in-names", ("inner", "names"), tuple, False),
        ("size", "--outer", ("size",), int, True),
        ("on", "--on", ("on",), bool, False)]
    parser = argparse.ArgumentParser()
    add_arguments(parser, opts)
    assert namespace_values(parser.parse_args(["--in-names", "b,a", "--outer", "5", "--on"]), opts) == \
        {"in_size": 1, "in_names": ("b", "a"), "size": 5, "on": True}
    assert build_config(_Outer, {"in_names": "b", "on": True}) == _Outer(_Inner(names=("b",)), on=True)
    assert split_commas(" a, ,b ") == ("a", "b") and split_commas("") == ()


@dataclass(frozen=True)
class _NoHelp:
    size: int = 1


@dataclass(frozen=True)
class _BadType:
    table: dict = option(None, "a mapping")


@dataclass(frozen=True)
class _Clash:
    a: _Inner = field(default_factory=_Inner)
    size: int = option(2, "clashes with a.size")


@pytest.mark.parametrize("cls,message", [(_NoHelp, "_NoHelp.size: an option needs metadata 'help'"),
                                         (_BadType, "_BadType.table: unsupported option type"),
                                         (_Clash, "option name 'size' is used by both a.size and size")])
def test_generator_refuses_what_it_cannot_derive(cls, message):
    with pytest.raises(TypeError, match=message):
        options(cls)
