"""ExpertTransport: how the worker reaches ONE expert host — send one fused message, get the result.

The offload runtime (dispatch, host pool, spare slots, promotions) talks to a host
only through this contract; it never knows whether the host is a plain local process
behind a TCP socket (tierserve.offload.socket_transport) or a Ray actor
(tierserve/actors/ray_transport.py). Launchers (tierserve.offload.launcher) build them.

Contract of an ``ExpertTransport`` (one host):

* ``submit(layer, x, expert_ids, dtype) -> PendingCall``: start the host's
  ``compute`` of the fused message (``x`` [rows, hidden] in ``dtype``'s numpy form,
  ``expert_ids`` [rows] int64; the reply is the un-gated outputs [rows, hidden] in
  input row order). Never blocks for the reply and never raises: a failure to send is
  reported by the returned call's ``result``. At most one submitted call per transport
  is outstanding at a time (the dispatcher collects it before the next ``submit``).
* ``PendingCall.result(deadline)``: the reply array, waiting at most until
  ``deadline`` (a ``time.monotonic()`` instant); raises :class:`HostCallError` on any
  failure (timeout, lost connection, dead host, error reply). Called once.
* ``load_experts(payloads, timeout_s)``: hold ``(layer, expert) -> ExpertPayload``
  (raw ``ExpertWeights`` or ``CodedExpert``); returns how many experts the host holds.
* ``get_expert_payload(key, timeout_s)``: one held expert as the host keeps it at rest.
* ``weight_format(timeout_s)``: the host's ``HOST_WEIGHT_FORMATS`` name.
* ``stats(timeout_s)`` -> :class:`HostStats`; ``reset_stats(timeout_s)``.
* Control calls (all but ``submit``) may run on another thread concurrently with a
  pending ``submit`` (spare-slot fills run on a background thread); ``timeout_s`` None
  means the transport's own default. Each raises :class:`HostCallError` on failure.
* ``kill()``: stop the host for good (a slow host must not come back with stale
  state); every later call fails. ``close()``: drop the connection, leave the host
  running (its launcher stops it). Both idempotent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from tierserve.errors import TierserveError
from tierserve.offload.expert_transit import ExpertPayload

Key = tuple[int, int]


class HostCallError(TierserveError):
    """A call to an expert host failed (timeout, lost connection, dead host, error reply)."""


@dataclass(frozen=True)
class HostStats:
    """What a host reports: fused calls and input bytes received per layer, its process id, the bytes its
    experts take at rest and as plain arrays, and where it runs (``node``: a Ray node id or the host name)."""

    calls: Mapping[int, int] = field(default_factory=dict)
    bytes: Mapping[int, int] = field(default_factory=dict)
    pid: int = 0
    weight_bytes: int = 0
    raw_weight_bytes: int = 0
    node: str = ""


class PendingCall(ABC):
    """One submitted fused message; ``result`` once (module doc)."""

    @abstractmethod
    def result(self, deadline: float) -> np.ndarray:
        """The host's reply; raises HostCallError on failure or when ``deadline`` passes."""


class FailedCall(PendingCall):
    """A call that failed before it left the worker: ``result`` raises the recorded error."""

    def __init__(self, error: HostCallError):
        self.error = error

    def result(self, deadline: float) -> np.ndarray:
        raise self.error


class ExpertTransport(ABC):
    """The worker's connection to one expert host (module doc)."""

    @abstractmethod
    def submit(self, layer: int, x: np.ndarray, expert_ids: np.ndarray, dtype: str) -> PendingCall:
        """Start one fused ``compute`` call; never raises."""

    @abstractmethod
    def load_experts(self, payloads: dict[Key, ExpertPayload], timeout_s: float | None = None) -> int:
        """Store ``payloads`` on the host; the number of experts it now holds."""

    @abstractmethod
    def get_expert_payload(self, key: Key, timeout_s: float | None = None) -> ExpertPayload:
        """Expert ``key`` as the host holds it at rest."""

    @abstractmethod
    def weight_format(self, timeout_s: float | None = None) -> str:
        """The host's at-rest format name."""

    @abstractmethod
    def stats(self, timeout_s: float | None = None) -> HostStats:
        """The host's counters."""

    @abstractmethod
    def reset_stats(self, timeout_s: float | None = None) -> None:
        """Zero the host's call and byte counters."""

    @abstractmethod
    def kill(self) -> None:
        """Stop the host for good; idempotent."""

    @abstractmethod
    def close(self) -> None:
        """Drop the connection (the host keeps running); idempotent."""
