"""Expert offload over a simulated 3-node Ray cluster: bit-identity, fused-dispatch contract, faults.

One ``ray.cluster_utils.Cluster`` (a head without the resource + 2 nodes with
``{"expert_host": 1}``) serves the whole module and is shut down at its end. Ray
allows one cluster connection per process: the module refuses to start if another
Ray instance is connected (the session ``ray_session`` fixture of tests/ray_fixtures.py
starts lazily in test_serve_*/test_server_* modules, which run after this one), and
it leaves Ray shut down so that fixture can start its own later.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, OlmoeConfig, Qwen3MoeConfig

from model_harness import PagedRunner, build_and_save
from ray_fixtures import cluster  # noqa: F401  (the module-scoped 3-node cluster fixture)
from tierserve.kernels.cpu_linear import apply_linear_backend
from tierserve.models.loader import load_model
from tierserve.offload.placement import plan_placement

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=384, max_position_embeddings=128, initializer_range=0.1)
CONFIGS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, num_experts_per_tok=2, moe_intermediate_size=48, num_experts=8,
                                        norm_topk_prob=True),
    "olmoe": lambda: OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2),
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=6, num_experts_per_tok=2),
}
PROMPT = [3, 17, 42, 99, 5, 250, 7, 31, 64, 128, 11, 300]
NEW = 16


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    build_and_save(CONFIGS[request.param](), path, seed=sorted(CONFIGS).index(request.param) + 3, noise=0.2)
    ref = load_model(path).model
    apply_linear_backend(ref, "auto")
    runner = PagedRunner(ref)
    logits = runner.step(PROMPT)
    return path, ref, logits, PagedRunner(ref).greedy(PROMPT, NEW)


def _offloaded(path, placement, hosts, **kw):
    from tierserve.offload.apply import apply_expert_offload

    model = load_model(path).model
    handle = apply_expert_offload(model, placement, hosts, model_path=path, linear_backend="auto", **kw)
    apply_linear_backend(model, "auto")
    return model, handle


def _placement(ref, fraction):
    from tierserve.offload.apply import moe_blocks

    counts = [[(e * 7 + j * 3) % 5 for e in range(b.num_experts)] for j, (_, b) in enumerate(moe_blocks(ref))]
    total = sum(len(r) for r in counts)
    return plan_placement(counts, round(total * fraction), 0), counts


@pytest.fixture
def offloaded():
    """``_offloaded``, closing every handle it made when the test ends, passed or failed (transports,
    spare ring, usage file; ``close`` is idempotent, so a test may close one itself)."""
    handles = []

    def make(*args, **kw):
        model, handle = _offloaded(*args, **kw)
        handles.append(handle)
        return model, handle

    yield make
    for handle in handles:
        handle.close()


@pytest.fixture(scope="module")
def launcher(cluster):
    """Two ExpertHost actors (RayHostLauncher), one per expert-host node, for the whole module."""
    from tierserve.actors.ray_launcher import RayHostLauncher
    from tierserve.offload.launcher import HostSpec

    launcher = RayHostLauncher()
    transports = launcher.launch(2, HostSpec("auto"))
    assert len({t.stats().node for t in transports.values()}) == 2  # one per node
    yield launcher
    launcher.shutdown()


@pytest.fixture
def hosts(launcher):
    """A socket transport per module host (a fresh connection per test)."""
    from tierserve.actors.ray_launcher import transports_for

    return transports_for(launcher.actors, "socket", 30.0)


@pytest.mark.parametrize("channel", ["socket", "ray"])
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.75])
def test_offloaded_is_bit_identical(tiny, launcher, fraction, channel, offloaded):
    """Both fused-dispatch transports (direct TCP socket, plain actor calls) give the resident bits."""
    import time

    import numpy as np

    from tierserve.actors.ray_launcher import transports_for
    from tierserve.actors.ray_transport import RayTransport
    from tierserve.offload.socket_transport import SocketTransport
    from tierserve.offload.transport import HostCallError

    path, ref, ref_logits, ref_tokens = tiny
    placement, counts = _placement(ref, fraction)
    hosts = transports_for(launcher.actors, channel, 30.0)
    for t in hosts.values():
        t.reset_stats()
    model, handle = offloaded(path, placement, hosts, counts=counts)
    kind = SocketTransport if channel == "socket" else RayTransport
    assert all(type(t) is kind for t in handle.pool.transports.values())
    assert torch.equal(PagedRunner(model).step(PROMPT), ref_logits)
    assert PagedRunner(model).greedy(PROMPT, NEW) == ref_tokens
    sent = sum(handle.pool.stats.messages.values())
    assert sent > 0
    # every message reached a host's compute, whichever transport carried it
    assert sum(sum(t.stats().calls.values()) for t in hosts.values()) == sent
    assert not handle.pool.stats.failures
    handle.close()
    if channel == "socket":  # closed: a further call fails instead of reaching the host
        call = hosts["host0"].submit(0, np.zeros((1, 64), np.float32), np.zeros(1, np.int64), "float32")
        with pytest.raises(HostCallError):
            call.result(time.monotonic() + 5)


def test_unknown_channel_is_rejected(launcher):
    from tierserve.actors.ray_launcher import transports_for
    from tierserve.errors import InvalidParameterError
    from tierserve.offload.launcher import HostSpec, ProcessHostLauncher

    with pytest.raises(InvalidParameterError, match="channel"):
        HostSpec(channel="grpc")
    with pytest.raises(InvalidParameterError, match="channel"):
        transports_for(launcher.actors, "grpc", 5.0)
    with pytest.raises(InvalidParameterError, match="channel"):  # plain processes serve the socket only
        ProcessHostLauncher().launch(2, HostSpec(channel="ray"))


def test_fused_dispatch_messages_and_bytes(tiny, hosts, offloaded):
    path, ref, _, _ = tiny
    placement, counts = _placement(ref, 0.5)
    model, handle = offloaded(path, placement, hosts, counts=counts)
    owner = {key: h for h, keys in handle.shards.items() for key in keys}
    seen = {}

    def hook(block, args):
        x = args[0]
        probs = torch.softmax(block.gate(x).float(), dim=-1)
        seen[block.layer] = torch.topk(probs, block.top_k, dim=-1).indices

    for b in handle.blocks:
        b.register_forward_pre_hook(hook)
    runner = PagedRunner(model)
    hidden = model.cfg.hidden_size
    tokens = PROMPT
    for _ in range(4):  # the prefill, then 3 decode steps
        for t in hosts.values():
            t.reset_stats()
        logits = runner.step(tokens)
        host_stats = {name: t.stats() for name, t in hosts.items()}
        for layer, ids in seen.items():
            rows_per_host = {}
            for e in ids.reshape(-1).tolist():
                if (layer, e) in owner:
                    rows_per_host[owner[(layer, e)]] = rows_per_host.get(owner[(layer, e)], 0) + 1
            assert sorted(handle.pool.stats.last[layer]) == sorted(rows_per_host.items())
            for name, st in host_stats.items():
                assert st.calls.get(layer, 0) == (1 if name in rows_per_host else 0)
                assert st.bytes.get(layer, 0) == rows_per_host.get(name, 0) * hidden * 4
        tokens = [int(logits[-1].argmax())]


def _extra_host(c):
    """A fresh node with the resource and the ExpertHost placed on it (the shared hosts fill the others);
    (node, actor, its socket transport)."""
    import ray

    from tierserve.actors.expert_host import ExpertHost
    from tierserve.actors.ray_launcher import transports_for

    node = c.add_node(num_cpus=1, resources={"expert_host": 1}, object_store_memory=80 * 2**20)
    c.wait_for_nodes()
    host = ExpertHost.remote("auto")
    assert ray.get(host.ping.remote(), timeout=60) == node.node_id
    return node, host, transports_for({"extra": host}, "socket", 30.0)["extra"]


def test_host_death_mid_generation(tiny, cluster, hosts, offloaded):
    """Remove a node mid-generation: its experts are reloaded from disk elsewhere, output identical."""
    c, _ = cluster
    path, ref, _, ref_tokens = tiny
    placement, counts = _placement(ref, 0.25)
    node, _, victim_host = _extra_host(c)
    all_hosts = {**hosts, "victim": victim_host}
    model, handle = offloaded(path, placement, all_hosts, counts=counts, timeout_s=20.0)
    assert handle.shards["victim"]
    runner = PagedRunner(model)
    out = []
    logits = runner.step(PROMPT)
    for i in range(NEW):
        out.append(int(logits[-1].argmax()))
        if i == 4:
            c.remove_node(node)
        if len(out) < NEW:
            logits = runner.step([out[-1]])
    assert out == ref_tokens
    # the dead host is dropped at its first failed call, whatever the machine's speed: one failure, no retries
    print(f"failures: {handle.pool.stats.failures}")
    assert len(handle.pool.stats.failures) == 1 and handle.pool.stats.failures[0].startswith("victim")
    assert handle.pool.alive == set(hosts)
    assert set(handle.pool.owners) == set(placement.cold_keys())
    assert "victim" not in handle.pool.owners.values()


def _kill_and_wait(host, limit_s=60.0):
    """``ray.kill`` is asynchronous: wait until the host's process (on this machine) is gone."""
    import time

    import ray

    pid = ray.get(host.stats.remote()).pid
    ray.kill(host)
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    pytest.fail(f"the killed host (pid {pid}) is still running after {limit_s}s")


def test_all_hosts_dead_computes_locally(tiny, cluster, offloaded):
    """With every host gone the worker re-reads the experts from disk and runs them itself."""
    c, _ = cluster
    path, ref, ref_logits, _ = tiny
    placement, counts = _placement(ref, 0.5)
    node, host, transport = _extra_host(c)
    model, handle = offloaded(path, placement, {"only": transport}, counts=counts, timeout_s=10.0)
    _kill_and_wait(host)
    assert torch.equal(PagedRunner(model).step(PROMPT), ref_logits)
    assert handle.pool.alive == set()
    assert set(handle.pool.local) == set(placement.cold_keys())
    c.remove_node(node)


def test_spare_slots_prefill_fetch_is_bit_identical(tiny, hosts, offloaded):
    from tierserve.offload.spare_slots import CostModel

    path, ref, ref_logits, ref_tokens = tiny
    placement, counts = _placement(ref, 0.5)
    model, handle = offloaded(path, placement, hosts, counts=counts, spare_slots=4)
    nbytes = handle.blocks[0].expert_bytes
    # fetch when 3+ rows hit a cold expert: remote = 1 + n, fetch = bytes/bw + ~0 = 2.5
    cost = CostModel(rtt_s=1.0, bandwidth_Bps=nbytes / 2.5, remote_token_s=1.0, local_token_s=1e-9)
    for b in handle.blocks:
        b.cost = cost
    assert cost.prefer_fetch(3, nbytes) and not cost.prefer_fetch(1, nbytes)
    runner = PagedRunner(model)
    assert torch.equal(runner.step(PROMPT), ref_logits)
    assert handle.spare.fills > 0 and len(handle.spare.keys()) <= 4
    assert PagedRunner(model).greedy(PROMPT, NEW) == ref_tokens
    handle.close()


@pytest.mark.slow  # ~50 s on the loaded 2-core machine (two 135M models, 120 experts shipped)
def test_real_moe_offloaded_is_bit_identical(hosts, offloaded):
    """The MoEfied SmolLM2 (tierserve/tools/moefy.py) at 50% residency over the 2 hosts."""
    from tierserve.tools.moefy import ensure_moe_model

    path = ensure_moe_model()
    ref = load_model(path).model
    apply_linear_backend(ref, "auto")
    prompt = [1, 9690, 314, 253, 1345, 28, 281, 253, 1165, 7010, 411, 260]
    ref_logits = PagedRunner(ref).step(prompt)
    ref_tokens = PagedRunner(ref).greedy(prompt, NEW)
    placement, counts = _placement(ref, 0.5)
    del ref
    model, handle = offloaded(path, placement, hosts, counts=counts)
    assert torch.equal(PagedRunner(model).step(prompt), ref_logits)
    assert PagedRunner(model).greedy(prompt, NEW) == ref_tokens
    assert len(set(ref_tokens)) > 3 and not handle.pool.stats.failures


def test_socket_channel_serves_only_the_token_holder():
    """A connection without the host's token is closed; the worker presenting it is served."""
    import socket

    import numpy as np

    from types import SimpleNamespace

    from tierserve.offload.socket_channel import SocketChannel, start_server

    calls = []

    def compute(layer, x, ids, dtype):
        calls.append(layer)
        return x * 2

    ip, port, token = start_server("127.0.0.1", SimpleNamespace(compute=compute))
    intruder = socket.create_connection((ip, port), timeout=5)
    intruder.sendall(b"\0" * 32)
    intruder.settimeout(5)
    assert intruder.recv(1) == b""  # closed by the host
    intruder.close()
    chan = SocketChannel((ip, port), 5.0, bytes.fromhex(token))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    chan.send(3, x, np.array([0, 1]), "float32")
    import time

    assert np.array_equal(chan.recv(time.monotonic() + 5), x * 2)
    assert calls == [3]
    chan.close()
