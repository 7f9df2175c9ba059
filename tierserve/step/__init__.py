"""The contracts of one engine step, below every part that takes part in it (no torch).

* ``schedule``: what one ``schedule()`` call decided (``SchedulerOutput``).
* ``request_view``: what the KV bookkeeping and the step hooks read of a request (``RequestView``).
* ``hooks``: how optional subsystems join the step loop (``StepHook``, ``ExternalPrefixSource``).

They sit at the bottom of the dependency order (beside errors/paths/data) so that the KV cache, the
KV tiers, KV eviction and the expert-offload runtime implement them without importing the engine.
"""
