"""The scale part: a 1.28M x 512 synthetic gallery (imgret's store, memory-mapped): time and peak resident set of
the exact ground truth, the IVF build and search and streamed brute force, each in a fresh process."""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import psutil

from imgret.embed.store import EmbeddingStore
from imgret.index.build import build_index
from imgret.index.brute import BruteForceIndex
from imgret.bench.machine import Context, compose_cfg


def _scale_stage_in_child(stage: str, gallery_dir: str, queries_dir: str, nlist: int, nprobe: int, result_queue) -> None:
    """One stage of the scale part, alone in this process, so its peak resident set is its own: the kernel's
    high-water mark of the process (no sampling thread beside the timed work)."""
    import resource

    from imgret.index.groundtruth import exact_top_k

    gallery, queries = EmbeddingStore(Path(gallery_dir)).vectors, np.asarray(EmbeddingStore(Path(queries_dir)).vectors)
    result = {"stage": stage, "baseline_rss_bytes": psutil.Process().memory_info().rss}
    start = time.perf_counter()
    if stage == "groundtruth":
        exact_top_k(gallery, queries, 10, progress=False)
        result["queries"] = len(queries)
    elif stage == "ivf":
        from omegaconf import OmegaConf

        method = OmegaConf.create({"name": "ivf", "nlist": nlist, "nprobe": nprobe, "train_size": None})
        built = build_index(method, gallery)
        result["build_s"] = time.perf_counter() - start
        search_start = time.perf_counter()
        built.index.search(queries, 10)
        result["search_s"] = time.perf_counter() - search_start
        result["queries"] = len(queries)
        result["setting"] = f"nlist={nlist} nprobe={nprobe}"
    elif stage == "brute_streamed":
        some = queries[:1000]
        BruteForceIndex(gallery, resident_bytes=0).search(some, 10)
        result["queries"] = len(some)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    result_queue.put(result)

def bench_scale(cache: Path, gallery_size: int, query_count: int, dim: int, nlist: int, nprobe: int) -> dict:
    """imgret's own synthetic store (made once, then reused from the cache), then each stage in a fresh process."""
    from imgret.embed.vector_stores import ensure_vector_stores

    cfg = compose_cfg("data=synthetic_vectors", f"data.gallery_size={gallery_size}", f"data.query_size={query_count}",
                      f"data.dim={dim}", f"paths.cache={cache}")
    stores = ensure_vector_stores(cfg.data, cfg.seed, cache)
    gallery_bytes = (stores.gallery.path / "vectors.npy").stat().st_size
    context = multiprocessing.get_context("spawn")
    stages = []
    for stage in ("groundtruth", "ivf", "brute_streamed"):
        print(f"scale: {stage} ...", flush=True)
        queue = context.Queue()
        child = context.Process(target=_scale_stage_in_child, args=(stage, str(stores.gallery.path),
                                                                    str(stores.queries.path), nlist, nprobe, queue))
        child.start()
        child.join()  # the result is a small dict: the queue's pipe holds it until it is read
        if child.exitcode != 0:
            raise RuntimeError(f"the scale part's {stage} stage failed in its process (exit code {child.exitcode})")
        stages.append(queue.get(timeout=30))
    return {"gallery": len(stores.gallery), "dim": stores.gallery.dim, "gallery_bytes": gallery_bytes,
            "load_average": list(os.getloadavg()), "stages": stages}


NEEDS_IMAGES = False


def run(ctx: Context) -> dict:
    args = ctx.args
    print(f"scale: {args.scale_gallery:,} x {args.dim} synthetic vectors ...", flush=True)
    return bench_scale(args.cache, args.scale_gallery, args.queries, args.dim, args.scale_nlist, args.nprobe)


def rows(result: dict, row) -> None:
    sc = result
    gallery_gb = sc["gallery_bytes"] / 1e9
    row("scale", f"{sc['gallery']:,}x{sc['dim']} gallery, memory-mapped ({gallery_gb:.2f} GB of vectors)", "",
        "", f"load {sc['load_average'][0]:.2f}; peak RSS / gallery bytes in the ratio column")
    for st in sc["stages"]:
        what = {"groundtruth": f"exact ground truth, top-10 of {st['queries']:,} queries",
                "ivf": f"IVF {st.get('setting', '')}: build, then {st['queries']:,} queries",
                "brute_streamed": f"brute force streamed, {st['queries']:,} queries"}[st["stage"]]
        row("scale", what, f"{st['seconds']:.1f} s", f"{st['peak_rss_bytes'] / sc['gallery_bytes']:.2f}x",
            f"peak RSS {st['peak_rss_bytes'] / 1e9:.2f} GB (process at start {st['baseline_rss_bytes'] / 1e9:.2f} GB)")
        if st["stage"] == "ivf":
            row("scale", "  of which build / batch search", f"{st['build_s']:.1f} s / {st['search_s']:.2f} s")
