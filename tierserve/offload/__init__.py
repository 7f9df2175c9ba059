"""Expert offload runtime (no Ray): usage, placement, dispatch plans, transports, hosts, spare slots, promotions.

Built by ``offload.build.offload_from_config``; the live state is the ``offload.hook.OffloadHook``
step hook. Ray-based hosts and transports live in tierserve/actors/.
"""
