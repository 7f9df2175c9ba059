"""Driver process of tests/test_multinode_cli.py: the MoE engine on a Ray cluster started with ``ray start``.

``python multinode_driver.py CONFIG_JSON`` with keys ``address`` (head GCS
``ip:port``), ``node_ip`` (the head's address: this driver runs beside the
head), ``victim_ip`` (the expert-host node's address), ``model`` and
``tokenizer`` (folders), ``out`` (result JSON path).

It runs the same greedy requests twice: on an engine with every expert on the
worker (the reference), then on an engine whose cold experts live on one
``ExpertHost`` actor, which Ray can only place on the node advertising the
``expert_host`` resource. After the offloaded engine has produced tokens for
a few steps, the driver kills every process of the expert-host node (its
raylet and agents, whose command lines name its address, and the host actor's
worker, which reports its pid), and steps on to the end. The result records both outputs, the address the host's
socket channel was bound to and the pool's failover count.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def node_processes(ip: str) -> list[int]:
    """PIDs of the processes whose command line names ``ip`` (a Ray node's raylet, agents and workers)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(ip.encode() in a for a in args) and not any(a.endswith(b"multinode_driver.py") for a in args):
            pids.append(int(pid))
    return pids


def run(engine, prompts, kill_after_steps: int | None = None, victim_ip: str | None = None,
        victim_pids: tuple[int, ...] = ()) -> dict:
    from tierserve.sampling_params import SamplingParams

    out: dict[str, list[int]] = {}
    for i, (prompt, n) in enumerate(prompts):
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), f"r{i}")
    steps, killed = 0, []
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        steps += 1
        if kill_after_steps is not None and steps == kill_after_steps:
            killed = node_processes(victim_ip) + list(victim_pids)
            for pid in killed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    return {"tokens": out, "killed": len(killed), "steps": steps}


def main(cfg: dict) -> None:
    import ray

    from tierserve.actors.ray_launcher import RayHostLauncher
    from tierserve.config import CacheConfig, EngineConfig, ModelConfig, OffloadConfig, SchedulerConfig
    from tierserve.engine.llm_engine import LLMEngine

    ray.init(address=cfg["address"], _node_ip_address=cfg["node_ip"], log_to_driver=False)
    base = dict(model=ModelConfig(model=cfg["model"], tokenizer=cfg["tokenizer"]),
                scheduler=SchedulerConfig(max_num_seqs=4), cache=CacheConfig(num_blocks=64))
    prompts = [(list(p), n) for p, n in cfg["prompts"]]
    ref = LLMEngine(EngineConfig(**base))
    expected = run(ref, prompts)["tokens"]
    ref.close()
    offload = OffloadConfig(resident_experts=6, expert_hosts=1, per_layer_floor=1, timeout_s=10.0,
                            promotion_max_swaps=0)
    engine = LLMEngine(EngineConfig(**base, offload=offload), host_launcher=RayHostLauncher())
    try:
        pool = engine.offload.pool
        host_ip = [t.address[0] for t in pool.transports.values()]
        # a Ray worker renames its process (``ray::ExpertHost``), so its command line no longer names the
        # node: the host reports its own pid
        host_pids = tuple(t.stats(10.0).pid for t in pool.transports.values())
        got = run(engine, prompts, kill_after_steps=3, victim_ip=cfg["victim_ip"], victim_pids=host_pids)
        result = {"expected": expected, "got": got["tokens"], "killed": got["killed"], "host_ips": host_ip,
                  "failures": list(pool.stats.failures), "host_nodes": sorted({n["NodeManagerAddress"]
                                                                            for n in ray.nodes() if n["Alive"]})}
    finally:
        engine.close()
        ray.shutdown()
    with open(cfg["out"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        main(json.load(f))
