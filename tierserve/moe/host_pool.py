"""HostPool: the worker's view of its expert hosts — who owns which cold expert, who is alive.

Calls go out with ``submit`` (non-blocking) and are collected together with ``wait``
under a single deadline of ``timeout_s`` seconds from the moment ``wait`` starts. A
host with a ``SocketChannel`` (``tierserve.moe.socket_channel``, the default: ~0.3 ms
instead of ~1.3 ms per round trip) gets the request on that socket and ``wait`` reads
the reply with the remaining time as socket timeout; any other host gets an actor call
(a Ray ObjectRef) collected by one ``ray.wait``. A call that raises (``ChannelError``,
``RayActorError``/``ActorDiedError``, ``ObjectLostError``, ...) or is not ready at the
deadline marks its host dead (``fail``): its channel is closed and the host is killed
(so a slow host cannot come back with stale state) and each of its experts is re-read from the model's checkpoint
on disk (``CheckpointExperts``; the worker keeps no copy of cold weights) and loaded on
the surviving host holding the fewest experts; with no survivor (or if loading there
fails too) the expert is built locally on the worker with the same linear backend.
The reload crosses the wire in the survivor's at-rest form (tierserve.moe.expert_transit):
the pool asks the survivor its ``weight_format()`` and sends raw arrays to a ``"raw"``
host, ``CodedExpert``s (coded here, on the worker, so the host stores them as received)
to a ``"dfloat11"`` host.

Hosts are the at-rest store of EVERY expert: ``owners`` maps each cold expert to the
host that computes it, ``standby`` maps each resident expert to the host holding a copy
of its weights (never called for it). A promotion (tierserve.moe.promotion) only moves
a key between the two maps; a failed host's standby copies are reloaded on a survivor
like its cold experts (with no survivor they are dropped: the worker still runs them).
Because every path runs the same kernels on the same rows, the recomputed outputs are
bit-identical and the request completes with identical output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import ray
import torch

from tierserve.errors import TierserveError
from tierserve.moe.expert_transit import TransitBytes
from tierserve.moe.expert_weights import CheckpointExperts, build_expert
from tierserve.moe.host_storage import wire_payload
from tierserve.moe.socket_channel import ChannelError, SocketChannel

Key = tuple[int, int]


class ExpertHostError(TierserveError):
    """Every path to an expert failed (no checkpoint to re-read it from)."""


@dataclass
class PoolStats:
    """Dispatcher-side counters: fused messages and bytes sent per layer, host failures seen, and the
    expert weights moved for promotions (host -> worker) and failover reloads (worker -> survivor)."""

    messages: dict[int, int] = field(default_factory=dict)
    bytes: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    #: per layer, the (host, rows) of the messages of the most recent forward of that layer
    last: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    promotion_bytes: TransitBytes = field(default_factory=TransitBytes)
    reload_bytes: TransitBytes = field(default_factory=TransitBytes)


class HostPool:
    def __init__(self, hosts: dict[str, "ray.actor.ActorHandle"], owners: dict[Key, str],
                 source: CheckpointExperts | None, linear_backend: str, timeout_s: float,
                 channels: dict[str, SocketChannel] | None = None, standby: dict[Key, str] | None = None):
        self.hosts = dict(hosts)
        self.channels = dict(channels or {})
        self.owners = dict(owners)
        self.standby: dict[Key, str] = dict(standby or {})
        self.source = source
        self.linear_backend = linear_backend
        self.timeout_s = timeout_s
        self.alive = set(hosts)
        self.local: dict[Key, torch.nn.Module] = {}
        self.stats = PoolStats()

    def owner(self, key: Key) -> str | None:
        """The live host holding ``key``, or None when it runs on the worker."""
        return self.owners.get(key)

    def holder(self, key: Key) -> str | None:
        """The live host holding ``key``'s weights: its owner when cold, its standby host when resident."""
        return self.owners.get(key) or self.standby.get(key)

    def handle(self, name: str):
        return self.hosts[name]

    def submit(self, name: str, layer: int, x: np.ndarray, expert_ids: np.ndarray, dtype: str):
        self.stats.messages[layer] = self.stats.messages.get(layer, 0) + 1
        self.stats.bytes[layer] = self.stats.bytes.get(layer, 0) + int(x.nbytes)
        channel = self.channels.get(name)
        if channel is None:
            return self.hosts[name].compute.remote(layer, x, expert_ids, dtype)
        try:
            channel.send(layer, x, expert_ids, dtype)
        except ChannelError as exc:
            return exc  # wait() fails the host over
        return channel

    def wait(self, pending: dict) -> dict[str, np.ndarray | None]:
        """Results by host; None for a host that failed (it has been failed over already)."""
        if not pending:
            return {}
        deadline = time.monotonic() + self.timeout_s
        out: dict[str, np.ndarray | None] = {}
        refs, failed = {}, {}
        for name, call in pending.items():
            if isinstance(call, (SocketChannel, ChannelError)):
                try:
                    if isinstance(call, ChannelError):
                        raise call
                    out[name] = call.recv(deadline)
                except ChannelError as exc:
                    out[name] = None
                    failed[name] = f"channel: {exc}"
            else:
                refs[name] = call
        for name, reason in failed.items():  # after every read: a reload must not eat the others' deadline
            self.fail(name, reason)
        if not refs:
            return out
        remaining = max(deadline - time.monotonic(), 0.0)
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=remaining)
        ready_ids = set(ready)
        for name, ref in refs.items():
            if ref not in ready_ids:
                out[name] = None
                self.fail(name, "timeout")
                continue
            try:
                out[name] = ray.get(ref)
            except (ray.exceptions.RayError, KeyError) as exc:
                out[name] = None
                self.fail(name, type(exc).__name__)
        return out

    def fail(self, name: str, reason: str) -> None:
        """Treat ``name`` as dead and move its experts (module doc)."""
        if name not in self.alive:
            return
        self.alive.discard(name)
        self.stats.failures.append(f"{name}: {reason}")
        channel = self.channels.pop(name, None)
        if channel is not None:
            channel.close()
        try:
            ray.kill(self.hosts[name], no_restart=True)
        except Exception:  # already gone
            pass
        moved = sorted(k for k, h in self.owners.items() if h == name)
        for key in moved:
            del self.owners[key]
        spare = sorted(k for k, h in self.standby.items() if h == name)
        for key in spare:
            del self.standby[key]
        if not moved and not spare:
            return
        if self.source is None:
            if not moved:
                return  # only standby copies were lost: the worker still holds those experts
            raise ExpertHostError(
                f"expert host {name} failed ({reason}) and the model path is unknown: cannot reload its "
                f"{len(moved)} experts")
        self._reload(moved, spare)

    def _reload(self, keys: list[Key], spare: list[Key] = ()) -> None:
        """Load cold ``keys`` (dispatch targets) and resident ``spare`` copies on the emptiest survivor."""
        standby = set(spare)
        weights = {k: self.source.read(*k) for k in list(keys) + list(spare)}
        while self.alive:
            target = min(sorted(self.alive), key=lambda h: sum(1 for o in self.owners.values() if o == h)
                         + sum(1 for o in self.standby.values() if o == h))
            try:
                fmt = ray.get(self.hosts[target].weight_format.remote(), timeout=self.timeout_s)
                payloads = {k: wire_payload(fmt, w) for k, w in weights.items()}
                ray.get(self.hosts[target].load_experts.remote(payloads), timeout=self.timeout_s)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
                self.alive.discard(target)
                channel = self.channels.pop(target, None)
                if channel is not None:
                    channel.close()
                self.stats.failures.append(f"{target}: {type(exc).__name__} while reloading")
                orphans = sorted(k for k, h in self.owners.items() if h == target)
                for k in orphans:
                    del self.owners[k]
                lost = sorted(k for k, h in self.standby.items() if h == target)
                for k in lost:
                    del self.standby[k]
                standby.update(lost)
                weights.update({k: self.source.read(*k) for k in orphans + lost})
                continue
            for k, p in payloads.items():
                (self.standby if k in standby else self.owners)[k] = target
                self.stats.reload_bytes.add(p)
            return
        for k, w in weights.items():
            if k not in standby:
                self.local[k] = build_expert(w, self.linear_backend)

    def close(self) -> None:
        """Close the socket channels (the hosts' serving threads then exit)."""
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()
