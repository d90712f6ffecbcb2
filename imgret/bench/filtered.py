"""The filtered part: exact filtered search (brute force's own filter, as a filtered run calls it) at 1%, 10% and
50% of the gallery against the unfiltered exact scan of the same gallery, single queries and batches, the four sides
interleaved query by query (their order rotating) in every round; beside them, the bandwidth limit of a single
query (reading the gallery once). An exact filtered search never needs more than the unfiltered scan: each ratio
filtered / unfiltered should stay at or below 1."""
from __future__ import annotations

import os
import time

import numpy as np

from imgret.bench.machine import Context
from imgret.bench.search import search_data
from imgret.bench.verdicts import verdict
from imgret.index.filters import attribute_filter
from imgret.index.methods import METHODS
from imgret.measure.timing import spread

SELECTIVITIES = (0.01, 0.1, 0.5)
BATCH_QUERIES = 1000  # queries per batch call: each side's batch is timed as one call


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def bench_filtered(gallery: np.ndarray, queries: np.ndarray, single_queries: int, rounds: int, bandwidth_gbs: float,
                   k: int = 10) -> dict:
    brute = METHODS["brute"]
    native = brute.build({}, gallery, 1)
    unfiltered = brute.searcher(native, {"query_chunk": 256})
    filters = {share: attribute_filter(len(gallery), len(queries), share, seed=0) for share in SELECTIVITIES}

    def side(share):
        if share is None:
            return lambda rows, ids: unfiltered.search(rows, k)
        return lambda rows, ids: brute.search_filtered(native, rows, k, {"query_chunk": 256}, 1, filters[share], ids)

    sides = [(name, side(share)) for name, share in (("unfiltered", None), *((f"{s:g}", s) for s in SELECTIVITIES))]
    single = {name: [] for name, _ in sides}
    batch = {name: [] for name, _ in sides}
    count, batch_rows = min(single_queries, len(queries)), min(BATCH_QUERIES, len(queries))
    for name, search in sides:  # warm: the gallery's pages, the libraries' threads
        search(queries[:1], np.arange(1))
    for round_number in range(rounds):
        times = {name: [] for name, _ in sides}
        for q in range(count):
            turn = (round_number + q) % len(sides)
            for name, search in sides[turn:] + sides[:turn]:
                times[name].append(_seconds(lambda: search(queries[q:q + 1], np.arange(q, q + 1))) * 1000)
        for name in single:
            single[name].append(float(np.median(times[name])))
        turn = round_number % len(sides)
        for name, search in sides[turn:] + sides[:turn]:
            batch[name].append(batch_rows / _seconds(lambda: search(queries[:batch_rows], np.arange(batch_rows))))
    n, d = gallery.shape
    return {
        "gallery": n, "dim": d, "rounds": rounds, "single_queries": count, "batch_queries": batch_rows,
        "selectivities": {f"{s:g}": filters[s].selectivity for s in SELECTIVITIES},
        "single_ms_rounds": single, "batch_qps_rounds": batch,
        "single_ratio_rounds": {name: [ms / base for ms, base in zip(single[name], single["unfiltered"])]
                                for name in single if name != "unfiltered"},
        "batch_ratio_rounds": {name: [base / qps for qps, base in zip(batch[name], batch["unfiltered"])]
                               for name in batch if name != "unfiltered"},
        "bandwidth_limit_ms": n * d * 4 / (bandwidth_gbs * 1e9) * 1000, "load_average": os.getloadavg(),
    }


NEEDS_IMAGES = False


def run(ctx: Context) -> dict:
    gallery, queries, label = ctx.search_data(search_data)
    print(f"filtered: exact filtered search at {', '.join(f'{s:.0%}' for s in SELECTIVITIES)} against the unfiltered "
          f"scan over {len(gallery):,} x {gallery.shape[1]} ({label}) ...", flush=True)
    return {"data": label, **bench_filtered(gallery, queries, ctx.args.single_queries, ctx.args.rounds,
                                            ctx.machine["memory_bandwidth_gbs"])}


def rows(result: dict, row) -> None:
    v = result
    base = spread(v["single_ms_rounds"]["unfiltered"])
    row("filtered", f"unfiltered exact single query ({v['gallery']:,}x{v['dim']}), median of {v['rounds']}",
        f"{base[0]:.2f} ({base[1]:.2f}-{base[2]:.2f}) ms", f"{base[0] / v['bandwidth_limit_ms']:.2f}x",
        f"vs the bandwidth limit {v['bandwidth_limit_ms']:.2f} ms; load {v['load_average'][0]:.2f}")
    for name, ratios in v["single_ratio_rounds"].items():
        ms, ratio = spread(v["single_ms_rounds"][name]), spread(ratios)
        row("filtered", f"  filtered to {float(name):.0%} (keeps {v['selectivities'][name]:.2%}): single query",
            f"{ms[0]:.2f} ({ms[1]:.2f}-{ms[2]:.2f}) ms", f"{ratio[0]:.2f}x",
            verdict("filtered_vs_unfiltered", ratio[0], ratio[1:]) + f"; ratios {ratio[1]:.2f}-{ratio[2]:.2f}")
    qps = spread(v["batch_qps_rounds"]["unfiltered"])
    row("filtered", f"unfiltered exact, batches of {v['batch_queries']}", f"{qps[0]:.0f} q/s")
    for name, ratios in v["batch_ratio_rounds"].items():
        qps, ratio = spread(v["batch_qps_rounds"][name]), spread(ratios)
        row("filtered", f"  filtered to {float(name):.0%}: batch (time per query vs unfiltered)", f"{qps[0]:.0f} q/s",
            f"{ratio[0]:.2f}x", verdict("filtered_vs_unfiltered", ratio[0], ratio[1:]) +
            f"; ratios {ratio[1]:.2f}-{ratio[2]:.2f}")
    row("filtered", f"  data: {v['data']}"[:58], "")
