"""Mixture-of-Experts tooling: MoEfication, expert usage statistics, placement, REAP pruning."""
