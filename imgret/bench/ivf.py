"""The ivf part: the search time imgret reports against a bare faiss call on the same index and queries."""
from __future__ import annotations

import numpy as np

from imgret.index.build import build_index
from imgret.measure.search import timed_search
from imgret.measure.timing import best_seconds, interleaved, spread
from imgret.bench.machine import Context
from imgret.bench.verdicts import verdict
from imgret.bench.search import search_data, single_query_ms


def bench_ivf(gallery: np.ndarray, queries: np.ndarray, nlist: int, nprobe: int, single_queries: int,
              k: int = 10, rounds: int = 3) -> dict:
    """Same index, same queries: imgret's timed search against bare faiss calls, interleaved over `rounds`; each
    figure is the median of its rounds (the spread beside it), as in every other part."""
    from omegaconf import OmegaConf

    built = build_index(OmegaConf.create({"name": "ivf", "nlist": nlist, "nprobe": nprobe}), gallery)
    bare = built.index.index

    def imgret_round() -> tuple[float, float]:  # one batch call per round, as for bare faiss: the rounds interleave
        run = timed_search(built.index, queries, k, latency_queries=single_queries, warmup_queries=20, repeats=1,
                           progress=False)
        return run.best_batch_seconds, float(np.median(run.latencies_ms))

    def bare_round() -> tuple[float, float]:
        return best_seconds(lambda: bare.search(queries, k), 1), single_query_ms(bare, queries, single_queries, k)

    figures = interleaved({"imgret": imgret_round, "bare": bare_round}, rounds)
    (imgret_batch, imgret_p50), (bare_batch, bare_p50) = (list(zip(*figures[name])) for name in ("imgret", "bare"))
    batch_ratios = [mine / theirs for mine, theirs in zip(imgret_batch, bare_batch)]
    single_ratios = [mine / theirs for mine, theirs in zip(imgret_p50, bare_p50)]
    batch_overhead, single_overhead = spread(batch_ratios)[0] - 1, spread(single_ratios)[0] - 1
    return {
        "nlist": nlist, "nprobe": nprobe, "build_s": built.build_s, "rounds": rounds,
        "imgret_batch_s": spread(imgret_batch)[0], "bare_faiss_batch_s": spread(bare_batch)[0],
        "imgret_single_ms_p50": spread(imgret_p50)[0], "bare_faiss_single_ms_p50": spread(bare_p50)[0],
        "batch_ratios": batch_ratios, "single_ratios": single_ratios,
        "ivf_batch_overhead": batch_overhead, "ivf_single_overhead": single_overhead,
        "ivf_harness_overhead": max(batch_overhead, single_overhead),
    }


NEEDS_IMAGES = False


def run(ctx: Context) -> dict:
    gallery, queries, _ = ctx.search_data(search_data)
    print(f"ivf: nlist={ctx.args.nlist} nprobe={ctx.args.nprobe} ...", flush=True)
    return bench_ivf(gallery, queries, ctx.args.nlist, ctx.args.nprobe, max(1000, ctx.args.single_queries),
                     rounds=ctx.args.rounds)


def rows(result: dict, row) -> None:
    v = result
    batch, single = (spread(v.get(key, [1.0])) for key in ("batch_ratios", "single_ratios"))
    row("ivf", f"nlist={v['nlist']} nprobe={v['nprobe']}: imgret batch vs bare faiss, median of {v.get('rounds', 3)}",
        f"{v['imgret_batch_s'] * 1000:.1f} ms", f"{v['ivf_batch_overhead']:+.1%}",
        f"ratios {batch[1]:.3f}-{batch[2]:.3f}")
    row("ivf", "imgret single-query p50 vs bare faiss", f"{v['imgret_single_ms_p50']:.3f} ms",
        f"{v['ivf_single_overhead']:+.1%}", verdict("ivf_harness_overhead", v["ivf_harness_overhead"],
                                                    (min(batch[1], single[1]) - 1, max(batch[2], single[2]) - 1)) +
        f"; ratios {single[1]:.3f}-{single[2]:.3f}")
