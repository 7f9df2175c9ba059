"""LLMEngine: the synchronous step loop of one replica.

``step()`` is schedule -> hooks -> run -> hooks -> postprocess. Requests
enter through ``add_request`` (validated and tokenized there, so a bad
request fails alone and never reaches the batch), leave when a stop rule
fires or through ``abort``. Everything a step returns is a list of
RequestOutput diffs.

Optional subsystems join through the step-hook contract
(tierserve/step/hooks.py), built from the config in this order: KV tiers
(DRAM/disk/Redis chunk store, also the scheduler's external prefix source),
KV eviction, expert offload. ``step()`` calls every hook at the same points
and has no branch per subsystem.

Speculative decoding (tierserve/engine/spec_decode/, ``--speculative``) is
part of postprocess, not a hook: after a request samples, its proposer's
drafts become the next step's ``Request.spec_token_ids``; the scheduler
schedules them, the runner returns logits for every verified position, and
postprocess appends the accepted tokens (stop rules checked after each) and
rolls the rejected drafts' KV back (``Scheduler.rollback``,
``ModelRunner.truncate``). A proposer that drafts from the target's hidden
states (gumiho) gets the step's hidden states after the forward
(``SpecDecoder.begin_step``; the runner then keeps them and runs eagerly). Off,
nothing is proposed and the step is as before.

The server and the CLI read the engine through its methods (``info``,
``stats``, ``drain_cache_events``, ``tier_holdings``, ``expert_metrics``,
``kv_tier_stats``, ``spec_decode_stats``), which return typed dataclasses.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from tierserve.cache.compress.base import build_compressor
from tierserve.cache.compress.driver import EvictionDriver
from tierserve.cache.kv_cache_manager import KVCacheManager
from tierserve.config import EngineConfig
from tierserve.engine.detokenizer import IncrementalDetokenizer
from tierserve.engine.device import resolve_device, resolve_dtype
from tierserve.engine.engine_stats import EngineInfo, EngineStats
from tierserve.engine.kv_tiers_setup import build_kv_tiers
from tierserve.engine.model_runner import ModelRunner
from tierserve.engine.model_source import load_tokenizer, resolve_model
from tierserve.engine.outputs import RequestOutput
from tierserve.engine.piecewise_graphs import decode_graph_mode
from tierserve.engine.request import Request
from tierserve.engine.sampler import Sampler, SamplingBatch
from tierserve.engine.scheduler import Scheduler
from tierserve.engine.spec_decode.decoder import SpecDecoder
from tierserve.engine.spec_decode.stats import SpecDecodeStats
from tierserve.engine.stop_rules import StopRules
from tierserve.kernels.attention.registry import build_attention_backend
from tierserve.kernels.cpu_linear import apply_linear_backend
from tierserve.errors import ContextLengthError, InvalidParameterError
from tierserve.models.loader import load_model
from tierserve.sampling_params import SamplingParams
from tierserve.step.hooks import StepHook


@dataclass
class _Live:
    """Engine-side state of a running request (beside the scheduler's Request)."""

    request: Request
    detok: IncrementalDetokenizer
    generator: torch.Generator  # the request's own (seeded) or the engine's


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, host_launcher=None):
        """``host_launcher`` starts expert hosts for expert offload (tierserve/offload; None: local processes;
        the Serve app and the CLI on a Ray cluster pass the Ray launcher from tierserve/actors)."""
        self.config = config = config or EngineConfig()
        self._host_launcher = host_launcher
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.source = resolve_model(config.model.model, config.model.quantization, self.device.type)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        loaded = self._build_model(config)
        self.config = config = self._with_checkpoint_kv_format(config)
        self.model = loaded.model
        self.hf_config = loaded.hf_config
        self.tokenizer = load_tokenizer(self.source, config.model.tokenizer)
        self.vocab_size = loaded.arch.vocab_size
        self.max_model_len = self._max_model_len(loaded.arch.max_position_embeddings)
        spec = self.model.kv_spec(config.cache.block_size)
        self.kv_compressor = build_compressor(config.kv_compression, spec)  # None unless --kv-compression
        self._protect_sliding_windows(loaded.arch)
        page_bytes = self.kv_compressor.page_size_bytes() if self.kv_compressor else spec.page_size_bytes
        num_blocks = config.cache.num_blocks or max(1, int(config.cache.kv_cache_memory_gib * 2**30) // page_bytes)
        self.num_blocks = num_blocks
        self.kv_manager = KVCacheManager(num_blocks, spec.block_size, config.cache.enable_prefix_caching)
        self.runner = self._build_runner(config, spec, num_blocks)
        self.kv_tiers = build_kv_tiers(config, spec, self.source, self.dtype, self.runner.kv_caches)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, self.max_model_len, self.kv_tiers)
        self.kv_evictor = self._bind_kv_compression()  # None unless an eviction method
        self.hooks: list[StepHook] = [h for h in (self.kv_tiers, self.kv_evictor, self.offload) if h is not None]
        self.sampler = Sampler()
        self.spec = SpecDecoder(config.speculative, self.max_model_len, self.model)  # off unless --speculative
        self.spec.attach(self.runner)  # hidden states for a proposer that needs them; trees
        self.stop_rules = StopRules.from_model(self.tokenizer, self.hf_config, self.max_model_len)
        self._live: dict[str, _Live] = {}
        self._requests: dict[str, Request] = {}
        self._generator = torch.Generator().manual_seed(config.seed)  # requests without a seed of their own
        self._arrivals = itertools.count()
        self._ids = itertools.count()

    def _build_model(self, config: EngineConfig):
        """Load the weights, then apply the transforms in order: expert offload, linear backend."""
        # with expert offload the model is loaded on the host: its cold experts go to the expert hosts and
        # never reach the device; the rest moves to the device after the offload transform
        load_device = torch.device("cpu") if config.offload.enabled else self.device
        if self.source.quantization is None:  # unpacked (model_source.py: the source's load mode)
            loaded = load_model(self.source.weights, self.dtype, device=load_device)
        else:  # imported only when asked for: it pulls in every registered weight format
            from tierserve.models.quantized_checkpoint import load_for_engine

            loaded = load_for_engine(self.source.weights, self.dtype, self.source.quantization)
            loaded.model.to(load_device)  # packed tensors: a fraction of the float model's bytes
        self.offload = None
        if config.offload.enabled:  # before the linear backend: it ships plain weights to the hosts
            from tierserve.offload.build import offload_from_config

            self.offload = offload_from_config(loaded.model, config.offload, self.source.weights,
                                               config.model.linear_backend, self._host_launcher, device=self.device)
            loaded.model.to(self.device)
        apply_linear_backend(loaded.model, config.model.linear_backend)
        if config.model.compile_decode:  # after the backend: the compiled code calls the swapped linears
            from tierserve.models.decode_compile import compile_for_engine

            compile_for_engine(loaded.model, self.device, config.cache.block_size)
        return loaded

    def _with_checkpoint_kv_format(self, config: EngineConfig) -> EngineConfig:
        """A quantized checkpoint's own KV format (offq: kv4) unless ``kv_compression`` is set."""
        from tierserve.models.quantized_checkpoint import checkpoint_kv_format

        kv = None if config.kv_compression.enabled or self.source.quantization is None else \
            checkpoint_kv_format(self.source.weights)
        return config if not kv else dataclasses.replace(
            config, kv_compression=dataclasses.replace(config.kv_compression, methods=kv))

    def _build_runner(self, config: EngineConfig, spec, num_blocks: int) -> ModelRunner:
        """The runner on the engine's device with its attention backend; decode CUDA graphs where they apply
        (CUDA, triton attention, plain KV pages, not ``enforce_eager``; full graphs for a capturable model,
        piecewise ones for a MoE model): one extra KV page then serves as the graphs' padding scratch."""
        m = config.model
        name = m.attention_backend if m.attention_backend != "auto" else (
            "triton" if self.device.type == "cuda" else "torch")
        attention = build_attention_backend(name)
        mode = decode_graph_mode(self.model)  # "full", "piecewise" (MoE / offloaded MoE) or None
        graphs = (self.device.type == "cuda" and not m.enforce_eager and name == "triton"
                  and self.kv_compressor is None and mode is not None)
        pages = num_blocks + 1 if graphs else num_blocks
        runner = ModelRunner(self.model, spec, pages, config.scheduler.max_num_seqs, self.max_model_len,
                             device=self.device, attention=attention, **self._kv_compression_runner_args(num_blocks))
        if graphs:
            runner.install_decode_graphs(mode, num_blocks, config.scheduler.max_num_seqs, self.max_model_len)
        return runner

    def _protect_sliding_windows(self, arch) -> None:
        """Eviction shifts slots against positions and a sliding window counts slots: an eviction method keeps
        the tokens inside the model's largest window (cache/compress/eviction.py), so every sliding layer sees
        exactly the keys it would see without eviction."""
        if self.kv_compressor is None or not self.kv_compressor.evicts:
            return
        windows = [arch.window(i) for i in range(arch.num_hidden_layers) if arch.is_sliding(i)]
        if windows:
            self.kv_compressor.keep_recent(max(windows))

    def _kv_compression_runner_args(self, num_blocks: int) -> dict:
        """Packed pages from a storage compressor; the evicted-token count for an eviction compressor."""
        comp = self.kv_compressor
        if comp is None:
            return {}
        return {"kv_caches": comp.allocate_cache(num_blocks, self.device),
                "evicted_tokens": self.kv_manager.num_evicted_tokens if comp.evicts else None}

    def _bind_kv_compression(self) -> EvictionDriver | None:
        """Bind the compressor to the model and pages; an eviction method also gets its step hook."""
        if self.kv_compressor is None:
            return None
        self.kv_compressor.bind(self.model, self.runner.kv_caches)
        if not self.kv_compressor.evicts:
            return None
        return EvictionDriver(self.kv_compressor, self.kv_manager, self.runner.block_tables)

    def _max_model_len(self, model_len: int) -> int:
        wanted = self.config.model.max_model_len
        if wanted is None:
            return model_len
        if wanted > model_len:
            raise InvalidParameterError(
                "max_model_len", f"{wanted} exceeds the model's context length {model_len}")
        return wanted

    # ----------------------------------------------------------------- requests
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParameterError("prompt", "must not be empty")
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidParameterError("prompt", "must not be empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidParameterError(
                "prompt", f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate, tokenize and queue one request; raises before touching engine state."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._live:
            raise InvalidParameterError("request_id", f"{request_id!r} is already running")
        ids = self.tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise ContextLengthError(len(ids), self.max_model_len)
        req = Request(request_id, ids, params, arrival=next(self._arrivals))
        generator = self._generator  # the engine's, unless the request brings a seed of its own
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        detok = IncrementalDetokenizer(self.tokenizer, ids, params)
        self.scheduler.add_request(req)  # validates against the pool; raises before any state changes
        self._live[request_id] = _Live(req, detok, generator)
        self._requests[request_id] = req
        return request_id

    def abort(self, request_id: str) -> bool:
        if request_id not in self._live:
            return False
        self.scheduler.abort(request_id)
        self._drop(request_id)
        return True

    def _drop(self, request_id: str) -> None:
        self.runner.release(request_id)
        self.spec.forget(request_id)
        for hook in self.hooks:
            hook.on_release(request_id)
        self._live.pop(request_id, None)
        self._requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def request_ids(self) -> list[str]:
        return list(self._live)

    def get_request(self, request_id: str) -> Request:
        return self._requests[request_id]

    # ------------------------------------------------------------------- facade
    def info(self) -> EngineInfo:
        return EngineInfo(self.source.name, self.max_model_len, self.config.cache.block_size, self.num_blocks)

    def stats(self) -> EngineStats:
        kv = self.kv_manager
        return EngineStats(self.scheduler.num_running(), self.scheduler.num_waiting(), kv.usage,
                           kv.num_free_blocks, kv.stats.queries_tokens, kv.stats.hit_tokens,
                           self.scheduler.num_pending_prefill_tokens())

    def record_cache_events(self) -> None:
        """Start logging the device prefix cache's events (for the router's prefix tree); idempotent."""
        self.kv_manager.pool.record_events()

    def drain_cache_events(self) -> list[tuple[str, bytes, bytes | None]]:
        """Pop the logged ``("cached", hash, parent)`` / ``("evicted", hash, None)`` events, oldest first."""
        return self.kv_manager.pool.drain_events()

    def tier_holdings(self):
        """What the lower KV tiers hold now (cache/tiers ``TierHoldings``), or None without tiers."""
        return self.kv_tiers.holdings() if self.kv_tiers is not None else None

    def expert_metrics(self):
        """Expert-offload counters (offload ``ExpertMetrics``), or None without offload."""
        return self.offload.stats() if self.offload is not None else None

    def spec_decode_stats(self) -> SpecDecodeStats:
        """Speculative-decoding counters: drafts proposed and accepted (all zero when off)."""
        return self.spec.stats()

    def kv_tier_stats(self):
        """KV tier counters (``KVTierStats``), or None without tiers."""
        return self.kv_tiers.stats() if self.kv_tiers is not None else None

    # --------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        for rid in sched.preempted:
            self.runner.release(rid)
        for hook in self.hooks:
            hook.before_forward(sched, self._requests)
        run = self.spec.execute(sched, self._requests)  # the runner's forward (tree masks for draft trees)
        self.spec.begin_step(sched, run.hidden, self._requests)
        for hook in self.hooks:
            hook.after_forward(sched, self._requests)
        outputs = self._sample_and_postprocess(sched, run)
        if any(o.finished for o in outputs):
            for hook in self.hooks:  # between steps: e.g. expert promotions by live usage
                hook.at_request_boundary()
        return outputs

    def close(self) -> None:
        """Release what the hooks started outside this process (expert hosts, KV tier threads); saves usage."""
        for hook in self.hooks:
            hook.close()

    def _sample_and_postprocess(self, sched, run) -> list[RequestOutput]:
        """Sample one token per plain row; verify the drafts of requests that had some (spec_decode/)."""
        if not run.request_ids:
            return []
        lives = [self._live[rid] for rid in run.request_ids]
        drafts = {s.request_id: s.spec_token_ids for s in sched.scheduled if s.spec_token_ids}
        num_rows = run.num_rows or [1] * len(lives)
        first = list(itertools.accumulate(num_rows, initial=0))
        plain = [i for i, lv in enumerate(lives) if lv.request.request_id not in drafts]
        results: list = [None] * len(lives)
        if plain:
            logits = run.logits if len(plain) == len(lives) else run.logits[
                torch.tensor([first[i] for i in plain], device=run.logits.device)]
            sampled = self.sampler(logits, self._sampling_batch([lives[i] for i in plain]))
            for i, tok, lp in zip(plain, sampled.token_ids, sampled.logprobs):
                results[i] = ([tok], [lp], False)
        for i, lv in enumerate(lives):
            if results[i] is None:
                req = lv.request
                v = self.spec.verify(self.sampler, run.logits[first[i]:first[i + 1]], drafts[req.request_id],
                                     req, lv.generator, self.stop_rules.stop_ids(req.params))
                results[i] = (v.token_ids, v.logprobs, True)
        return [self._postprocess(lv, *res) for lv, res in zip(lives, results)]

    def _sampling_batch(self, lives: list[_Live]) -> SamplingBatch:
        return SamplingBatch(
            params=[lv.request.params for lv in lives],
            generators=[lv.generator for lv in lives],
            prompt_token_ids=[lv.request.prompt_token_ids for lv in lives],
            output_token_ids=[lv.request.output_token_ids for lv in lives],
            stop_ids=[self.stop_rules.stop_ids(lv.request.params) for lv in lives],
        )

    def _postprocess(self, live: _Live, tokens: list[int], logprobs: list, verified: bool) -> RequestOutput:
        """Append ``tokens`` until a stop rule fires; after a verification, roll the rejected drafts' KV back;
        propose the next step's drafts for a request that continues."""
        req = live.request
        text, reason, stop_reason, emitted = "", None, None, []
        for token, lp in zip(tokens, logprobs):
            req.append_output(token)
            emitted.append((token, lp))
            text += live.detok.add(token)
            reason, stop_reason = self.stop_rules.check(req, token, live.detok.stopped)
            if reason is not None:
                break
        if verified:  # keep the KV of the accepted drafts (all but the newest token have KV), free the rest
            self.scheduler.rollback(req.request_id, req.num_tokens - 1)
            self.runner.truncate(req.request_id, len(req.block_ids))
        out = RequestOutput(req.request_id, [t for t, _ in emitted], text,
                            new_logprobs=[lp for _, lp in emitted if lp],
                            num_prompt_tokens=req.num_prompt_tokens,
                            num_output_tokens=len(req.output_token_ids),
                            num_cached_tokens=req.num_cached_tokens)
        if reason is None:
            req.spec_token_ids = self.spec.propose(req)
            return out
        if live.detok.stopped is None:
            out.new_text += live.detok.flush()  # release text held back for a possible stop string
        out.finished, out.finish_reason, out.stop_reason = True, reason.value, stop_reason
        for hook in self.hooks:  # e.g. the KV tiers store its chunks before its blocks are freed
            hook.on_finish(req)
        self.scheduler.finish(req.request_id, reason)
        self._drop(req.request_id)
        return out
