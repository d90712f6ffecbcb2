"""The ivf part: the search time imgret reports against a bare faiss call on the same index and queries."""
from __future__ import annotations

import numpy as np

from imgret.index.build import build_index
from imgret.measure.timing import spread
from imgret.bench.harness import against_bare
from imgret.bench.machine import Context
from imgret.bench.verdicts import verdict
from imgret.bench.search import search_data


def bench_ivf(gallery: np.ndarray, queries: np.ndarray, nlist: int, nprobe: int, single_queries: int,
              k: int = 10, rounds: int = 3) -> dict:
    """Same index, same queries: imgret's timed search against bare faiss calls, interleaved over `rounds`; each
    figure is the median of its rounds (the spread beside it), as in every other part."""
    from omegaconf import OmegaConf

    built = build_index(OmegaConf.create({"name": "ivf", "nlist": nlist, "nprobe": nprobe}), gallery)
    figures = against_bare(built.index, built.index.index, queries, k, single_queries, rounds)
    batch_overhead, single_overhead = figures["batch_overhead"], figures["single_overhead"]
    return {
        "nlist": nlist, "nprobe": nprobe, "build_s": built.build_s, "rounds": rounds,
        "batch_rows": figures["batch_rows"],
        "imgret_batch_s": figures["imgret_batch_s"], "bare_faiss_batch_s": figures["bare_batch_s"],
        "imgret_single_ms_p50": figures["imgret_single_ms_p50"],
        "bare_faiss_single_ms_p50": figures["bare_single_ms_p50"],
        "batch_ratios": figures["batch_ratios"], "single_ratios": figures["single_ratios"],
        "ivf_batch_overhead": batch_overhead, "ivf_single_overhead": single_overhead,
        "ivf_harness_overhead": max(batch_overhead, single_overhead),
    }


NEEDS_IMAGES = False


def run(ctx: Context) -> dict:
    gallery, queries, label = ctx.search_data(search_data)
    print(f"ivf: nlist={ctx.args.nlist} nprobe={ctx.args.nprobe} over {len(gallery):,} x {gallery.shape[1]} "
          f"({label}), {len(queries):,} queries ...", flush=True)
    return {"data": label, **bench_ivf(gallery, queries, ctx.args.nlist, ctx.args.nprobe,
                                       max(1000, ctx.args.single_queries), rounds=ctx.args.rounds)}


def rows(result: dict, row) -> None:
    v = result
    batch, single = (spread(v.get(key, [1.0])) for key in ("batch_ratios", "single_ratios"))
    row("ivf", f"nlist={v['nlist']} nprobe={v['nprobe']}: imgret batch calls of {v.get('batch_rows', 'all')} queries "
               f"vs bare faiss, median of {v.get('rounds', 3)}",
        f"{v['imgret_batch_s'] * 1000:.1f} ms", f"{v['ivf_batch_overhead']:+.1%}",
        f"ratios {batch[1]:.3f}-{batch[2]:.3f}")
    row("ivf", "imgret single-query p50 vs bare faiss", f"{v['imgret_single_ms_p50']:.3f} ms",
        f"{v['ivf_single_overhead']:+.1%}", verdict("ivf_harness_overhead", v["ivf_harness_overhead"],
                                                    (min(batch[1], single[1]) - 1, max(batch[2], single[2]) - 1)) +
        f"; ratios {single[1]:.3f}-{single[2]:.3f}")
