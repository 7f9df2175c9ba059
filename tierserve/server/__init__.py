"""OpenAI-compatible serving on Ray Serve.

``tierserve.server.app:build_app(args)`` builds the application (ingress
``OpenAIIngress`` + worker ``LLMServer``); ``tierserve serve`` runs it. The
modules: protocol (pydantic wire format), errors (OpenAI-shaped errors and
guards), responses (diffs -> responses/SSE), worker, ingress, metrics
(Prometheus, aggregated over replicas), cache_reporter (block-pool events ->
prefix-tree diffs). Nothing is imported here, so importing the package has no
side effects.
"""
