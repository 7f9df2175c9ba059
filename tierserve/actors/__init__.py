"""Ray actors: thin wrappers over the engine and models (expert hosts, model workers)."""
