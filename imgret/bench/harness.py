"""What imgret's search harness costs: the call imgret times (its searcher's `search`, as `timed_search` makes it)
against the library's own call on the same index, queries and setting, so that the two sides differ only in what a
search call does. Used by the ivf and libraries parts.

Both sides are timed as `timed_search` times a run: a perf_counter around a batch call of every query (the best of
as many calls as fill a second, as `search.repeats` takes the best), and around each one-query call of the same
random sample after the same warm-ups. The two sides alternate closely, so that the other core's work and the
clock's drift fall on both alike: batch calls A B, B A, ...; one-query calls in pairs (A on one query, B on
another, then B first), each side over the whole sample. Each ratio is imgret / bare."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from imgret.index.base import SearchIndex
from imgret.measure.search import latency_sample
from imgret.measure.timing import spread

WARMUP_QUERIES = 20
MIN_BATCH_S = 1.0  # batch calls are repeated, in alternating pairs, until each side has spent this long


class BareCalls:
    """A library's own call behind `search(queries, k)`, its answer left as the library gave it (nothing converted)."""

    def __init__(self, call: Callable[[np.ndarray, int], Any]):
        self.call = call

    def search(self, queries: np.ndarray, k: int) -> tuple[Any, None]:
        return self.call(queries, k), None


def _seconds(target, queries: np.ndarray, k: int) -> float:
    start = time.perf_counter()
    target.search(queries, k)
    return time.perf_counter() - start


def _one_round(sides: list, queries: np.ndarray, k: int, warmup: np.ndarray, sample: np.ndarray,
               first: int, min_batch_s: float) -> dict[str, tuple[float, float]]:
    """{side: (batch seconds, single-query p50 ms)} for one round; `first`: which side goes first in it."""
    order = sides[first:] + sides[:first]
    batch: dict[str, list] = {name: [] for name, _ in sides}
    while not batch[order[0][0]] or min(sum(times) for times in batch.values()) < min_batch_s:
        for name, target in (order if len(batch[order[0][0]]) % 2 == 0 else order[::-1]):
            batch[name].append(_seconds(target, queries, k))
    for i in warmup:
        for _, target in order:
            target.search(queries[i:i + 1], k)
    single: dict[str, list] = {name: [] for name, _ in sides}
    # the second of a pair takes the query half the sample away: the same query right after the other side's call
    # would find its graph nodes or lists in the cache that call filled
    rows = {order[0][0]: sample, order[1][0]: np.roll(sample, -(len(sample) // 2))}
    for n in range(len(sample)):
        for name, target in (order if n % 2 == 0 else order[::-1]):
            row = rows[name][n]
            single[name].append(_seconds(target, queries[row:row + 1], k) * 1000)
    return {name: (min(batch[name]), float(np.median(single[name]))) for name, _ in sides}


def against_bare(index: SearchIndex, bare: Any, queries: np.ndarray, k: int, single_queries: int,
                 rounds: int, min_batch_s: float = MIN_BATCH_S) -> dict:
    """imgret's `index` against `bare` (anything with the library's `search(queries, k)`) over `rounds` rounds of
    batch calls of every query and `single_queries` one-query calls each; each figure is the median of its rounds,
    each ratio imgret / bare."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    warmup, sample = latency_sample(len(queries), single_queries, WARMUP_QUERIES)
    sides = [("imgret", index), ("bare", bare)]
    for _, target in sides:  # the first call pays for allocations and thread start-up, as in timed_search
        target.search(queries[:min(len(queries), 8)], k)
    figures = [_one_round(sides, queries, k, warmup, sample, first=r % 2, min_batch_s=min_batch_s)
               for r in range(rounds)]
    (mine_batch, mine_p50), (bare_batch, bare_p50) = (list(zip(*(f[who] for f in figures)))
                                                      for who in ("imgret", "bare"))
    batch_ratios = [mine / theirs for mine, theirs in zip(mine_batch, bare_batch)]
    single_ratios = [mine / theirs for mine, theirs in zip(mine_p50, bare_p50)]
    return {"rounds": rounds, "imgret_batch_s": spread(mine_batch)[0], "bare_batch_s": spread(bare_batch)[0],
            "imgret_single_ms_p50": spread(mine_p50)[0], "bare_single_ms_p50": spread(bare_p50)[0],
            "batch_ratios": batch_ratios, "single_ratios": single_ratios,
            "batch_overhead": spread(batch_ratios)[0] - 1, "single_overhead": spread(single_ratios)[0] - 1}
