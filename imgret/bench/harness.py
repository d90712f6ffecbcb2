"""What imgret's search harness costs: imgret's timed search of an index against the very same protocol (warm-ups,
query sample, timer: `timed_search`) run on the library's own call on the same index, so that the two sides differ
only in what a search call does. Used by the ivf and libraries parts."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from imgret.index.base import SearchIndex
from imgret.measure.search import timed_search
from imgret.measure.timing import interleaved, spread


class BareCalls:
    """A library's own call behind `search(queries, k)`, its answer left as the library gave it (nothing converted)."""

    def __init__(self, call: Callable[[np.ndarray, int], Any]):
        self.call = call

    def search(self, queries: np.ndarray, k: int) -> tuple[Any, None]:
        return self.call(queries, k), None


def against_bare(index: SearchIndex, bare: Any, queries: np.ndarray, k: int, single_queries: int,
                 rounds: int) -> dict:
    """imgret's `index` against `bare` (anything with the library's `search(queries, k)`), interleaved over `rounds`:
    one batch call of every query and `single_queries` timed one-query calls per round; each figure is the median
    of its rounds, each ratio imgret / bare."""
    def one_round(target) -> tuple[float, float]:
        run = timed_search(target, queries, k, latency_queries=single_queries, warmup_queries=20, repeats=1,
                           progress=False)
        return run.best_batch_seconds, float(np.median(run.latencies_ms))

    figures = interleaved({"imgret": lambda: one_round(index), "bare": lambda: one_round(bare)}, rounds)
    (mine_batch, mine_p50), (bare_batch, bare_p50) = (list(zip(*figures[who])) for who in ("imgret", "bare"))
    batch_ratios = [mine / theirs for mine, theirs in zip(mine_batch, bare_batch)]
    single_ratios = [mine / theirs for mine, theirs in zip(mine_p50, bare_p50)]
    return {"rounds": rounds, "imgret_batch_s": spread(mine_batch)[0], "bare_batch_s": spread(bare_batch)[0],
            "imgret_single_ms_p50": spread(mine_p50)[0], "bare_single_ms_p50": spread(bare_p50)[0],
            "batch_ratios": batch_ratios, "single_ratios": single_ratios,
            "batch_overhead": spread(batch_ratios)[0] - 1, "single_overhead": spread(single_ratios)[0] - 1}
