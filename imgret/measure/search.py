"""Timed search: all queries in one batch call (throughput), then one query at a time (latency)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from imgret.index.methods import SearchIndex


@dataclass(frozen=True)
class SearchRun:
    ids: np.ndarray  # (queries, k), from the batch call
    scores: np.ndarray
    batch_seconds: float
    latencies_ms: np.ndarray  # one per single-query call


def timed_search(index: SearchIndex, queries: np.ndarray, k: int, latency_queries: int = 1000,
                 warmup_queries: int = 50, progress: bool = True) -> SearchRun:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    index.search(queries[:min(len(queries), 8)], k)  # first call pays for allocations and thread start-up
    start = time.perf_counter()
    scores, ids = index.search(queries, k)
    batch_seconds = time.perf_counter() - start

    # Cycle through the queries when there are fewer than `latency_queries`, so percentiles rest on enough calls.
    order = np.arange(max(latency_queries, 1)) % len(queries)
    for i in order[:warmup_queries]:
        index.search(queries[i:i + 1], k)
    latencies = np.empty(len(order), dtype=np.float64)
    for n, i in enumerate(tqdm(order, desc="single-query latency", unit="query", disable=not progress,
                               mininterval=2)):
        one = queries[i:i + 1]
        start = time.perf_counter()
        index.search(one, k)
        latencies[n] = (time.perf_counter() - start) * 1000
    return SearchRun(ids=ids, scores=scores, batch_seconds=batch_seconds, latencies_ms=latencies)
