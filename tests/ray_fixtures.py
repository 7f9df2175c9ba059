"""One local Ray + Serve for every test that needs it (session scope).

Ray starts once with the machine's 2 CPUs, no dashboard and a 150 MB object
store; Serve's HTTP proxy listens on 127.0.0.1 on a free port. The env vars
DESIGN.md lists are set before ``ray.init``, which always starts a new local instance (``address="local"``: never
joins a cluster another test process started).
At the end of the session Serve and Ray are shut down. Imported by
tests/conftest.py so pytest sees the fixtures.

``expert_cluster()``: the simulated 3-node cluster of the expert-offload tests
(a head with 1 CPU, two nodes with 1 CPU and the ``expert_host`` resource each),
connected for the duration of a module fixture; it cannot share a process with
``ray_session``, so those modules run before the Serve tests (tests/conftest.py moves them to the front of any
collection order).
"""

from __future__ import annotations

import os
import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are chosen (``free_port`` called ``n``
    times may hand out one port twice, since each is released before the next is picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def expert_cluster():
    """Generator: start the 3-node cluster, connect, yield (cluster, [expert-host nodes]), shut down."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("another Ray instance is connected in this process; run the expert-offload modules "
                    "before (or apart from) modules using the ray_session fixture")
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, object_store_memory=80 * 2**20))
    nodes = [c.add_node(num_cpus=1, resources={"expert_host": 1}, object_store_memory=80 * 2**20)
             for _ in range(2)]
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    c.wait_for_nodes()
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def cluster():
    """(3-node Cluster, its two expert-host nodes) for one expert-offload test module (import it there)."""
    yield from expert_cluster()


@pytest.fixture(scope="session")
def ray_session():
    """(ray module, Serve HTTP port)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False,
                 object_store_memory=150 * 1024**2, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield ray, port
    serve.shutdown()
    if started:
        ray.shutdown()


# ------------------------------------------------------------------ tierserve apps
#: The main app: 2 worker replicas of the default SmolLM2 model.
MAIN_APP = "ts-main"
MAIN_ARGS = dict(replicas=2, max_num_seqs=16, max_waiting_requests=48, num_blocks=256, num_threads=1,
                 worker_cpus=0.5, max_model_len=2048, metrics_interval_s=0.25,
                 quantization="none")  # fp32: the tests compare with the fp32 folder's LLM (smollm_llm)
#: A strict app: 1 replica, tiny queue (2 running + 1 waiting), API key, 32 KiB body limit,
#: chunked prefill (64 tokens per request per step).
STRICT_APP = "ts-strict"
STRICT_KEY = "test-key"
STRICT_ARGS = dict(replicas=1, max_num_seqs=2, max_waiting_requests=1, num_blocks=256, num_threads=1,
                   worker_cpus=0.5, max_model_len=2048, long_prefill_token_threshold=64,
                   api_key=STRICT_KEY, max_body_bytes=32 * 1024, served_model_name="strict",
                   metrics_interval_s=0.25, quantization="none")


class Servers:
    def __init__(self, port: int):
        self.main = f"http://127.0.0.1:{port}"
        self.strict = f"http://127.0.0.1:{port}/strict"


@pytest.fixture(scope="session")
def tierserve_servers(ray_session):
    """Both apps deployed once; torn down (apps, tree and metrics actors) at the end."""
    ray, port = ray_session
    from ray import serve
    from ray.serve.api import RunTarget

    from tierserve.server.app import build_app, delete_app

    serve.run_many([RunTarget(build_app(MAIN_ARGS), name=MAIN_APP, route_prefix="/"),
                    RunTarget(build_app(STRICT_ARGS), name=STRICT_APP, route_prefix="/strict")])
    yield Servers(port)
    for app in (MAIN_APP, STRICT_APP):
        delete_app(app)
