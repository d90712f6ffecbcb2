"""What imgret's search harness costs: the call imgret times (its searcher's `search`, as `timed_search` makes it)
against the library's own call on the same index, queries and setting, so that the two sides differ only in what a
search call does. Used by the ivf and libraries parts.

Both sides are timed with a perf_counter around each call, on the same queries after the same warm-ups, and the
two sides alternate closely, so that the other core's work and the clock's drift fall on both alike:
- batch: the queries in calls of `BATCH_ROWS`, the two sides taking each chunk in turn (A B, then B A on the next
  chunk), sweeps over all of them until each side has spent `MIN_BATCH_S`. A round's ratio is the ratio of the two
  sides' sums. Timing every query in one call per side instead gave one pair of seconds-long calls per round,
  whose ratio swung by ±12% with the other core's load;
- one query: pairs of calls (A on one query, B on another, then B first), each side over the whole sample; a
  round's ratio is that of the two sides' p50s.
Each ratio is imgret / bare."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from imgret.index.base import SearchIndex
from imgret.measure.search import latency_sample
from imgret.measure.timing import spread

WARMUP_QUERIES = 20
BATCH_ROWS = 200  # queries per batch call: short enough that many pairs of calls fit in a round
MIN_BATCH_S = 1.0  # batch sweeps are repeated until each side has spent this long


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


def _batch_seconds(sides: list, queries: np.ndarray, k: int, first: int, min_batch_s: float,
                   batch_rows: int) -> dict[str, tuple[float, int]]:
    """{side: (seconds, sweeps)}: whole sweeps over the queries in calls of `batch_rows`, the two sides taking
    each chunk in turn and the first of a pair alternating from chunk to chunk (an even number of pairs, so that
    the cache the first call of a pair leaves to the second falls on each side equally)."""
    chunks = [queries[start:start + batch_rows] for start in range(0, len(queries), batch_rows)]
    spent = {name: 0.0 for name, _ in sides}
    pairs = sweeps = 0
    while sweeps == 0 or pairs % 2 or min(spent.values()) < min_batch_s:
        for chunk in chunks:
            for name, target in (sides if (pairs + first) % 2 == 0 else sides[::-1]):
                spent[name] += _seconds(target, chunk, k)
            pairs += 1
        sweeps += 1
    return {name: (seconds, sweeps) for name, seconds in spent.items()}


def _one_round(sides: list, queries: np.ndarray, k: int, warmup: np.ndarray, sample: np.ndarray,
               first: int, min_batch_s: float, batch_rows: int) -> dict[str, tuple[float, float, float]]:
    """{side: (batch seconds in all, seconds per sweep, single-query p50 ms)} for one round; `first`: which side
    goes first in it."""
    batch = _batch_seconds(sides, queries, k, first, min_batch_s, batch_rows)
    order = sides[first:] + sides[:first]
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
    return {name: (batch[name][0], batch[name][0] / batch[name][1], float(np.median(single[name])))
            for name, _ in sides}


def against_bare(index: SearchIndex, bare: Any, queries: np.ndarray, k: int, single_queries: int,
                 rounds: int, min_batch_s: float = MIN_BATCH_S, batch_rows: int = BATCH_ROWS) -> dict:
    """imgret's `index` against `bare` (anything with the library's `search(queries, k)`) over `rounds` rounds of
    batch calls of `batch_rows` queries and `single_queries` one-query calls each; each figure is the median of its
    rounds, each ratio imgret / bare."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    warmup, sample = latency_sample(len(queries), single_queries, WARMUP_QUERIES)
    sides = [("imgret", index), ("bare", bare)]
    for _, target in sides:  # the first call pays for allocations and thread start-up, as in timed_search
        target.search(queries[:min(len(queries), 8)], k)
    figures = [_one_round(sides, queries, k, warmup, sample, r % 2, min_batch_s, batch_rows) for r in range(rounds)]
    mine, theirs = ([f[who] for f in figures] for who in ("imgret", "bare"))
    batch_ratios = [a[0] / b[0] for a, b in zip(mine, theirs)]
    single_ratios = [a[2] / b[2] for a, b in zip(mine, theirs)]
    return {"rounds": rounds, "batch_rows": batch_rows,
            "imgret_batch_s": spread([a[1] for a in mine])[0], "bare_batch_s": spread([b[1] for b in theirs])[0],
            "imgret_single_ms_p50": spread([a[2] for a in mine])[0],
            "bare_single_ms_p50": spread([b[2] for b in theirs])[0],
            "batch_ratios": batch_ratios, "single_ratios": single_ratios,
            "batch_overhead": spread(batch_ratios)[0] - 1, "single_overhead": spread(single_ratios)[0] - 1}
