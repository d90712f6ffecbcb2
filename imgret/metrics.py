"""Metrics: small pure functions over result arrays. Recall is defined here and nowhere else."""
from __future__ import annotations

import numpy as np


def recall_at(found_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """|found top-k ∩ exact top-k| / k, averaged over queries (ids of -1, 'no result', never match)."""
    found, exact = found_ids[:, :k], exact_ids[:, :k]
    hits = 0
    for start in range(0, len(found), 4096):  # bounds the (rows, k, k) comparison's memory
        block = found[start:start + 4096, :, None] == exact[start:start + 4096, None, :]
        hits += int(block.any(axis=2).sum())
    return hits / (len(found) * k)


def precision_at(found_ids: np.ndarray, gallery_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """Share of the top-k results whose class is the query's class."""
    found = found_ids[:, :k]
    labels = np.where(found >= 0, gallery_labels[np.clip(found, 0, None)], -1)
    return float((labels == query_labels[:, None]).mean())


def latency_percentiles(latencies_ms: np.ndarray, percentiles=(50, 95, 99)) -> dict[int, float]:
    values = np.percentile(np.asarray(latencies_ms, dtype=np.float64), percentiles)
    return {p: float(v) for p, v in zip(percentiles, values)}
