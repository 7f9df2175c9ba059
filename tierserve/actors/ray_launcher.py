"""RayHostLauncher: expert hosts as Ray actors, one per node advertising the ``expert_host`` resource.

``RayHostLauncher(start_timeout_s=60.0)``; ``launch(n, spec)`` (the HostLauncher
contract, tierserve.offload.launcher):

1. when Ray is not initialised in this process, starts a local Ray instance
   advertising ``n`` units of ``expert_host`` (``ray.init(include_dashboard=False,
   log_to_driver=False, resources=...)``), so a single machine runs all hosts;
2. starts ``n`` ``ExpertHost`` actors (tierserve/actors/expert_host.py) and waits until
   all answer ``ping`` within ``start_timeout_s``; otherwise kills them and raises
   ``TierserveError`` (each needs a node advertising the resource);
3. per host, ``spec.channel="socket"``: ``open_channel`` (the actor serves the same
   socket channel as a plain-process host, on its node's IP) and a ``SocketTransport``
   whose ``kill`` is ``ray.kill``; ``"ray"``: a ``RayTransport`` (plain actor calls).

``transports_for(actors, channel, timeout_s)`` builds step 3 for actors already
started (tests use it to reach the same actors over both channels). ``actors`` maps
host names to actor handles; ``shutdown()`` kills every actor it
started (``ray.kill`` is asynchronous: the processes exit shortly after). It leaves Ray
itself running.
"""

from __future__ import annotations

import ray

from tierserve.actors.expert_host import EXPERT_HOST_RESOURCE, ExpertHost
from tierserve.actors.ray_transport import RayTransport
from tierserve.errors import InvalidParameterError, TierserveError
from tierserve.offload.launcher import HostLauncher, HostSpec, check_host_count
from tierserve.offload.socket_transport import SocketTransport
from tierserve.offload.transport import ExpertTransport


class RayHostLauncher(HostLauncher):
    """Expert hosts as Ray actors on ``expert_host`` nodes (module doc)."""

    def __init__(self, start_timeout_s: float = 60.0):
        if start_timeout_s <= 0:
            raise InvalidParameterError("start_timeout_s", f"must be > 0, got {start_timeout_s}")
        self.start_timeout_s = start_timeout_s
        self.actors: dict[str, "ray.actor.ActorHandle"] = {}

    def launch(self, n: int, spec: HostSpec) -> dict[str, ExpertTransport]:
        check_host_count(n)
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False, resources={EXPERT_HOST_RESOURCE: n})
        actors = {f"host{i}": ExpertHost.remote(spec.linear_backend, spec.num_threads, spec.weight_format)
                  for i in range(n)}
        self.actors.update(actors)
        ready, _ = ray.wait([a.ping.remote() for a in actors.values()], num_returns=n,
                            timeout=self.start_timeout_s)
        if len(ready) < n:
            self.shutdown()
            raise TierserveError(f"only {len(ready)} of {n} expert hosts started within {self.start_timeout_s}s: "
                                 f"each needs a node advertising the {EXPERT_HOST_RESOURCE!r} resource")
        return transports_for(actors, spec.channel, spec.timeout_s)

    def shutdown(self) -> None:
        for actor in self.actors.values():
            _killer(actor)()
        self.actors.clear()


def transports_for(actors: dict, channel: str, timeout_s: float) -> dict[str, ExpertTransport]:
    """One transport per started ``ExpertHost`` actor over ``channel`` (module doc, step 3)."""
    if channel == "ray":
        return {name: RayTransport(a, timeout_s) for name, a in actors.items()}
    if channel != "socket":
        raise InvalidParameterError("channel", f"must be 'socket' or 'ray', got {channel!r}")
    addresses = ray.get([a.open_channel.remote() for a in actors.values()], timeout=timeout_s)
    return {name: SocketTransport((ip, port), bytes.fromhex(token), timeout_s, stop=_killer(a))
            for (name, a), (ip, port, token) in zip(actors.items(), addresses)}


def _killer(actor):
    def kill() -> None:
        try:
            ray.kill(actor, no_restart=True)
        except ValueError:
            pass
    return kill
