"""Balanced spherical k-means: split n items into k clusters of exactly n / k items each.

Used by MoEfication to group an FFN's intermediate neurons into equal-size experts.

Algorithm (deterministic for a given seed):

1. Rows of ``features [n, d]`` are L2-normalised (rows of norm 0 stay 0).
2. Initial centroids: k distinct rows drawn with ``torch.randperm`` under a
   ``torch.Generator`` seeded with ``seed``.
3. Each iteration scores every (item, cluster) pair by cosine similarity and
   assigns greedily under the capacity ``n / k``: pairs are visited in
   descending score (stable sort, ties by item then cluster index) and an
   item takes the first cluster that still has room. Centroids become the
   normalised mean of their members.
4. Stops after ``iters`` iterations or when an assignment repeats.

The greedy capacity-constrained assignment is the usual cheap stand-in for
the exact min-cost-flow step of balanced k-means (Malinen & Fränti 2014);
every cluster ends with exactly ``n / k`` members. ``n`` must be divisible by
``k``.
"""

from __future__ import annotations

import torch

from tierserve.errors import InvalidParameterError


def balanced_assign(scores: torch.Tensor) -> torch.Tensor:
    """Greedy capacity-constrained argmax of ``scores [n, k]``: labels ``[n]``, each cluster n / k items."""
    n, k = scores.shape
    capacity = n // k
    order = torch.argsort(scores.reshape(-1), descending=True, stable=True).tolist()
    labels = [-1] * n
    fill = [0] * k
    remaining = n
    for flat in order:
        item, cluster = divmod(flat, k)
        if labels[item] >= 0 or fill[cluster] >= capacity:
            continue
        labels[item] = cluster
        fill[cluster] += 1
        remaining -= 1
        if remaining == 0:
            break
    return torch.tensor(labels, dtype=torch.long)


def balanced_kmeans(features: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Cluster labels ``[n]`` in ``[0, k)``, each cluster exactly ``n / k`` items (see module docstring)."""
    n = features.shape[0]
    if k < 1 or n % k:
        raise InvalidParameterError("num_experts", f"must divide the {n} items to cluster, got {k}")
    f = torch.nn.functional.normalize(features.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = f[torch.randperm(n, generator=gen)[:k]].clone()
    labels = None
    for _ in range(iters):
        new = balanced_assign(f @ centroids.T)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros(k, f.shape[1]).index_add_(0, labels, f)
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return labels
