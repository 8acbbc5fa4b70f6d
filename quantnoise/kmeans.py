"""Seeded k-means on weight blocks with faiss (the codebooks of iPQ, Stock et al. 2020).

faiss refills empty clusters by splitting large ones and subsamples at most
``max_points_per_centroid`` points per centroid for training; every point is then assigned to its
nearest centroid.  Same data + same seed gives the same codebook (single-threaded centroid update
ranges in faiss are fixed, so the result does not depend on timing).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import Tensor


def kmeans(x: Tensor, k: int, niter: int = 20, seed: int = 1234,
           max_points_per_centroid: int = 256, name: str = "blocks") -> Tuple[Tensor, Tensor]:
    """Cluster the rows of x (n, d) into k centroids.

    Returns (centroids (k, d) float32 on x's device, codes (n,) int64 on x's device).
    Raises ValueError for non-finite data or fewer points than centroids, naming ``name``.
    """
    import faiss  # imported lazily: only pq needs it

    if x.dim() != 2:
        raise ValueError(f"k-means of {name}: expected a 2-d (points, dims) tensor, got shape {tuple(x.shape)}")
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means of {name}: {n} blocks cannot fill {k} centroids; use n_centroids <= {n}")
    data = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
    if not np.isfinite(data).all():
        raise ValueError(f"k-means of {name}: the weights contain NaN or inf; fix the checkpoint before quantizing")
    km = faiss.Kmeans(d, k, niter=niter, seed=int(seed) % (2**31), verbose=False,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
    km.train(data)
    _, codes = km.index.search(data, 1)
    centroids = torch.from_numpy(km.centroids.copy()).to(x.device)
    return centroids, torch.from_numpy(codes[:, 0].astype(np.int64)).to(x.device)
