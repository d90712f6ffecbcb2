"""The ivf part: the search time imgret reports against a bare faiss call on the same index and queries."""
from __future__ import annotations

import numpy as np

from imgret.index.build import build_index
from imgret.measure.search import timed_search
from imgret.measure.timing import best_seconds
from imgret.bench.machine import Context
from imgret.bench.verdicts import verdict
from imgret.bench.search import search_data, single_query_ms


def bench_ivf(gallery: np.ndarray, queries: np.ndarray, nlist: int, nprobe: int, single_queries: int,
              k: int = 10) -> dict:
    """Same index, same queries: imgret's timed search against bare faiss calls, interleaved."""
    from omegaconf import OmegaConf

    built = build_index(OmegaConf.create({"name": "ivf", "nlist": nlist, "nprobe": nprobe}), gallery)
    bare = built.index.index
    imgret_batch, bare_batch, imgret_p50, bare_p50 = [], [], [], []
    for _ in range(3):
        run = timed_search(built.index, queries, k, latency_queries=single_queries, warmup_queries=20, repeats=1,
                           progress=False)  # one batch call per round, as for bare faiss: the rounds interleave
        imgret_batch.append(run.best_batch_seconds)
        imgret_p50.append(float(np.median(run.latencies_ms)))
        bare_batch.append(best_seconds(lambda: bare.search(queries, k), 1))
        bare_p50.append(single_query_ms(bare, queries, single_queries, k))
    return {
        "nlist": nlist, "nprobe": nprobe, "build_s": built.build_s,
        "imgret_batch_s": min(imgret_batch), "bare_faiss_batch_s": min(bare_batch),
        "imgret_single_ms_p50": min(imgret_p50), "bare_faiss_single_ms_p50": min(bare_p50),
        "ivf_batch_overhead": min(imgret_batch) / min(bare_batch) - 1,
        "ivf_single_overhead": min(imgret_p50) / min(bare_p50) - 1,
        "ivf_harness_overhead": max(min(imgret_batch) / min(bare_batch), min(imgret_p50) / min(bare_p50)) - 1,
    }


NEEDS_IMAGES = False


def run(ctx: Context) -> dict:
    gallery, queries, _ = ctx.search_data(search_data)
    print(f"ivf: nlist={ctx.args.nlist} nprobe={ctx.args.nprobe} ...", flush=True)
    return bench_ivf(gallery, queries, ctx.args.nlist, ctx.args.nprobe, max(1000, ctx.args.single_queries))


def rows(result: dict, row) -> None:
    v = result
    row("ivf", f"nlist={v['nlist']} nprobe={v['nprobe']}: imgret batch vs bare faiss",
        f"{v['imgret_batch_s'] * 1000:.1f} ms", f"{v['ivf_batch_overhead']:+.1%}")
    row("ivf", "imgret single-query p50 vs bare faiss", f"{v['imgret_single_ms_p50']:.3f} ms",
        f"{v['ivf_single_overhead']:+.1%}", verdict("ivf_harness_overhead", v["ivf_harness_overhead"]))
