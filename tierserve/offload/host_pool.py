"""HostPool: the worker's view of its expert hosts — who owns which cold expert, who is alive, failover.

The pool knows each host only by its ``ExpertTransport`` (tierserve.offload.transport):
a plain process behind the socket channel or a Ray actor, the pool cannot tell.
Fused calls go out with ``submit`` (non-blocking: the transport's ``PendingCall``)
and are collected together with ``wait`` under a single deadline of ``timeout_s``
seconds from the moment ``wait`` starts. A call whose ``result`` raises
``HostCallError`` (a send that failed, a lost connection, a dead actor, an error
reply) or is not ready at the deadline marks its host dead (``fail``): its transport
is killed (so a slow host cannot come back with stale state) and each of its experts
is re-read from the model's checkpoint on disk (``CheckpointExperts``; the worker
keeps no copy of cold weights) and loaded on the surviving host holding the fewest
experts; with no survivor (or if loading there fails too) the expert is built locally
on the worker with the same linear backend. The reload crosses the wire in the
survivor's at-rest form (tierserve.offload.expert_transit): the pool asks the survivor
its ``weight_format()`` and sends raw arrays to a ``"raw"`` host, ``CodedExpert``s
(coded here, on the worker, so the host stores them as received) to a ``"dfloat11"`` host.

Hosts are the at-rest store of EVERY expert: ``owners`` maps each cold expert to the
host that computes it, ``standby`` maps each resident expert to the host holding a copy
of its weights (never called for it). A promotion (tierserve.offload.promotion) only moves
a key between the two maps; a failed host's standby copies are reloaded on a survivor
like its cold experts (with no survivor they are dropped: the worker still runs them).
Because every path runs the same kernels on the same rows, the recomputed outputs are
bit-identical and the request completes with identical output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from tierserve.errors import TierserveError
from tierserve.offload.expert_transit import TransitBytes
from tierserve.offload.expert_weights import CheckpointExperts, build_expert
from tierserve.offload.host_storage import wire_payload
from tierserve.offload.transport import ExpertTransport, HostCallError, PendingCall

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
    """``transports``: host name -> its transport; ``owners``/``standby``: (layer, expert) -> host name;
    ``source``: where a dead host's experts are re-read from (None: nowhere); ``device``: where the worker
    runs experts it builds itself (failover with no survivor, promotions, spare slots)."""

    def __init__(self, transports: dict[str, ExpertTransport], owners: dict[Key, str],
                 source: CheckpointExperts | None, linear_backend: str, timeout_s: float,
                 standby: dict[Key, str] | None = None, device: torch.device | str = "cpu"):
        self.transports = dict(transports)
        self.owners = dict(owners)
        self.standby: dict[Key, str] = dict(standby or {})
        self.source = source
        self.linear_backend = linear_backend
        self.timeout_s = timeout_s
        self.device = torch.device(device)
        self.alive = set(transports)
        self.local: dict[Key, torch.nn.Module] = {}
        self.stats = PoolStats()

    def owner(self, key: Key) -> str | None:
        """The live host holding ``key``, or None when it runs on the worker."""
        return self.owners.get(key)

    def holder(self, key: Key) -> str | None:
        """The live host holding ``key``'s weights: its owner when cold, its standby host when resident."""
        return self.owners.get(key) or self.standby.get(key)

    def transport(self, name: str) -> ExpertTransport:
        return self.transports[name]

    def submit(self, name: str, layer: int, x: np.ndarray, expert_ids: np.ndarray, dtype: str) -> PendingCall:
        """Send one fused message to host ``name`` (counted in ``stats``); collect it with ``wait``."""
        self.stats.messages[layer] = self.stats.messages.get(layer, 0) + 1
        self.stats.bytes[layer] = self.stats.bytes.get(layer, 0) + int(x.nbytes)
        return self.transports[name].submit(layer, x, expert_ids, dtype)

    def wait(self, pending: dict[str, PendingCall]) -> dict[str, np.ndarray | None]:
        """Results by host; None for a host that failed (it has been failed over already)."""
        deadline = time.monotonic() + self.timeout_s
        out: dict[str, np.ndarray | None] = {}
        failed: dict[str, str] = {}
        for name, call in pending.items():
            try:
                out[name] = call.result(deadline)
            except HostCallError as exc:
                out[name] = None
                failed[name] = f"{type(exc).__name__}: {exc}"
        for name, reason in failed.items():  # after every read: a reload must not eat the others' deadline
            self.fail(name, reason)
        return out

    def fail(self, name: str, reason: str) -> None:
        """Treat ``name`` as dead and move its experts (module doc)."""
        if name not in self.alive:
            return
        self.alive.discard(name)
        self.stats.failures.append(f"{name}: {reason}")
        _kill(self.transports[name])
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
            transport = self.transports[target]
            try:
                fmt = transport.weight_format(self.timeout_s)
                payloads = {k: wire_payload(fmt, w) for k, w in weights.items()}
                transport.load_experts(payloads, self.timeout_s)
            except HostCallError as exc:
                self.alive.discard(target)
                _kill(transport)
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
                self.local[k] = build_expert(w, self.linear_backend, self.device)

    def close(self) -> None:
        """Close every transport's connection (stopping the hosts is their launcher's job)."""
        for transport in self.transports.values():
            transport.close()


def _kill(transport: ExpertTransport) -> None:
    try:
        transport.kill()
    except Exception:  # already gone: nothing left to stop
        pass
